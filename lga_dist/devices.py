"""Which torch device a job in this process runs on: never a hard-coded "cuda"."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """``name`` itself, or for 'auto' the accelerator torch finds (CUDA, MPS, XPU...), else the CPU."""
    if name != "auto":
        return torch.device(name)
    if hasattr(torch, "accelerator") and torch.accelerator.is_available():
        return torch.accelerator.current_accelerator()
    return torch.device("cpu")


def synchronize(device: torch.device | str) -> None:
    """Wait until the device has run everything queued on it (an accelerator runs asynchronously, so a
    timing without this measures the launches); nothing to wait for on a CPU."""
    if torch.device(device).type != "cpu":
        torch.accelerator.synchronize()
