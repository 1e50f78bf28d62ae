"""Target vectors: what a site (an MLP's output, or a block's output) should hold at the subject.

For each request a vector delta is added to the site's output at the subject's
last token, in every prefixed prompt, and optimised with Adam so the model
predicts the new target, while a KL term keeps the subject's general
distribution ("{subject} is a") and a weight decay keeps delta small; ||delta|| is
clamped to ``clamp_norm_factor`` x ||original value|| (ROME's compute_v, MEMIT's
compute_z). Many requests are optimised in one batched forward/backward, each
with its own row of delta: Adam is elementwise, so this is exactly the per-request
optimisation, not an approximation of it. Nothing below the site's block changes
while delta moves, so the hidden states entering that block are computed once per
batch and every step runs only the blocks from the site's on (``run_from_block``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from lga_dist.answers import AnswerBatch, PromptAnswer, answer_logits, answer_nll, collate, encode_prompt_answer
from lga_dist.console import Progress
from lga_dist.editing.context import prefixed_prompts, read_at_subject, read_position, subject_last_token
from lga_dist.io.requests import EditRequest
from lga_dist.models.adapters import Adapter, get_module
from lga_dist.models.tracing import block_input, forward_hooks, hidden_of, run_from_block, trainable_only, with_hidden

KL_PROMPT = "{} is a"


@dataclasses.dataclass
class TargetHyperParams:
    """The target-optimisation hyper-parameters every locate-then-edit method shares (ROME's names)."""

    v_num_grad_steps: int = 20
    v_lr: float = 0.5
    kl_factor: float = 0.0625
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    fact_token: str = "subject_last"  # where delta is added: the subject's last token, or the prompt's last
    stop_loss: float = 5e-2  # a request whose target NLL falls below this stops moving


@dataclasses.dataclass
class Targets:
    original: torch.Tensor  # (n, d) float64: the site's value at the subject, averaged over prefixes
    delta: torch.Tensor     # (n, d) float64: what the edit should add there
    final_loss: torch.Tensor  # (n,) target NLL at the end

    @property
    def target(self) -> torch.Tensor:
        return self.original + self.delta

    def rows(self, index: Sequence[int]) -> "Targets":
        """The targets of these requests only."""
        return Targets(self.original[list(index)], self.delta[list(index)], self.final_loss[list(index)])


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
    (the batch then keeps its converged rows, frozen and out of the loss, instead of
    shrinking), and the longest answer, so every rank cuts its share into as many chunks.
    """
    n = len(requests)
    original = read_at_subject(model, tokenizer, adapter, requests, prefixes, site, "output", device,
                               fact_token=options.fact_token)
    module = get_module(model, site)
    blocks, start = get_module(model, adapter.layers), adapter.block_of(site)

    # Rewrite sequences: every prefixed prompt followed by the new target.
    rewrite_items: list[PromptAnswer] = []
    rewrite_meta: list[tuple[int, str, int]] = []
    for index, request in enumerate(requests):
        for text in prefixed_prompts(request, prefixes, options.fact_token):
            rewrite_items.append(encode_prompt_answer(tokenizer, text.text, request.target_new))
            rewrite_meta.append((index, text.text, text.subject_end))
    rewrite_rows, rewrite_pos = _subject_rows(tokenizer, rewrite_meta)
    # KL sequences: "{subject} is a", next-token distribution at its last token. Padded on the right whatever
    # the tokenizer's default (Gemma 3 pads on the left): the last token and the subject's are then where
    # they are in the sequence alone, so a request's KL term does not depend on the others in its batch.
    kl_texts = [KL_PROMPT.format(r.subject) for r in requests]
    kl_encoded = tokenizer(kl_texts, return_tensors="pt", padding=True, padding_side="right")
    kl_ids, kl_mask = kl_encoded.input_ids.to(device), kl_encoded.attention_mask.to(device)
    kl_last = kl_mask.sum(1) - 1
    kl_at = [read_position(text, 0, r.subject, options.fact_token) for text, r in zip(kl_texts, requests)]
    _, kl_pos = _subject_rows(tokenizer, [(i, t.text, t.subject_end) for i, t in enumerate(kl_at)])
    kl_below = block_input(model, blocks, start, input_ids=kl_ids, attention_mask=kl_mask)

    def kl_log_probs(ids: torch.Tensor) -> torch.Tensor:
        """Next-token log-probs after "{subject} is a" for the requests ``ids``."""
        with run_from_block(blocks, start, kl_below[ids]):
            hidden = model.base_model(input_ids=kl_ids[ids], attention_mask=kl_mask[ids]).last_hidden_state
        last = hidden[torch.arange(len(ids), device=device), kl_last[ids]]
        return torch.log_softmax(model.get_output_embeddings()(last).float(), dim=-1)

    def still_moving(ids: torch.Tensor) -> tuple[list[tuple[AnswerBatch, torch.Tensor, _AddAtSubject]],
                                                  _AddAtSubject]:
        """Chunks of the requests still optimising (a converged request costs nothing afterwards); each chunk
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
        return chunks, _AddAtSubject(ids, kl_pos[ids.cpu()].to(device), delta)

    delta = torch.zeros((n, original.shape[1]), dtype=torch.float32, device=device, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=options.v_lr)
    base_norm = original.norm(dim=1).to(device, torch.float32)
    # A site whose value is zero (an unused MLP) may not move at all; dividing by 0 would make it NaN.
    decay_scale = (base_norm ** 2).clamp(min=torch.finfo(torch.float32).tiny)
    active = torch.ones(n, dtype=torch.bool, device=device)
    counts = torch.bincount(rewrite_rows, minlength=n).to(device, torch.float32)
    vocab = model.get_output_embeddings().out_features  # not weight.shape: a ZeRO-3 partition is empty
    final = torch.full((n,), float("nan"), device=device)

    # long on a large model or a busy machine: a line in job logs every 30 s (nothing for a quick one)
    steps = Progress(options.v_num_grad_steps, f"target optimisation at {site} ({n} requests)", "step",
                     log_every_s=30.0, bar=False)
    with trainable_only(model), steps:
        with torch.no_grad():
            reference = kl_log_probs(torch.arange(n, device=device))
        batch_of: tuple[list[int], tuple] | None = None
        for _ in range(options.v_num_grad_steps):
            steps.update(1)
            ids = active.nonzero().flatten() if ranks_max is None else torch.arange(n, device=device)
            if batch_of is None or batch_of[0] != ids.tolist():
                batch_of = (ids.tolist(), still_moving(ids))
            chunks, hook_kl = batch_of[1]
            optimizer.zero_grad()
            # The NLL is a sum over sequences, each touching only its own request's row of delta: every
            # chunk's gradient is accumulated as soon as it is computed, rows that stop are zeroed below.
            nll_sum = torch.zeros(n, device=device)
            for rewrite, below, hook_rewrite in chunks:
                with forward_hooks([(module, hook_rewrite)]), run_from_block(blocks, start, below):
                    nll = answer_nll(answer_logits(model, rewrite), rewrite).float()
                part = torch.zeros(n, device=device).index_add(0, hook_rewrite.rows, nll) / counts
                part.sum().backward()
                nll_sum += part.detach()
            nll_per_request = nll_sum[ids]
            with forward_hooks([(module, hook_kl)]):
                kl = torch.nn.functional.kl_div(kl_log_probs(ids), reference[ids], log_target=True,
                                                reduction="none").sum(-1)
            final[ids] = nll_per_request
            decay = options.v_weight_decay * delta[ids].norm(dim=1) ** 2 / decay_scale[ids]
            moving = (nll_per_request >= options.stop_loss) & active[ids]
            active[ids[~moving]] = False
            still = bool(active.any())
            if not (still if ranks_max is None else ranks_max(still)):
                break
            ((options.kl_factor * kl + decay) * moving).sum().backward()
            with torch.no_grad():
                delta.grad[ids[~moving]] = 0.0
            before = delta.detach().clone()
            optimizer.step()
            with torch.no_grad():
                delta[~active] = before[~active]
                limit = options.clamp_norm_factor * base_norm
                scale = torch.clamp(limit / delta.norm(dim=1).clamp(min=1e-12), max=1.0)
                delta.mul_(scale.unsqueeze(1))
    final = final.detach().double().cpu()
    return Targets(original=original, delta=delta.detach().double().cpu(), final_loss=final)
