"""Causal tracing (causal mediation analysis, as in ROME): which layers carry a fact at the subject.

For each request (prompt + true answer):
  clean      the ordinary forward pass; every layer's state at the subject's last token is kept;
  corrupted  Gaussian noise (``noise`` x the standard deviation of the input embeddings at subject
             tokens, 3 in ROME) is added to the embeddings of the subject's tokens;
  restored   corrupted again, with layer l's state at the subject's last token put back to its
             clean value (``window`` > 1: the layers of a window centred on l).
P is the answer's probability, exp(-mean answer NLL), as in the CounterFact metrics. The
indirect effect of layer l is P_restored(l) - P_corrupted; a layer's score is its average
indirect effect (AIE) over the requests and ``samples`` noise draws. The state is the MLP output
(the edit site's output, ``kind='mlp'``) or the whole block's output (``kind='hidden'``).

Works on any model an ``Adapter`` describes and, like LGA's hooks, under ZeRO-3 (forward only).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import torch

from lga_dist.answers import AnswerBatch, PromptAnswer, answer_logits, answer_nll, collate, encode_prompt_answer
from lga_dist.io.requests import EditRequest
from lga_dist.models.adapters import Adapter, get_module
from lga_dist.models.tracing import forward_hooks, hidden_of, with_hidden

KINDS = ("mlp", "hidden")


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    noise: float = 3.0  # noise std in units of the subject embeddings' std (ROME: 3)
    samples: int = 3  # noise draws per request (ROME: 10)
    window: int = 1  # layers restored together, centred on the scored layer
    kind: str = "mlp"
    seed: int = 0
    all_positions: bool = False  # restore the state at every position, not only the subject's last token


@dataclasses.dataclass(frozen=True)
class TracedRequest:
    """A request's prompt + true answer, with its subject's token positions."""

    encoded: PromptAnswer
    subject_positions: list[int]  # every token of the subject (noised)
    subject_last: int  # the position whose state is restored


@dataclasses.dataclass
class TraceResult:
    """Per request: indirect effect per layer (requests x layers), and the clean and corrupted P."""

    effects: np.ndarray
    p_clean: np.ndarray
    p_corrupted: np.ndarray


def trace_request(tokenizer, request: EditRequest) -> TracedRequest:
    encoded = encode_prompt_answer(tokenizer, request.prompt, request.target_true)
    start = request.prompt.find(request.subject)
    end = start + len(request.subject)
    offsets = tokenizer(request.prompt + " " + request.target_true, return_offsets_mapping=True)["offset_mapping"]
    positions = [i for i, (begin, stop) in enumerate(offsets) if stop > begin and begin < end and stop > start]
    if start < 0 or not positions:
        raise ValueError(f"no token of the subject {request.subject!r} in {request.prompt!r}")
    return TracedRequest(encoded, positions, positions[-1])


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """The ``window`` layers centred on ``layer``, clipped to the model (ROME's tracing windows)."""
    low = max(0, layer - window // 2)
    high = min(n_layers, low + window)
    return list(range(max(0, high - window), high))


class CausalTracer:
    """Hooks on the input embeddings (noise) and on each layer's state (record / restore)."""

    def __init__(self, model: torch.nn.Module, tokenizer, adapter: Adapter, n_layers: int,
                 device: torch.device | str = "cpu"):
        self.model, self.tokenizer, self.adapter, self.n_layers = model, tokenizer, adapter, n_layers
        self.device = torch.device(device)

    def _state_module(self, layer: int, kind: str) -> torch.nn.Module:
        name = self.adapter.mlp_out_name(layer) if kind == "mlp" else self.adapter.layer_name(layer)
        return get_module(self.model, name)

    def noise_std(self, requests: Sequence[EditRequest]) -> float:
        """Standard deviation of the input embeddings at the subjects' tokens (the unit of the noise)."""
        traced = [trace_request(self.tokenizer, r) for r in requests]
        batch = collate([t.encoded for t in traced], self.tokenizer.pad_token_id).to(self.device)
        with torch.no_grad():
            embedded = self.model.get_input_embeddings()(batch.input_ids)
        values = torch.cat([embedded[row, t.subject_positions] for row, t in enumerate(traced)])
        return float(values.float().std())

    def trace(self, requests: Sequence[EditRequest], options: TraceOptions, noise_std: float,
              valid: Sequence[bool] | None = None) -> TraceResult:
        """Indirect effects of every layer for ``requests`` (one batch). ``valid`` False rows are padding."""
        if options.kind not in KINDS:
            raise ValueError(f"unknown state kind {options.kind!r}; choose from {KINDS}")
        traced = [trace_request(self.tokenizer, r) for r in requests]
        batch = collate([t.encoded for t in traced], self.tokenizer.pad_token_id).to(self.device)
        rows = torch.arange(len(traced), device=self.device)
        where = (slice(None),) if options.all_positions else (
            rows, torch.tensor([t.subject_last for t in traced], device=self.device))
        mask = torch.zeros(batch.input_ids.shape, device=self.device)
        for row, t in enumerate(traced):
            mask[row, t.subject_positions] = 1.0
        clean_states, p_clean = self._clean_run(batch, where, options.kind)
        effects = np.zeros((len(traced), self.n_layers))
        p_corrupted = np.zeros(len(traced))
        hidden = self.model.config.hidden_size  # not the weight's shape: under ZeRO-3 that is a shard
        for sample in range(options.samples):
            generator = torch.Generator().manual_seed(options.seed * 1_000_003 + sample)
            noise = torch.randn((*batch.input_ids.shape, hidden), generator=generator).to(self.device)
            noise = noise * (options.noise * noise_std) * mask.unsqueeze(-1)
            corrupted = self._probability(batch, noise, {}, where, options.kind)
            p_corrupted += corrupted / options.samples
            for layer in range(self.n_layers):
                restore = {l: clean_states[l] for l in window_layers(layer, options.window, self.n_layers)}
                restored = self._probability(batch, noise, restore, where, options.kind)
                effects[:, layer] += (restored - corrupted) / options.samples
        if valid is not None:
            keep = np.asarray(valid, dtype=bool)
            effects, p_clean, p_corrupted = effects * keep[:, None], p_clean * keep, p_corrupted * keep
        return TraceResult(effects, p_clean, p_corrupted)

    def _clean_run(self, batch: AnswerBatch, where: tuple, kind: str) -> tuple[dict[int, torch.Tensor], np.ndarray]:
        states: dict[int, torch.Tensor] = {}

        def keep(layer: int):
            def hook(_module, _inputs, output):
                states[layer] = hidden_of(output)[where].detach().clone()
            return hook

        with forward_hooks((self._state_module(l, kind), keep(l)) for l in range(self.n_layers)):
            p = self._answer_probability(batch)
        return states, p

    def _probability(self, batch: AnswerBatch, noise: torch.Tensor, restore: dict[int, torch.Tensor],
                     where: tuple, kind: str) -> np.ndarray:
        def add_noise(_module, _inputs, output):
            return output + noise.to(output.dtype)

        def put_back(layer: int):
            def hook(_module, _inputs, output):
                tensor = hidden_of(output).clone()
                tensor[where] = restore[layer].to(tensor.dtype)
                return with_hidden(output, tensor)
            return hook

        hooks = [(self.model.get_input_embeddings(), add_noise)]
        hooks += [(self._state_module(l, kind), put_back(l)) for l in restore]
        with forward_hooks(hooks):
            return self._answer_probability(batch)

    def scorer(self, options: TraceOptions, noise_std: float) -> "TracingScorer":
        return TracingScorer(self, options, noise_std)

    def _answer_probability(self, batch: AnswerBatch) -> np.ndarray:
        with torch.no_grad():
            nll = answer_nll(answer_logits(self.model, batch), batch)
        return torch.exp(-nll).double().cpu().numpy()


@dataclasses.dataclass
class TracingScorer:
    """A tracer with fixed options and noise scale, scoring one batch at a time like the LGA scorer.

    Every call runs the same number of forward passes whatever the requests, so ZeRO-3 ranks stay in
    step; ``valid`` False rows are padding and count zero."""

    tracer: CausalTracer
    options: TraceOptions
    noise_std: float

    def score(self, requests: Sequence[EditRequest], valid: Sequence[bool] | None = None) -> TraceResult:
        return self.tracer.trace(requests, self.options, self.noise_std, valid)

    def __enter__(self) -> "TracingScorer":
        return self

    def __exit__(self, *exc) -> None:
        return None
