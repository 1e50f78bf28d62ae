"""Helpers for tests: free ports and running the console script."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def kill_an_actor_and_finish(job: subprocess.Popen, actor_class: str, ready, timeout: float = 900
                             ) -> tuple[str, str]:
    """Once ``ready()``, SIGKILL one of the running job's two ``actor_class`` actors and let the job
    finish; returns (stdout, stderr). The job's process group is killed if it is still running after."""
    import signal
    import time

    import psutil

    try:
        deadline = time.time() + timeout
        while not ready():
            assert job.poll() is None, job.communicate()[1][-3000:]
            assert time.time() < deadline, f"{actor_class} job not ready within {timeout}s"
            time.sleep(0.2)
        # Only this job's own process tree (its private Ray's raylet starts the actors), never a
        # machine-wide search that could hit another job's actors.
        victims = [p.pid for p in psutil.Process(job.pid).children(recursive=True)
                   if any(actor_class in part for part in (_cmdline(p) or []))]
        assert len(victims) == 2, victims
        os.kill(victims[1], signal.SIGKILL)
        return job.communicate(timeout=timeout)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)


def _cmdline(process) -> list[str] | None:
    import psutil

    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None, timeout: int = 900):
    """Run ``lga-dist`` in a subprocess; returns (exit code, stdout, stderr, parsed last-line summary)."""
    process = subprocess.run([sys.executable, "-m", "lga_dist.cli", *args], capture_output=True, text=True,
                             env={**os.environ, **(env or {})}, cwd=cwd or REPO, timeout=timeout)
    lines = process.stdout.strip().splitlines()
    try:
        summary = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        summary = None  # e.g. --help
    return process.returncode, process.stdout, process.stderr, summary


def tiny_config(family: str, n_layers: int = 3, vocab_size: int = 300):
    """A small randomly initialised config of each supported family, from transformers' own config classes."""
    import transformers

    common = {"vocab_size": vocab_size}
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=n_layers, n_embd=32, n_head=2, n_positions=64, **common)
    if family == "gptj":
        return transformers.GPTJConfig(n_layer=n_layers, n_embd=32, n_head=2, rotary_dim=8, n_positions=64, **common)
    if family == "gpt_neox":
        return transformers.GPTNeoXConfig(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=2,
                                          intermediate_size=64, max_position_embeddings=64, **common)
    if family == "gemma3":  # sliding and full attention layers both, as in the real stacks
        layer_types = (["sliding_attention", "full_attention"] * n_layers)[:n_layers]
        return transformers.Gemma3TextConfig(num_hidden_layers=n_layers, hidden_size=32, intermediate_size=64,
                                             num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                             max_position_embeddings=64, sliding_window=4,
                                             layer_types=layer_types, **common)
    classes = {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
               "qwen2": transformers.Qwen2Config}
    return classes[family](num_hidden_layers=n_layers, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                           num_key_value_heads=2, max_position_embeddings=64, **common)


FAMILIES = ("gpt2", "gptj", "gpt_neox", "llama", "mistral", "qwen2", "gemma3")


def save_tiny_model(directory: Path, family: str = "llama", seed: int = 0, n_layers: int = 3) -> Path:
    """Save a random model of ``family`` with a real tokenizer (the demo tokenizer on a few facts)."""
    import torch
    import transformers

    from lga_dist.models.demo import build_tokenizer, demo_facts

    tokenizer = build_tokenizer(demo_facts(40), 300)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(family, n_layers, len(tokenizer)))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def write_tiny_gguf(path: Path, seed: int = 0, n_layers: int = 2):
    """A random small LLaMA written as a float32 GGUF with the gguf package's own writer; returns the model.

    Tensors are named and laid out as llama.cpp's converter does (its name map; q/k rows permuted for
    its RoPE), and a sentencepiece vocabulary of letters travels in the file, so transformers' GGUF
    reader sees what it sees in a real file."""
    import gguf
    import numpy as np
    import torch
    import transformers

    letters = list("abcdefghijklmnopqrstuvwxyz")
    tokens = ["<unk>", "<s>", "</s>", "\u2581"] + letters + ["\u2581" + c for c in letters]
    hidden, heads = 32, 2
    config = transformers.LlamaConfig(vocab_size=len(tokens), hidden_size=hidden, intermediate_size=64,
                                      num_hidden_layers=n_layers, num_attention_heads=heads, num_key_value_heads=heads,
                                      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(n_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(64)
    writer.add_head_count(heads)
    writer.add_head_count_kv(heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 4 + [-1.0] * 26 + [-2.0] * 26)
    writer.add_token_types([2, 3, 3, 1] + [1] * 52)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    for name, tensor in model.state_dict().items():
        data = tensor.numpy().astype(np.float32)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            data = data.reshape(heads, 2, data.shape[0] // heads // 2, data.shape[1]).swapaxes(1, 2).reshape(data.shape)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight",)), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model
