"""LGA scores: per request i and layer l, s_il = <grad_W_l L_old(i), grad_W_l L_new(i)>.

For a linear map y = W x applied at positions t, grad_W L = sum_t d_t x_t^T with
d_t = dL/dy_t, so for two losses a and b

    <grad_W L_a, grad_W L_b> = sum_{t,s} (d_a,t . d_b,s) (x_a,t . x_b,s),

an elementwise product of two T x T Gram matrices. Forward hooks keep each
selected module's input x, tensor hooks keep its output gradient d; one
backward of the summed loss of a batch (old and new answer of every request)
yields every sequence's d, because sequences do not interact. Per-request weight
gradients are never formed and parameters never need ``.grad``, so this works
unchanged when ZeRO-3 shards the weights (it shards parameters, not activations).
Only weight matrices count (biases are left out).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from lga_dist.answers import AnswerBatch, PromptAnswer, answer_logits, answer_nll, collate, encode_prompt_answer
from lga_dist.io.requests import EditRequest
from lga_dist.models.adapters import Adapter, get_module
from lga_dist.models.tracing import forward_hooks, trainable_only

PARAM_SETS = ("out", "mlp")
DEFAULT_PARAM_SET = "out"  # the matrix ROME and MEMIT edit


@dataclasses.dataclass
class RequestScores:
    """Scores of a set of requests: rows are requests, columns layers (float64)."""

    dot: np.ndarray
    norm_old: np.ndarray
    norm_new: np.ndarray
    loss_old: np.ndarray
    loss_new: np.ndarray

    def cosine(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(self.norm_old * self.norm_new > 0, self.dot / (self.norm_old * self.norm_new), 0.0)

    def per_request(self, score: str) -> np.ndarray:
        """(requests, layers) values of one per-request score (see ``lga_dist.lga.partial_scores.SCORES``)."""
        if score == "dot":
            return self.dot
        if score == "cosine":
            return self.cosine()
        if score == "norm_new":
            return self.norm_new
        raise ValueError(f"unknown per-request score {score!r}")

    @staticmethod
    def concat(parts: Sequence["RequestScores"]) -> "RequestScores":
        return RequestScores(*(np.concatenate([getattr(p, f.name) for p in parts])
                               for f in dataclasses.fields(RequestScores)))


def encode_request_pair(tokenizer, request: EditRequest) -> tuple[PromptAnswer, PromptAnswer]:
    """The request's prompt followed by its true answer, and by its new target."""
    return (encode_prompt_answer(tokenizer, request.prompt, request.target_true),
            encode_prompt_answer(tokenizer, request.prompt, request.target_new))


def pair_batch(pairs: Sequence[tuple[PromptAnswer, PromptAnswer]], pad_id: int) -> AnswerBatch:
    """Sequences ordered old_0..old_{B-1}, new_0..new_{B-1}."""
    return collate([old for old, _ in pairs] + [new for _, new in pairs], pad_id)


class GradientCapture:
    """Hooks that keep the input and the output gradient of every selected module for one pass."""

    def __init__(self, model: torch.nn.Module, modules: dict[int, list[str]]):
        self.model = model
        self.modules = modules  # layer -> module names
        self.inputs: dict[str, torch.Tensor] = {}
        self.grads: dict[str, torch.Tensor] = {}
        self._hooks = contextlib.ExitStack()

    def _hook(self, name: str):
        def forward_hook(module, args, output):
            self.inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda grad: self.grads.__setitem__(name, grad.detach()))
        return forward_hook

    def __enter__(self) -> "GradientCapture":
        self._hooks.enter_context(forward_hooks((get_module(self.model, name), self._hook(name))
                                                for names in self.modules.values() for name in names))
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.close()

    def clear(self) -> None:
        self.inputs.clear()
        self.grads.clear()


