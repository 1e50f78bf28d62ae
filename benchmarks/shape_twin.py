"""A model's shape twin: its config and tokenizer with random weights, for timing where its weights cannot go.

A benchmark's time depends on a model's shapes (layers, widths, vocabulary, tokenizer), not on its
weights' values, so a twin times like the model it copies. It is for machines the weights cannot
reach: the device machine takes 64 MiB of files, and gemma3-270m's weights alone are 1 GB. Two steps:

  where the model is:     write its skeleton, config.json and the tokenizer's files (a few MB)
      python benchmarks/shape_twin.py gemma3-270m twins/gemma3-270m --skeleton
  where the timing runs:  give the skeleton random weights (seed 0), saved as safetensors
      python benchmarks/shape_twin.py twins/gemma3-270m /tmp/twins/gemma3-270m

Only timings mean anything on a twin: its scores and edits are those of a random model (target
optimisation, for one, never meets its early-stopping loss, so every request runs every step).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

WEIGHT_SUFFIXES = (".safetensors", ".gguf", ".bin", ".pt", ".pth")


def write_skeleton(model: str, out: Path) -> None:
    """Every file of the model's directory but its weights (and the GGUF conversion's marker: a twin is no
    conversion)."""
    from lga_dist.models.gguf import CONVERTED_MARKER
    from lga_dist.models.sources import resolve_model

    source = Path(resolve_model(model, progress=False))
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith((*WEIGHT_SUFFIXES, ".index.json", CONVERTED_MARKER)):
            shutil.copy2(path, out / path.name)


def write_twin(skeleton: Path, out: Path, seed: int = 0) -> None:
    """The skeleton's files and a randomly initialised model of its config."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(skeleton)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    shutil.copytree(skeleton, out, dirs_exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    print(f"{out}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M random parameters, "
          f"{config.num_hidden_layers} layers")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="with --skeleton: a packaged model name or model directory; else a skeleton")
    parser.add_argument("out", type=Path)
    parser.add_argument("--skeleton", action="store_true", help="write the config and tokenizer only")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.skeleton:
        write_skeleton(args.source, args.out)
    else:
        write_twin(Path(args.source), args.out, args.seed)


if __name__ == "__main__":
    main()
