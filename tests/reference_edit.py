"""ROME's and MEMIT's edits written plainly, one request at a time, after the published algorithm.

This is the yardstick the product's batched code is held to (tests/test_reference_edits.py) and
the loop benchmarks/bench_reference_edits.py compares against. It follows the authors' own
code step by step (kmeng01/rome: rome/compute_u.py, rome/compute_v.py, rome/rome_main.py;
kmeng01/memit: memit/compute_z.py, memit/compute_ks.py, memit/memit_main.py):

target optimisation (compute_v / compute_z), for one request and a site (a module whose output
holds the edited value):
  v0     the site's output at the subject's last token of the bare prompt   (``target_init``)
  loop   it = 0 .. steps-1, with delta added at the subject's last token of every prompt:
           nll   mean over the prefixed prompts of the target tokens' mean NLL
           kl    KL(current || initial) of the next-token distribution at the subject's last
                 token of "{subject} is a" (torch's kl_div(initial, current, log_target=True))
           decay v_weight_decay * ||delta|| / ||v0||^2                     (the norm, not squared)
           loss = nll + kl_factor * kl + decay
           stop if loss < 5e-2 (stop_loss); stop if it == steps - 1 (before stepping: steps-1 Adam steps at most)
           Adam step on delta; if ||delta|| > clamp_norm_factor * ||v0||, scale it back onto that ball
ROME (rome_main / compute_u / compute_v):
  k*  mean over the prefixed prompts of the projection's input at the subject (prefixes equally)
  u   C^-1 k*
  dW  (v0 + delta - W k_bare) u^T / (k_bare . u)     k_bare: the input at the bare prompt
MEMIT (memit_main / compute_ks), z = v0 + delta at the last window layer's block output; per layer,
lowest first, on the model as already updated:
  k   mean of (the bare prompt's key) and (the mean over the generated prefixes' keys)
  r   (z - h_bare) / (layers left), h_bare: the last window layer's output at the bare prompt now
  dW  r k^T (lambda C + k k^T)^-1, applied before the next layer

Every forward here is one sequence alone: no padding, no batching, no cached lower blocks.
``Deviations`` switches single steps to other choices (the benchmark measures what each one
does); all off is the reference.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from lga_dist.answers import encode_prompt_answer
from lga_dist.editing.context import prefixed_prompts, read_position, subject_last_token
from lga_dist.models import get_module


@dataclasses.dataclass(frozen=True)
class Deviations:
    """Steps computed otherwise than the reference does (each False: as the reference)."""

    squared_decay: bool = False        # v_weight_decay * ||delta||^2 / ||v0||^2
    stop_on_nll: bool = False          # stop once the target NLL alone is below 5e-2
    kl_at_last_token: bool = False     # the KL distribution at the KL prompt's last token
    kl_initial_first: bool = False     # KL(initial || current)
    step_on_last_iteration: bool = False  # an Adam step after every one of the steps' losses
    v0_over_prefixes: bool = False     # v0 (decay, clamp; ROME's v* - W k - b) averaged over the prefixed prompts
    rome_denominator_k_star: bool = False  # ROME's dW divided by k* . u (the paper's formula)


@dataclasses.dataclass
class ReferenceTarget:
    v0: torch.Tensor
    delta: torch.Tensor
    loss: float  # the total loss at the returned delta
    steps: int   # Adam steps taken
    losses: list[float]  # the total loss at each iteration


def _site_hook(position: int, delta: torch.Tensor, record: list | None = None):
    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if record is not None:
            record.append(hidden[0, position].detach().clone())
        hidden = hidden.clone()
        hidden[0, position] = hidden[0, position] + delta.to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
    return hook


def _logits(model, ids: list[int], module, position: int, delta: torch.Tensor, record: list | None = None):
    handle = module.register_forward_hook(_site_hook(position, delta, record))
    try:
        return model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        handle.remove()


def _read(model, tokenizer, module, text: str, position: int, read: str) -> torch.Tensor:
    seen = []
    handle = module.register_forward_hook(
        lambda _m, args, out: seen.append((args[0] if read == "input" else (out[0] if isinstance(out, tuple) else out))
                                          [0, position].detach().clone()))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([tokenizer(text).input_ids]))
    finally:
        handle.remove()
    return seen[0].double()


def _bare(request, fact_token: str):
    """The bare prompt and where its subject ends."""
    return read_position(request.prompt, request.prompt.index(request.subject), request.subject, fact_token)


def reference_target(model, tokenizer, request, prefixes: Sequence[str], site: str, hparams,
                     deviations: Deviations = Deviations()) -> ReferenceTarget:
    """One request's compute_v / compute_z loop (see the module docstring)."""
    module = get_module(model, site)
    texts = prefixed_prompts(request, prefixes, hparams.fact_token)
    items = [encode_prompt_answer(tokenizer, t.text, request.target_new) for t in texts]
    positions = [subject_last_token(tokenizer, t.text, t.subject_end) for t in texts]
    kl_text = read_position(f"{request.subject} is a", 0, request.subject, hparams.fact_token)
    kl_ids = tokenizer(kl_text.text).input_ids
    kl_position = subject_last_token(tokenizer, kl_text.text, kl_text.subject_end)
    kl_read = len(kl_ids) - 1 if deviations.kl_at_last_token else kl_position

    dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)  # ROME's float32 delta
    bare = _bare(request, hparams.fact_token)
    v0 = _read(model, tokenizer, module, bare.text, subject_last_token(tokenizer, bare.text, bare.subject_end),
               "output").to(dtype)
    if deviations.v0_over_prefixes:
        v0 = torch.stack([_read(model, tokenizer, module, t.text, p, "output") for t, p in zip(texts, positions)]
                         ).mean(0).to(dtype)

    delta = torch.zeros(v0.shape, dtype=dtype, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=hparams.v_lr)
    initial = None
    steps, losses = 0, []
    for it in range(hparams.v_num_grad_steps):
        optimizer.zero_grad()
        nlls = []
        for item, position in zip(items, positions):
            logits = _logits(model, item.input_ids, module, position, delta)
            log_probs = torch.log_softmax(logits[item.answer_start - 1:len(item.input_ids) - 1].to(dtype), dim=-1)
            answer = torch.tensor(item.answer_ids)
            nlls.append(-log_probs[torch.arange(len(answer)), answer].mean())
        nll = torch.stack(nlls).mean()
        kl_log_probs = torch.log_softmax(_logits(model, kl_ids, module, kl_position, delta)[kl_read].to(dtype), dim=-1)
        if initial is None:
            initial = kl_log_probs.detach().clone()
        if deviations.kl_initial_first:
            kl = (initial.exp() * (initial - kl_log_probs)).sum()
        else:
            kl = (kl_log_probs.exp() * (kl_log_probs - initial)).sum()
        size = delta.norm() ** 2 if deviations.squared_decay else delta.norm()
        decay = hparams.v_weight_decay * size / v0.norm() ** 2
        total = nll + hparams.kl_factor * kl + decay
        losses.append(float(total.detach()))
        if (float(nll) if deviations.stop_on_nll else losses[-1]) < hparams.stop_loss:
            break
        if it == hparams.v_num_grad_steps - 1 and not deviations.step_on_last_iteration:
            break
        total.backward()
        optimizer.step()
        steps += 1
        limit = hparams.clamp_norm_factor * v0.norm()
        if delta.norm() > limit:
            with torch.no_grad():
                delta[...] = delta * limit / delta.norm()
    return ReferenceTarget(v0.double(), delta.detach().double(), losses[-1], steps, losses)


