"""bulk-edit: apply thousands of edit requests at the layer(s) a ranking names, resumably."""

from __future__ import annotations

from lga_dist.console import format_table
from lga_dist.models.packaged import DEFAULT_MODEL
from lga_dist.workflows.bulk_edit import BulkEditJob, bulk_edit

DESCRIPTION = f"""Edit a model with many requests at the layer(s) its LGA ranking names, and write the edited model.

Layers come from --ranking (checked against the model's fingerprint): the golden layer for ROME
and FT-L; for MEMIT and AlphaEdit a window of --window layers ending at (or, with --window-align
center, around) it; --layers names them instead. Requests are read from every JSON/JSONL/Parquet
file under --requests (local or s3:// prefixes, formats mixed), validated, and quarantined with
reasons in OUT/quarantine.jsonl;
requests that give one subject and prompt different targets follow --on-conflict. The valid
requests are applied in batches of --batch-size, one batch after another, so later batches see
earlier edits (ROME: the batch's independent rank-one updates are applied together).

With --actors N the model is sharded over N Ray actors with DeepSpeed ZeRO-3: each batch's
per-request work (target optimisation, keys, evaluation) is split across them, and each layer's
update is solved once in float64 and applied to every shard. Every --checkpoint-every batches
are committed to OUT/progress/ (edited weights + manifest), so a killed job rerun with the same
command continues from the last committed batch and ends with the same weights.

Writes OUT/model/ (safetensors, tokenizer, edits.jsonl), OUT/eval.parquet (every request's
metrics before and after), OUT/summary.parquet, OUT/edit_curve.png (efficacy and neighborhood
success of --probe requests over the number of edits applied) and OUT/quarantine.jsonl.
With no arguments it edits the packaged real model {DEFAULT_MODEL} with 500 of the shipped CounterFact
facts at the layers of its own ranking (computed into OUT/ranking/ first); --model demo is the
small demo fact model for quick trials."""


Config = BulkEditJob

def run(config: Config) -> tuple[dict, int]:
    result = bulk_edit(config)
    if result.rejected is not None:
        return result.summary(), 1
    print(format_table([{"": when, **{k: round(v, 3) for k, v in metrics.items()}}
                        for when, metrics in (("before", result.before), ("after", result.after))]))
    print(f"edited model written to {result.saved} (fingerprint {result.saved_fingerprint[:19]}...)")
    return result.summary(), 0
