"""edit: ROME, MEMIT, AlphaEdit or FT-L at the layer(s) you name, in this process, evaluated before and after.

Two protocols: 'single' edits each request alone from the unedited model and
restores it (the papers' per-request evaluation, what the validation grid does
at every layer); 'batch' applies batches one after another with ``apply_batch``,
the same update bulk-edit applies, and can save the edited model.
"""

from __future__ import annotations

import dataclasses
import time

import pyarrow as pa
from tqdm.auto import tqdm

from lga_dist.config import ConfigError, option, section
from lga_dist.devices import resolve_device
from lga_dist.editing import METHODS, apply_batch, edit_each, edit_window, parse_layers, prepare_statistics, save_edited
from lga_dist.editing.context import FACT_TOKENS
from lga_dist.editing.sweep import parse_sweep, settings_in_turn
from lga_dist.editing.prepare import corpus_texts, edit_context, evaluate_alone, method_hparams
from lga_dist.evaluation import aggregate, evaluate_requests, evaluation_table, headline
from lga_dist.io.requests import read_requests
from lga_dist.io.storage import exists, join, makedirs, write_parquet
from lga_dist.lga.ranking import golden_layer, read_ranking
from lga_dist.models import DTYPES, load_model, resolve_model
from lga_dist.models.demo_data import demo_requests_path
from lga_dist.models.loading import read_model_config
from lga_dist.workflows.new_facts import NEW_FACTS_ONLY_HELP, unknown_to
from lga_dist.workflows.options import EditingOptions, ModelOptions, OutputOptions

SINGLE_CHUNK = 16  # --mode single: requests whose (independent) targets are optimised in one batch


@dataclasses.dataclass
class EditJob:
    """Which requests to edit, where, with which method and protocol (the edit flags)."""

    layers: str | None = option(None, "layer(s) to edit: 'L', 'L1,L2' or 'A-B' (MEMIT/AlphaEdit spread over them); "
                                "or give --ranking")
    ranking: str | None = option(None, "ranking.parquet of this model: edit at its golden layer (MEMIT/AlphaEdit: "
                                 "--window layers around it, the same layers bulk-edit would edit)")
    requests: list[str] = option([], "edit request files (default: the shipped CounterFact facts, from the 501st on)",
                                 metavar="PATH")
    limit: int = option(50, "edit the first N valid requests")
    new_facts_only: bool = option(False, NEW_FACTS_ONLY_HELP)
    mode: str = option("auto", "'single': each request alone, restored after; 'batch': sequential batches, kept "
                       "(auto: single for rome, batch otherwise)", choices=("auto", "single", "batch"))
    batch_size: int = option(0, "--mode batch: requests per update, each computed from the weights before it "
                             "(ROME: the batch's rank-one updates summed, so 1 = ROME's sequential protocol; 0: all "
                             "at once)")
    save: bool = option(False, "--mode batch: write the edited model to OUT/model")
    sweep: str | None = option(None, "compare values of one hyper-parameter, NAME=V1,V2,...: one update of all the "
                               "requests per value, each from the unedited model and undone after its evaluation "
                               "(targets optimised once when only the solve changes, e.g. mom2_update_weight); "
                               "writes OUT/sweep.parquet and names the value with the best Score",
                               metavar="NAME=VALUES")
    fact_token: str = option("subject_last", "where keys and targets are read", choices=FACT_TOKENS)
    model: ModelOptions = section(ModelOptions, "model (edit runs in this process)")
    editing: EditingOptions = section(EditingOptions, "editing", method="rome")
    output: OutputOptions = section(OutputOptions, "output", out="out/edit")

    def validate(self) -> None:
        if self.limit < 1:
            raise ConfigError("--limit must be at least 1")
        if (self.layers is None) == (self.ranking is None):
            raise ConfigError("name the layers to edit: --layers L (e.g. the golden layer validate-golden measured) "
                              "or --ranking OUT/ranking.parquet (its golden layer); there is no default layer")
        if self.layers is not None:
            parse_layers(self.layers)
        if self.sweep is not None:
            if self.mode == "single" or self.save or self.batch_size:
                raise ConfigError("--sweep measures one update of all the requests per value, undone after it: "
                                  "leave out --mode single, --save and --batch-size")
            parse_sweep(self.sweep, self.editing.method)


