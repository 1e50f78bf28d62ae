"""Which torch device a job in this process runs on: never a hard-coded "cuda"."""

from __future__ import annotations

import resource

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


def peak_rss_gb() -> float:
    """This process's peak resident set size so far, GB: what a node must hold for it (Linux reports
    ``ru_maxrss`` in KiB). On an accelerator the weights live elsewhere; this is the host's share."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 3)
