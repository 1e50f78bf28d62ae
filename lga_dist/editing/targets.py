"""Target vectors: what a site (an MLP's output, or a block's output) should hold at the subject.

The loop of ROME's compute_v and MEMIT's compute_z (kmeng01/rome rome/compute_v.py, kmeng01/memit
memit/compute_z.py; AlphaEdit's and EasyEdit's copies are the same loop), step by step, per request:

  v0     the site's output at the subject's last token of the bare prompt (``target_init``); the
         target is v0 + delta
  delta  added to the site's output at the subject's last token of every prefixed prompt (each
         followed by the new target) and of "{subject} is a"; optimised with Adam from zero
  loss   nll + kl_factor * kl + v_weight_decay * ||delta|| / ||v0||^2      (the norm, not squared)
         nll: mean over the prefixed prompts of the target tokens' mean NLL
         kl:  KL(current || initial) of the next-token distribution at the subject's last token
              of "{subject} is a"
  stop   once the loss is below ``stop_loss`` (5e-2), checked before stepping; the last of the
         ``v_num_grad_steps`` iterations only evaluates, so at most v_num_grad_steps - 1 steps
  clamp  after each step, delta is scaled back onto the ball of radius clamp_norm_factor * ||v0||

Many requests are optimised in one batched forward/backward, each with its own row of delta and
its own loss: Adam is elementwise and a row that stops is frozen (its value put back after every
later step), so each row follows exactly the loop it would follow alone. Nothing below the site's
block changes while delta moves, so the hidden states entering that block are computed once per
batch and every step runs only the blocks from the site's on (``run_from_block``).
tests/test_reference_edits.py holds this to a one-request-at-a-time loop written after the papers'
code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from lga_dist.answers import (AnswerBatch, PromptAnswer, answer_logits, answer_nll, at_least_float32, collate,
                              encode_prompt_answer)
from lga_dist.console import Progress
from lga_dist.editing.context import prefixed_prompts, read_at_subject, read_position, subject_last_token
from lga_dist.io.requests import EditRequest
from lga_dist.models.adapters import Adapter, get_module
from lga_dist.models.tracing import block_input, forward_hooks, hidden_of, run_from_block, trainable_only, with_hidden

KL_PROMPT = "{} is a"


@dataclasses.dataclass
class TargetHyperParams:
    """The target-optimisation hyper-parameters every locate-then-edit method shares (ROME's names)."""

    v_num_grad_steps: int = 20  # iterations of the loop; the last only evaluates (ROME's compute_v)
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    fact_token: str = "subject_last"  # where delta is added: the subject's last token, or the prompt's last
    stop_loss: float = 5e-2  # a request whose total loss (NLL + KL + decay) is below this stops moving


@dataclasses.dataclass
class Targets:
    original: torch.Tensor    # (n, d) float64: v0, the site's value at the subject of the bare prompt
    delta: torch.Tensor       # (n, d) float64: what the edit should add there
    final_loss: torch.Tensor  # (n,) float64: each request's total loss at its final delta
    steps: torch.Tensor       # (n,) int64: the Adam steps each request took

    @property
    def target(self) -> torch.Tensor:
        return self.original + self.delta

    def rows(self, index: Sequence[int]) -> "Targets":
        """The targets of these requests only."""
        index = list(index)
        return Targets(self.original[index], self.delta[index], self.final_loss[index], self.steps[index])

    @staticmethod
    def concatenate(parts: Sequence["Targets"]) -> "Targets":
        """One ``Targets`` of several request groups' targets, in order."""
        return Targets(*(torch.cat([getattr(part, field.name) for part in parts])
                         for field in dataclasses.fields(Targets)))


class _AddAtSubject:
    """Forward hook adding delta[request of row] to a module's output at each row's subject token."""

    def __init__(self, rows: torch.Tensor, positions: torch.Tensor, delta: torch.Tensor):
        self.rows, self.positions, self.delta = rows, positions, delta

    def __call__(self, _module, _args, output):
        hidden = hidden_of(output)
        add = torch.zeros_like(hidden)
        add[torch.arange(len(self.rows), device=hidden.device), self.positions] = \
            self.delta[self.rows].to(hidden.dtype)
        return with_hidden(output, hidden + add)


def _subject_rows(tokenizer, items: list[tuple[int, str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.tensor([r for r, _, _ in items])
    positions = torch.tensor([subject_last_token(tokenizer, text, end) for _, text, end in items])
    return rows, positions


def compute_targets(model, tokenizer, adapter: Adapter, requests: Sequence[EditRequest], prefixes: Sequence[str],
                    site: str, options: TargetHyperParams, device="cpu",
                    ranks_max: Callable[[int], int] | None = None, max_logits: int = 2**23) -> Targets:
    """Optimise one delta per request at module ``site`` (its output); see the module docstring.

    A step's sequences run in chunks of at most ``max_logits`` answer logits (vocabulary x answer
    tokens x sequences; 2^23 floats is 32 MiB per copy), whatever the number of requests. With a
    262k-token vocabulary that is about 10 sequences; a 20-request step of a 270M model then peaks at
    3.1 GB instead of 5.7 GB (at 2^26), in the same time on 2 CPU cores.

    On a ZeRO-3 rank every step is a collective, so ranks must step together:
    ``ranks_max(n)`` is the largest n over the ranks: whether any rank is still optimising
    (the batch then keeps its stopped rows, frozen and out of the loss, instead of
    shrinking), and the longest answer, so every rank cuts its share into as many chunks.
    """
    n = len(requests)
    # v0 at the bare prompt: the reference's target_init (read in its first context template, "{}")
    original = read_at_subject(model, tokenizer, adapter, requests, prefixes, site, "output", device,
                               fact_token=options.fact_token, average="bare")
    module = get_module(model, site)
    blocks, start = get_module(model, adapter.layers), adapter.block_of(site)
    vocab = model.get_output_embeddings().out_features  # not weight.shape: a ZeRO-3 partition is empty
    # delta in float32 (ROME's), or float64 for a float64 model; bfloat16 models add it in their own dtype
    dtype = torch.promote_types(model.get_output_embeddings().weight.dtype, torch.float32)

    # Rewrite sequences: every prefixed prompt followed by the new target.
    rewrite_items: list[PromptAnswer] = []
    rewrite_meta: list[tuple[int, str, int]] = []
    for index, request in enumerate(requests):
        for text in prefixed_prompts(request, prefixes, options.fact_token):
            rewrite_items.append(encode_prompt_answer(tokenizer, text.text, request.target_new))
            rewrite_meta.append((index, text.text, text.subject_end))
    rewrite_rows, rewrite_pos = _subject_rows(tokenizer, rewrite_meta)
    # KL sequences: "{subject} is a", the next-token distribution at the subject's last token, where delta is
    # added. Padded on the right whatever the tokenizer's default (Gemma 3 pads on the left): the subject's
    # token is then where it is in the sequence alone, so a request's KL term does not depend on its batch.
    kl_texts = [KL_PROMPT.format(r.subject) for r in requests]
    kl_encoded = tokenizer(kl_texts, return_tensors="pt", padding=True, padding_side="right")
    kl_ids, kl_mask = kl_encoded.input_ids.to(device), kl_encoded.attention_mask.to(device)
    kl_at = [read_position(text, 0, r.subject, options.fact_token) for text, r in zip(kl_texts, requests)]
    _, kl_pos = _subject_rows(tokenizer, [(i, t.text, t.subject_end) for i, t in enumerate(kl_at)])
    kl_pos = kl_pos.to(device)
    kl_below = block_input(model, blocks, start, input_ids=kl_ids, attention_mask=kl_mask)

    def kl_log_probs(ids: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs at the subject of "{subject} is a" for the requests ``ids``."""
        with run_from_block(blocks, start, kl_below[ids]):
            hidden = model.base_model(input_ids=kl_ids[ids], attention_mask=kl_mask[ids]).last_hidden_state
        at_subject = hidden[torch.arange(len(ids), device=device), kl_pos[ids]]
        return torch.log_softmax(at_least_float32(model.get_output_embeddings()(at_subject)), dim=-1)

    def still_moving(ids: torch.Tensor) -> tuple[list[tuple[AnswerBatch, torch.Tensor, _AddAtSubject]],
                                                  _AddAtSubject]:
        """Chunks of the requests still optimising (a stopped request costs nothing afterwards); each chunk
        holds at most ``max_logits`` answer logits, the memory a step's forward/backward keeps alive."""
        keep = torch.isin(rewrite_rows, ids.cpu()).nonzero().flatten().tolist()
        answers = max(len(rewrite_items[j].answer_ids) for j in keep)
        answers = answers if ranks_max is None else ranks_max(answers)
        size = max(1, max_logits // (answers * vocab))
        chunks = []
        for first in range(0, len(keep), size):
            part = torch.tensor(keep[first:first + size])
            batch = collate([rewrite_items[j] for j in part.tolist()], tokenizer.pad_token_id).to(device)
            below = block_input(model, blocks, start, input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            chunks.append((batch, below, _AddAtSubject(rewrite_rows[part].to(device), rewrite_pos[part].to(device),
                                                       delta)))
        return chunks, _AddAtSubject(ids, kl_pos[ids], delta)

    delta = torch.zeros((n, original.shape[1]), dtype=dtype, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=options.v_lr)
    base_norm = original.norm(dim=1).to(device, dtype)
    # A site whose value is zero (an unused MLP) may not move at all; dividing by 0 would make it NaN.
    decay_scale = (base_norm ** 2).clamp(min=torch.finfo(dtype).tiny)
    limit = options.clamp_norm_factor * base_norm
    active = torch.ones(n, dtype=torch.bool, device=device)
    counts = torch.bincount(rewrite_rows, minlength=n).to(device, dtype)
    final = torch.full((n,), float("nan"), dtype=dtype, device=device)
    taken = torch.zeros(n, dtype=torch.int64, device=device)

    # long on a large model or a busy machine: a line in job logs every 30 s (nothing for a quick one)
    steps = Progress(options.v_num_grad_steps, f"target optimisation at {site} ({n} requests)", "step",
                     log_every_s=30.0, bar=False)
    with trainable_only(model), steps:
        with torch.no_grad():
            reference = kl_log_probs(torch.arange(n, device=device))
        batch_of: tuple[list[int], tuple] | None = None
        for iteration in range(options.v_num_grad_steps):
            steps.update(1)
            evaluate_only = iteration == options.v_num_grad_steps - 1  # the reference breaks before its step
            ids = active.nonzero().flatten() if ranks_max is None else torch.arange(n, device=device)
            if batch_of is None or batch_of[0] != ids.tolist():
                batch_of = (ids.tolist(), still_moving(ids))
            chunks, hook_kl = batch_of[1]
            optimizer.zero_grad()
            with torch.set_grad_enabled(not evaluate_only):
                # The NLL is a sum over sequences, each touching only its own request's row of delta: every
                # chunk's gradient is accumulated as soon as it is computed, rows that stop are zeroed below.
                nll_sum = torch.zeros(n, dtype=dtype, device=device)
                for rewrite, below, hook_rewrite in chunks:
                    with forward_hooks([(module, hook_rewrite)]), run_from_block(blocks, start, below):
                        nll = answer_nll(answer_logits(model, rewrite), rewrite).to(dtype)
                    part = torch.zeros(n, dtype=dtype, device=device).index_add(0, hook_rewrite.rows, nll) / counts
                    if not evaluate_only:
                        part.sum().backward()
                    nll_sum += part.detach()
                with forward_hooks([(module, hook_kl)]):
                    # kl_div(input=initial, target=current) is KL(current || initial), as the reference computes
                    kl = torch.nn.functional.kl_div(reference[ids], kl_log_probs(ids).to(dtype), log_target=True,
                                                    reduction="none").sum(-1)
                decay = options.v_weight_decay * delta[ids].norm(dim=1) / decay_scale[ids]
            loss = nll_sum[ids] + options.kl_factor * kl.detach() + decay.detach()
            was_active = active[ids]
            final[ids[was_active]] = loss[was_active]
            active[ids[was_active & (loss < options.stop_loss)]] = False
            moving = active[ids]
            still = bool(active.any())
            if evaluate_only or not (still if ranks_max is None else ranks_max(still)):
                break
            ((options.kl_factor * kl + decay) * moving).sum().backward()
            with torch.no_grad():
                delta.grad[ids[~moving]] = 0.0
            before = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                delta[~active] = before[~active]
                taken[active] += 1
                norms = delta.norm(dim=1)
                over = active & (norms > limit)
                delta[over] = delta[over] * limit[over].unsqueeze(1) / norms[over].unsqueeze(1)
    return Targets(original=original, delta=delta.detach().double().cpu(), final_loss=final.double().cpu(),
                   steps=taken.cpu())