def reference_key(model, tokenizer, adapter, request, prefixes: Sequence[str], layer: int, fact_token: str,
                  average: str) -> torch.Tensor:
    """The projection's input at the subject: ``flat`` (ROME's compute_u), ``by_kind`` (MEMIT's compute_ks:
    the bare prompt and the generated prefixes' mean, equally) or ``bare``."""
    module = get_module(model, adapter.mlp_out_name(layer))
    texts = prefixed_prompts(request, prefixes, fact_token)
    keys = [_read(model, tokenizer, module, t.text, subject_last_token(tokenizer, t.text, t.subject_end), "input")
            for t in texts]
    bare = _bare(request, fact_token)
    k_bare = _read(model, tokenizer, module, bare.text, subject_last_token(tokenizer, bare.text, bare.subject_end),
                   "input")
    if average == "bare":
        return k_bare
    if average == "flat":
        return torch.stack(keys).mean(0)
    generated = [k for k, prefix in zip(keys, prefixes) if prefix]
    return (k_bare + torch.stack(generated).mean(0)) / 2 if generated else k_bare


def reference_rome(model, tokenizer, adapter, request, prefixes: Sequence[str], layer: int, hparams,
                   mom2: torch.Tensor, deviations: Deviations = Deviations()) -> tuple[torch.Tensor, ReferenceTarget]:
    """ROME's dW (out x in, float64) for one request, and its target."""
    site = adapter.mlp_out_name(layer)
    target = reference_target(model, tokenizer, request, prefixes, site, hparams, deviations)
    k_star = reference_key(model, tokenizer, adapter, request, prefixes, layer, hparams.fact_token, "flat")
    u = torch.linalg.solve(mom2, k_star)
    bare = _bare(request, hparams.fact_token)
    position = subject_last_token(tokenizer, bare.text, bare.subject_end)
    module = get_module(model, site)
    k_bare = _read(model, tokenizer, module, bare.text, position, "input")
    current = _read(model, tokenizer, module, bare.text, position, "output")
    if deviations.v0_over_prefixes:  # v* - W k* - b with both sides averaged over the prefixed prompts
        texts = prefixed_prompts(request, prefixes, hparams.fact_token)
        current = torch.stack([_read(model, tokenizer, module, t.text, subject_last_token(tokenizer, t.text,
                                                                                          t.subject_end), "output")
                               for t in texts]).mean(0)
    denominator = k_star @ u if deviations.rome_denominator_k_star else k_bare @ u
    return torch.outer(target.v0 + target.delta - current, u) / denominator, target


