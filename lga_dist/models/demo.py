"""The embedded demo fact model: a small LLaMA that knows the shipped CounterFact facts.

It exists so every job runs on a laptop with no downloads. It is trained from
scratch, deterministically from a seed: a byte-level BPE tokenizer built with
`tokenizers` on the facts' text, then a LLaMA-architecture causal LM trained to
complete each fact's rewrite prompt, paraphrase prompt and neighborhood prompt
with its true answer (loss on the answer tokens only). The result is saved in
Hugging Face format under the cache and reused while its recipe is unchanged.

Why the recipe fixes where facts live: a model this small, trained on one fact
per subject, otherwise copies the subject's tokens to the prompt's last token
and looks the fact up there, where no locate-then-edit method reaches. So each
subject is one token, the input embeddings stay at their random initialisation,
the first ``store_layers`` blocks are MLP-only (attention output fixed at zero)
and the rest attention-only (MLP output fixed at zero). The facts then have to
be stored by MLPs at the subject's token and read from there by later
attention, the layout ROME's causal tracing found in GPT-2 and GPT-J, so edits
at the right layers take and the validation job has something to find. The
checkpoint is an ordinary LlamaForCausalLM (the fixed weights are zeros).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from lga_dist.answers import PromptAnswer, answer_logits, collate, encode_prompt_answer
from lga_dist.io.requests import EditRequest
from lga_dist.io.storage import cache_root
from lga_dist.models.demo_data import demo_requests_path, demo_support_path, load_demo_requests, load_demo_support

SPECIAL = "<|endoftext|>"
RECIPE_VERSION = 2  # bump when the training code changes what a given config produces


@dataclasses.dataclass(frozen=True)
class DemoModelConfig:
    """Size and training recipe of the demo model; its hash names the cache entry."""

    n_facts: int = 1000
    n_layers: int = 10
    hidden_size: int = 128
    intermediate_size: int = 512
    n_heads: int = 4
    vocab_size: int = 2048
    epochs: int = 20
    batch_size: int = 64
    learning_rate: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    seed: int = 0
    store_layers: int = 5  # blocks [0, store_layers) are MLP-only, the rest attention-only (0: all ordinary)
    one_token_subjects: bool = True
    freeze_input_embeddings: bool = True

    def key(self) -> str:
        payload = json.dumps({**dataclasses.asdict(self), "recipe": RECIPE_VERSION,
                              "data": _file_sha256(demo_requests_path()),
                              "support": _file_sha256(demo_support_path())}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]


@dataclasses.dataclass
class DemoModelReport:
    path: str
    layers: int
    facts: int
    rewrite_acc: float
    paraphrase_acc: float
    neighborhood_acc: float
    build_seconds: float
    reused: bool

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def demo_facts(n_facts: int) -> list[EditRequest]:
    return load_demo_requests()[:n_facts]


def learned_facts(facts: list[EditRequest]) -> list[EditRequest]:
    """``facts`` plus the shipped support facts whose true answer is a new target none of ``facts`` answers."""
    answers = {f.target_true for f in facts} | {a for f in facts for a in f.neighborhood_answers}
    wanted = {f.target_new for f in facts} - answers
    return list(facts) + [s for s in load_demo_support() if s.target_true in wanted]


def training_text(n_facts: int) -> list[str]:
    """Every "prompt answer" the demo model learned: its own ordinary text (C's corpus for it)."""
    return [prompt + " " + answer for prompt, answer in training_pairs(learned_facts(demo_facts(n_facts)))]


def training_pairs(facts: list[EditRequest]) -> list[tuple[str, str]]:
    """(prompt, answer) pairs the model learns: rewrite, paraphrases and neighborhood prompts."""
    pairs = []
    for fact in facts:
        pairs.append((fact.prompt, fact.target_true))
        pairs.extend((p, fact.target_true) for p in fact.paraphrase_prompts)
        pairs.extend(zip(fact.neighborhood_prompts, fact.neighborhood_answers))
    return pairs


def build_tokenizer(facts: list[EditRequest], vocab_size: int, one_token_subjects: bool = False):
    """Byte-level BPE over the facts' text (new targets included, so edits can be spelled).

    With ``one_token_subjects`` each subject is an added token, matched without its
    leading space, so a subject is the same token wherever it stands.
    """

    texts = [f"{p} {a}" for p, a in training_pairs(facts)] + [f" {f.target_new}" for f in facts]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(texts, trainer)
    core.post_processor = processors.TemplateProcessing(single=f"{SPECIAL} $A", pair=f"{SPECIAL} $A $B",
                                                        special_tokens=[(SPECIAL, 0)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=SPECIAL, eos_token=SPECIAL,
                                        pad_token=SPECIAL, unk_token=None, model_max_length=128)
    if one_token_subjects:
        tokenizer.add_tokens([AddedToken(s, normalized=False) for s in sorted({f.subject for f in facts})])
    return tokenizer


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[PromptAnswer]:
    return [encode_prompt_answer(tokenizer, prompt, answer) for prompt, answer in pairs]


def _training_batch(items: list[PromptAnswer], pad_id: int) -> dict[str, torch.Tensor]:
    """HF causal-LM inputs whose labels are the answer tokens only (-100 elsewhere)."""
    batch = collate(items, pad_id)
    labels = torch.full_like(batch.input_ids, -100)
    real = batch.answer_mask.bool()
    rows = torch.arange(len(items)).unsqueeze(1).expand_as(batch.predict_positions)
    labels[rows[real], batch.predict_positions[real] + 1] = batch.answer_ids[real]
    return {"input_ids": batch.input_ids, "labels": labels, "attention_mask": batch.attention_mask}


def _length_bucketed_batches(encoded: list[PromptAnswer], batch_size: int,
                             generator: torch.Generator, pool: int = 32) -> list[list[int]]:
    """Shuffled batches of similar-length sequences: padding, not learning, is what costs on CPU."""
    order = torch.randperm(len(encoded), generator=generator).tolist()
    batches = []
    for start in range(0, len(order), batch_size * pool):
        chunk = sorted(order[start:start + batch_size * pool], key=lambda i: len(encoded[i].input_ids))
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffled = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffled]


def make_model(config: DemoModelConfig, tokenizer):
    model_config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads, num_key_value_heads=config.n_heads,
        max_position_embeddings=128, rms_norm_eps=1e-5, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(model_config)
    fix_block_roles(model, config.store_layers)
    if config.freeze_input_embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    return model


@torch.no_grad()
def fix_block_roles(model, store_layers: int) -> None:
    """Blocks below ``store_layers`` keep only their MLP, the others only their attention.

    The dropped half's output projection is set to zero and frozen, so the block
    adds nothing through it and training never revives it.
    """
    if store_layers <= 0:
        return
    if store_layers >= len(model.model.layers):
        raise ValueError(f"store_layers={store_layers} leaves no attention block to read the facts "
                         f"({len(model.model.layers)} layers)")
    for index, block in enumerate(model.model.layers):
        dropped = block.self_attn.o_proj if index < store_layers else block.mlp.down_proj
        dropped.weight.zero_()
        dropped.weight.requires_grad_(False)


def train(model, encoded: list[PromptAnswer], config: DemoModelConfig, pad_id: int,
          progress: Callable[[int, int, float], None] | None = None) -> None:
    generator = torch.Generator().manual_seed(config.seed)
    trainable = [p for p in model.parameters() if p.requires_grad]  # fixed weights get no decay either
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  betas=(0.9, 0.98))
    steps_per_epoch = math.ceil(len(encoded) / config.batch_size)
    total = steps_per_epoch * config.epochs

    def schedule(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        return 0.5 * (1 + math.cos(math.pi * (step - config.warmup_steps) / max(1, total - config.warmup_steps)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    model.train()
    step = 0
    for _ in range(config.epochs):
        for indices in _length_bucketed_batches(encoded, config.batch_size, generator):
            batch = _training_batch([encoded[i] for i in indices], pad_id)
            loss = model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            step += 1
            if progress:
                progress(step, total, loss.item())
    model.eval()


@torch.no_grad()
def first_token_accuracy(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 128) -> float:
    """Share of prompts whose top-1 next token is the answer's first token."""
    if not pairs:
        return float("nan")
    hits = 0
    for start in range(0, len(pairs), batch_size):
        batch = collate(encode_pairs(tokenizer, pairs[start:start + batch_size]), tokenizer.pad_token_id)
        predicted = answer_logits(model, batch)[:, 0].argmax(-1)
        hits += int((predicted == batch.answer_ids[:, 0]).sum())
    return hits / len(pairs)


def evaluate_facts(model, tokenizer, facts: list[EditRequest]) -> dict[str, float]:
    return {
        "rewrite_acc": first_token_accuracy(model, tokenizer, [(f.prompt, f.target_true) for f in facts]),
        "paraphrase_acc": first_token_accuracy(
            model, tokenizer, [(p, f.target_true) for f in facts for p in f.paraphrase_prompts]),
        "neighborhood_acc": first_token_accuracy(
            model, tokenizer, [pa for f in facts for pa in zip(f.neighborhood_prompts, f.neighborhood_answers)]),
    }


def demo_model_dir(config: DemoModelConfig = DemoModelConfig(), root: Path | None = None) -> Path:
    return (root or cache_root()) / "demo-model" / f"lga-demo-llama-{config.key()}"


def build_demo_model(config: DemoModelConfig = DemoModelConfig(), *, root: Path | None = None,
                     force: bool = False, show_progress: bool = True) -> DemoModelReport:
    """Build the demo model into the cache, or reuse the cached one built from the same recipe."""
    target = demo_model_dir(config, root)
    report_file = target / "demo_report.json"
    if report_file.exists() and not force:
        return DemoModelReport(**{**json.loads(report_file.read_text()), "path": str(target), "reused": True})
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    facts = demo_facts(config.n_facts)
    learned = learned_facts(facts)
    tokenizer = build_tokenizer(learned, config.vocab_size, config.one_token_subjects)
    model = make_model(config, tokenizer)
    encoded = encode_pairs(tokenizer, training_pairs(learned))
    bar = None
    if show_progress:
        bar = tqdm(total=math.ceil(len(encoded) / config.batch_size) * config.epochs, desc="training demo model",
                   unit="step", mininterval=2.0)

    def progress(step: int, total: int, loss: float) -> None:
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss:.3f}")

    train(model, encoded, config, tokenizer.pad_token_id, progress)
    if bar is not None:
        bar.close()
    accuracy = evaluate_facts(model, tokenizer, facts)
    report = DemoModelReport(path=str(target), layers=config.n_layers, facts=len(facts),
                             build_seconds=round(time.perf_counter() - started, 1), reused=False,
                             **{k: round(v, 4) for k, v in accuracy.items()})
    staging = target.with_name(target.name + f".building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    (staging / "demo_report.json").write_text(json.dumps({k: v for k, v in report.summary().items()
                                                          if k not in ("path", "reused")}, indent=1))
    (staging / "demo_recipe.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    return report
