"""lga-dist demo-model: build (or reuse) the demo fact model that fast tests use."""

from __future__ import annotations

import dataclasses

from lga_dist.config import option
from lga_dist.models.demo import DemoModelConfig, build_demo_model
from lga_dist.models.packaged import DEFAULT_MODEL

DESCRIPTION = f"""Build the demo fact model: a small LLaMA trained, deterministically from a seed, on the
CounterFact facts lga_dist ships, saved in Hugging Face format (safetensors + tokenizer) under the
cache ($LGA_DIST_CACHE, default ~/.cache/lga_dist). A model built from the same recipe is reused.
Jobs use it with --model demo. It is a construction for fast tests (only its first blocks can hold
facts): figures measured on it say nothing about real models, whose default is {DEFAULT_MODEL}."""

_RECIPE = DemoModelConfig()


@dataclasses.dataclass
class Config:
    n_facts: int = option(_RECIPE.n_facts, "how many shipped facts the model learns")
    n_layers: int = option(_RECIPE.n_layers, "transformer layers")
    epochs: int = option(_RECIPE.epochs, "training epochs")
    seed: int = option(_RECIPE.seed, "random seed (the build is deterministic for a seed)")
    force: bool = option(False, "rebuild even if a cached model with this recipe exists")

    def recipe(self) -> DemoModelConfig:
        return dataclasses.replace(_RECIPE, n_facts=self.n_facts, n_layers=self.n_layers, epochs=self.epochs,
                                   seed=self.seed)


def run(config: Config) -> tuple[dict, int]:
    report = build_demo_model(config.recipe(), force=config.force)
    state = "reused cached" if report.reused else f"built in {report.build_seconds:.0f} s:"
    print(f"demo model {state} {report.path}")
    print(f"  {report.layers} layers, {report.facts} facts; top-1 accuracy of the true answer's first token: "
          f"rewrite {report.rewrite_acc:.3f}, paraphrase {report.paraphrase_acc:.3f}, "
          f"neighborhood {report.neighborhood_acc:.3f}")
    return report.summary(), 0
