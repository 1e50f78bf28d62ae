"""Reading and rewriting what modules compute, and choosing which weights train: the hooks every method uses.

In the spirit of ROME/MEMIT's ``nethook``: LGA's gradient capture, target
optimisation (a vector added at the subject), causal tracing (noise in, clean
states put back), keys and covariance statistics (a module's input) all attach
forward hooks to named modules for the length of a ``with`` block, and the
optimisation steps freeze every weight but the ones they train. Hooks and
``requires_grad`` flags are always put back, also when the block raises.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator

import torch

# A forward hook: (module, positional inputs, output) -> None to observe, or a new output to replace it.
Hook = Callable[[torch.nn.Module, tuple, Any], Any]


@contextlib.contextmanager
def forward_hooks(hooks: Iterable[tuple[torch.nn.Module, Hook]]) -> Iterator[None]:
    """Each hook registered on its module while the block runs; all removed on exit."""
    handles = []
    try:
        for module, hook in hooks:
            handles.append(module.register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


def hidden_of(output: Any) -> torch.Tensor:
    """The hidden states in a module's output (decoder blocks return a tuple whose first item they are)."""
    return output[0] if isinstance(output, tuple) else output


def with_hidden(output: Any, hidden: torch.Tensor) -> Any:
    """``output`` with its hidden states replaced, in the same structure."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def trainable_only(model: torch.nn.Module, parameters: Iterable[torch.nn.Parameter] = ()) -> Iterator[None]:
    """Every parameter of ``model`` frozen except ``parameters`` (none: all frozen); flags restored on exit."""
    keep = {id(p) for p in parameters}
    states = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in states:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, state in states:
            p.requires_grad_(state)


def _passthrough(hidden_states, *_args, **_kwargs):
    """A skipped block: hands on whatever it was given (block ``start`` then reads the cached state)."""
    return hidden_states


def _replace_input(hidden: torch.Tensor):
    def hook(_module, args, kwargs):
        if args:
            return (hidden, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}
    return hook


@contextlib.contextmanager
def _skipping(blocks: list[torch.nn.Module]) -> Iterator[None]:
    try:
        for block in blocks:
            block.forward = _passthrough
        yield
    finally:
        for block in blocks:
            if "forward" in vars(block):
                del block.forward


def block_input(model: torch.nn.Module, blocks: torch.nn.ModuleList, start: int, **inputs) -> torch.Tensor:
    """The hidden states entering block ``start`` (no grad), computing only the blocks below it."""
    seen: list[torch.Tensor] = []

    def capture(_module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach())

    handle = blocks[start].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad(), _skipping(list(blocks)[start:]):
            model.base_model(**inputs)
    finally:
        handle.remove()
    return seen[0]


@contextlib.contextmanager
def run_from_block(blocks: torch.nn.ModuleList, start: int, hidden: torch.Tensor) -> Iterator[None]:
    """Forwards inside the block skip blocks ``0..start-1`` and feed block ``start`` with ``hidden``.

    Exact when ``hidden`` is ``block_input`` of the same inputs and nothing changes below ``start``
    (target optimisation adds its vector at block ``start`` or above): the skipped blocks would
    compute ``hidden`` again. They are skipped in place, not removed, so every module still runs in
    the same order (per-layer attention types, ZeRO-3's gather order) and returns its input.
    """
    if start == 0:
        yield
        return
    handle = blocks[start].register_forward_pre_hook(_replace_input(hidden), with_kwargs=True)
    try:
        with _skipping(list(blocks)[:start]):
            yield
    finally:
        handle.remove()