def reference_memit(model, tokenizer, adapter, requests, prefixes: Sequence[str], layers: Sequence[int], hparams,
                    mom2s: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """MEMIT's dW per layer (out x in, float64) for a batch of requests; the model is restored after."""
    layers = sorted(layers)
    site = adapter.layer_name(layers[-1])
    targets = [reference_target(model, tokenizer, r, prefixes, site, hparams) for r in requests]
    z = torch.stack([t.v0 + t.delta for t in targets], dim=1)
    block = get_module(model, site)
    saved = {layer: adapter.oriented_weight(get_module(model, adapter.mlp_out_name(layer))).detach().clone()
             for layer in layers}
    updates = {}
    try:
        for i, layer in enumerate(layers):
            keys = torch.stack([reference_key(model, tokenizer, adapter, r, prefixes, layer, hparams.fact_token,
                                              "by_kind") for r in requests], dim=1)
            current = []
            for request in requests:
                bare = _bare(request, hparams.fact_token)
                current.append(_read(model, tokenizer, block, bare.text,
                                     subject_last_token(tokenizer, bare.text, bare.subject_end), "output"))
            residual = (z - torch.stack(current, dim=1)) / (len(layers) - i)
            system = hparams.mom2_update_weight * mom2s[layer] + keys @ keys.T
            update = residual @ torch.linalg.solve(system, keys).T
            updates[layer] = update
            weight = adapter.oriented_weight(get_module(model, adapter.mlp_out_name(layer)))
            with torch.no_grad():
                weight.add_(update.to(weight.dtype))
    finally:
        with torch.no_grad():
            for layer, weight in saved.items():
                adapter.oriented_weight(get_module(model, adapter.mlp_out_name(layer))).copy_(weight)
    return updates