def _balance(x: torch.Tensor, d: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each position to x_t * c_t and d_t / c_t, which leaves every term of the identity unchanged.

    Output gradients can be huge where inputs are tiny (e.g. at a BOS token whose
    MLP input is zero): their Gram matrix would overflow in float32 and turn the
    zero contribution into 0 * inf = nan. Balancing the two factors' magnitudes
    keeps each Gram entry near the size of the term it contributes. Masked
    positions are zeroed with ``where`` so non-finite padding values cannot leak.
    """
    keep = mask.bool().unsqueeze(-1)
    x = torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))
    d = torch.where(keep, d, torch.zeros((), dtype=d.dtype, device=d.device))
    sx, sd = x.abs().amax(-1, keepdim=True), d.abs().amax(-1, keepdim=True)
    live = (sx > 0) & (sd > 0)
    c = torch.where(live, torch.sqrt(sd / torch.where(live, sx, 1)), 0)
    return x * c, torch.where(live, d / torch.where(live, c, 1), 0)


def _gram_products(x: torch.Tensor, d: torch.Tensor, mask: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(dot, squared norm old, squared norm new) as a (3, k, n) tensor, from k modules' x (k,2n,T,i) and d (k,2n,T,o).

    The k modules (same shapes, usually one per layer) go through each step together, so a pass
    launches the same few kernels whatever the number of layers; on a GPU, a loop over layers
    spends more time launching small kernels than computing them.
    """
    keep = mask.unsqueeze(0).expand(x.shape[0], -1, -1)
    x, d = _balance(x.to(dtype), d.to(dtype), keep)
    x_old, x_new, d_old, d_new = x[:, :n], x[:, n:], d[:, :n], d[:, n:]

    def inner(xa, da, xb, db):
        return (torch.matmul(da, db.transpose(-1, -2)) * torch.matmul(xa, xb.transpose(-1, -2))).sum(dim=(-2, -1))

    return torch.stack([inner(x_old, d_old, x_new, d_new), inner(x_old, d_old, x_old, d_old),
                        inner(x_new, d_new, x_new, d_new)])


STACK_ELEMENTS = 2**28  # at most this many activation elements per stack (1 GiB in float32), whatever the model


def default_modules_per_gram(device: torch.device, modules: dict[int, list[str]]) -> int:
    """How many same-shaped modules' Gram products to stack into one batch of kernels.

    On an accelerator all of them: a loop over layers launches dozens of small kernels per layer
    and the stacking copy is cheap. On a CPU one at a time: there are no launches to save, and the
    copy of every layer's activations cost 1.04-1.09x the time and up to 1.26x the extra memory of
    the one-at-a-time pass on the packaged models (benchmarks/bench_scoring.py, docs/performance.md).
    """
    return 1 if device.type == "cpu" else sum(len(names) for names in modules.values())


@contextlib.contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Parameters frozen, gradients flowing from the embedding output instead (HF's own switch)."""
    with trainable_only(model):
        model.enable_input_require_grads()
        try:
            yield
        finally:
            model.disable_input_require_grads()


class LayerGradientScorer:
    """Scores batches of requests on a model; hooks stay registered while it is used as a context."""

    def __init__(self, model: torch.nn.Module, tokenizer, adapter: Adapter, n_layers: int,
                 param_set: str = "out", device: torch.device | str = "cpu", modules_per_gram: int | None = None):
        if param_set not in PARAM_SETS:
            raise ValueError(f"unknown parameter set {param_set!r}; choose from {PARAM_SETS}")
        self.model, self.tokenizer, self.adapter = model, tokenizer, adapter
        self.layers = list(range(n_layers))
        self.param_set = param_set
        self.device = torch.device(device)
        self.capture = GradientCapture(model, {l: adapter.param_set_modules(l, param_set) for l in self.layers})
        self.modules_per_gram = modules_per_gram or default_modules_per_gram(self.device, self.capture.modules)
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> "LayerGradientScorer":
        self._stack.enter_context(scoring_mode(self.model))
        self._stack.enter_context(self.capture)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def score(self, requests: Sequence[EditRequest], valid: Sequence[bool] | None = None) -> RequestScores:
        """Scores of one batch. Rows with ``valid`` False are padding: run, but their loss weighs zero."""
        pairs = [encode_request_pair(self.tokenizer, r) for r in requests]
        batch = pair_batch(pairs, self.tokenizer.pad_token_id).to(self.device)
        weight = torch.tensor([1.0 if v else 0.0 for v in (valid or [True] * len(requests))] * 2,
                              device=self.device)
        self.capture.clear()
        losses = answer_nll(answer_logits(self.model, batch), batch)
        (losses * weight.to(losses.dtype)).sum().backward()
        n = len(requests)
        accumulate = torch.float64 if losses.dtype == torch.float64 else torch.float32
        dot, sq_old, sq_new = self._gram_products_by_layer(batch.attention_mask, n, accumulate)
        self.capture.clear()
        keep = np.asarray(valid if valid is not None else [True] * n, dtype=bool)
        loss = losses.detach().to("cpu", torch.float64).numpy()
        return RequestScores(dot=dot.numpy()[keep], norm_old=np.sqrt(sq_old.numpy())[keep],
                             norm_new=np.sqrt(sq_new.numpy())[keep], loss_old=loss[:n][keep],
                             loss_new=loss[n:][keep])

    def _gram_products_by_layer(self, mask: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
        """(3, n, layers) float64 sums of the captured modules' Gram products, on the host.

        Modules are grouped by their shapes (all of a layer stack's down_proj share one) and
        stacked ``modules_per_gram`` at a time (see ``default_modules_per_gram``), fewer where a
        stack would pass ``STACK_ELEMENTS``: on a 70B model every layer's activations at once would
        be gigabytes on top of the captured ones. The products leave the device in one copy and are
        summed per layer on the host, so no index tensor has to travel the other way.
        """
        by_shape: dict[tuple, list[tuple[int, str]]] = {}
        for column, layer in enumerate(self.layers):
            for name in self.capture.modules[layer]:
                if name in self.capture.grads:  # absent: every weight of it was masked out of the loss
                    shapes = (self.capture.inputs[name].shape, self.capture.grads[name].shape)
                    by_shape.setdefault(shapes, []).append((column, name))
        parts, columns = [], []
        for (x_shape, d_shape), members in by_shape.items():
            step = max(1, min(self.modules_per_gram, STACK_ELEMENTS // (x_shape.numel() + d_shape.numel())))
            for start in range(0, len(members), step):
                chunk = members[start:start + step]
                x = torch.stack([self.capture.inputs[name] for _, name in chunk])
                d = torch.stack([self.capture.grads[name] for _, name in chunk])
                parts.append(_gram_products(x, d, mask, n, dtype))
                columns += [column for column, _ in chunk]
        total = torch.zeros((3, n, len(self.layers)), dtype=torch.float64)
        if parts:
            products = torch.cat(parts, dim=1).to("cpu", torch.float64)  # (3, modules, n)
            total.index_add_(2, torch.tensor(columns), products.transpose(1, 2))
        return total

def score_requests(scorer: LayerGradientScorer, requests: Sequence[EditRequest], batch_size: int,
                   progress: bool = True, description: str = "scoring requests") -> RequestScores:
    """Score requests in batches of ``batch_size`` in this process, with a progress bar."""

    parts = []
    with tqdm(total=len(requests), desc=description, unit="req", disable=not progress, mininterval=1.0) as bar:
        for start in range(0, len(requests), batch_size):
            chunk = requests[start:start + batch_size]
            parts.append(scorer.score(chunk))
            bar.update(len(chunk))
    return RequestScores.concat(parts)