def edit(config: EditJob) -> EditReport:
    """Evaluate, edit (single or batch protocol), evaluate again; write OUT/eval.parquet (and OUT/model)."""

    started = time.perf_counter()
    method = METHODS[config.editing.method]
    mode = config.mode if config.mode != "auto" else (
        "single" if config.editing.method == "rome" and config.sweep is None else "batch")
    if config.save and mode != "batch":
        raise ConfigError("--save keeps an edited model: use --mode batch")
    if exists(join(config.output.out, "eval.parquet")) and not config.output.overwrite:
        raise ConfigError(f"{config.output.out} already holds an edit's results (eval.parquet); pass --overwrite to "
                          f"replace them or choose another --out")
    device = resolve_device(config.model.device)
    model_path = config.model.model
    loaded = load_model(model_path, dtype=DTYPES[config.model.resolve_dtype(
        read_model_config(resolve_model(model_path)), on_accelerator=device.type != "cpu")], device=device)
    if config.layers is not None:
        layers = parse_layers(config.layers, loaded.n_layers, loaded.model_id)
    else:  # the ranking must be of these very weights
        table, _ = read_ranking(config.ranking, expected_fingerprint=loaded.fingerprint)
        layers = edit_window(golden_layer(table), config.editing.method, config.editing.window, loaded.n_layers,
                             config.editing.window_align)
        print(f"editing at layers {layers}: golden layer {golden_layer(table)} of {config.ranking}")
    if config.requests:
        requests = read_requests(config.requests, quarantine=join(config.output.out, "quarantine.jsonl")).requests
    else:  # shipped facts the ranking's default proxy (drawn from the first 500) did not see
        requests = read_requests([str(demo_requests_path())], quarantine=join(config.output.out, "quarantine.jsonl")
                                 ).requests[500:]
    requests = unknown_to(loaded, requests, config.limit, device) if config.new_facts_only else \
        requests[:config.limit]
    if not requests:
        raise ConfigError("no valid requests to edit; see " + join(config.output.out, "quarantine.jsonl"))
    makedirs(config.output.out)  # only now: a run that fails on its input leaves no empty OUT behind
    texts = corpus_texts(config.editing.corpus, config.editing.corpus_column)
    hparams = method_hparams(config.editing.method, config.editing.hparam, config.fact_token, config.model.model)
    ctx = edit_context(loaded, texts, config.editing.cov_tokens, config.editing.stats_dir, device,
                       config.output.progress)
    print(f"{config.editing.method} at layer(s) {layers} of {loaded.model_id}, {len(requests)} requests, mode {mode}")
    prepare_statistics(config.editing.method, ctx, layers)
    pre = evaluate_requests(loaded.model, loaded.tokenizer, requests, device)
    context = {"method": config.editing.method, "layers": ",".join(map(str, layers)), "mode": mode,
               "model_id": loaded.model_id, "model_fingerprint": loaded.fingerprint}
    if config.sweep is not None:
        return _sweep(config, ctx, loaded, requests, layers, hparams, pre, context, started)
    records, post = [], []

    if mode == "single":
        bar = tqdm(total=len(requests), desc="editing", unit="req", disable=not config.output.progress)
        for start in range(0, len(requests), SINGLE_CHUNK):
            chunk = requests[start:start + SINGLE_CHUNK]
            results = edit_each(method, ctx, chunk, layers, hparams)
            post += evaluate_alone(loaded, chunk, results, device)
            records += [result.record for result in results]
            bar.update(len(chunk))
        bar.close()
    else:
        size = config.batch_size or len(requests)
        batches = [requests[i:i + size] for i in range(0, len(requests), size)]
        for number, batch in enumerate(tqdm(batches, desc="editing", unit="batch", disable=not config.output.progress)):
            records.append(apply_batch(config.editing.method, ctx, batch, layers, hparams, number).record)
        post = evaluate_requests(loaded.model, loaded.tokenizer, requests, device)
    write_parquet(evaluation_table(requests, pre, post, context), join(config.output.out, "eval.parquet"))
    summary_pre, summary_post = aggregate(pre), aggregate(post)
    summary = {"method": config.editing.method, "layers": layers, "n": len(requests), "mode": mode,
               "pre": headline(summary_pre), "post": headline(summary_post), "out": config.output.out,
               "model_id": loaded.model_id, "model_fingerprint": loaded.fingerprint,
               "seconds": round(time.perf_counter() - started, 2)}
    if config.save:
        summary["saved_fingerprint"] = save_edited(loaded.model, loaded.tokenizer, join(config.output.out, "model"),
                                                   records)
        summary["saved"] = join(config.output.out, "model")
    return EditReport(before=summary_pre, after=summary_post, summary=summary)


def _sweep(config: EditJob, ctx, loaded, requests, layers, hparams, pre, context, started) -> EditReport:
    """--sweep: one update per value of the swept hyper-parameter, evaluated, undone; OUT/sweep.parquet."""
    name, values = parse_sweep(config.sweep, config.editing.method)
    settings = [dataclasses.replace(hparams, **{name: value}) for value in values]
    tables, after = [], {}
    bar = tqdm(total=len(values), desc=f"sweeping {name}", unit="value", disable=not config.output.progress)
    for value, _ in zip(values, settings_in_turn(config.editing.method, ctx, requests, layers, settings)):
        post = evaluate_requests(loaded.model, loaded.tokenizer, requests, ctx.device)
        tables.append(evaluation_table(requests, pre, post, {**context, "sweep": name, "value": str(value)}))
        after[value] = aggregate(post)
        bar.update(1)
    bar.close()
    write_parquet(pa.concat_tables(tables), join(config.output.out, "sweep.parquet"))
    best = max(values, key=lambda value: (after[value]["Score"], -values.index(value)))
    # equal Scores: the first value given is named best, and the others are listed beside it
    tied = [value for value in values if value != best and after[value]["Score"] == after[best]["Score"]]
    summary = {"method": config.editing.method, "layers": layers, "n": len(requests), "sweep": name,
               "pre": headline(aggregate(pre)),
               "post": [{"value": value, **headline(after[value])} for value in values], "best": best,
               "best_tied_with": tied,
               "out": config.output.out, "model_id": loaded.model_id, "model_fingerprint": loaded.fingerprint,
               "seconds": round(time.perf_counter() - started, 2)}
    return EditReport(before=aggregate(pre), after=after[best], summary=summary, swept=after)


@dataclasses.dataclass
class EditReport:
    """Mean metrics before and after (after the best value's update, with --sweep), and the summary line's dict."""

    before: dict[str, float]
    after: dict[str, float]
    summary: dict
    swept: dict | None = None  # --sweep: the mean metrics after each value's update
