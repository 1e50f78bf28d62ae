"""``lga-dist <job> ...``: one console script for every job; ``jobs/*.py`` call ``run_command`` too.

Exit status: 0 success; 1 the job ran but its --strict check failed; 2 bad input,
configuration or environment (one-line message on stderr); 3 golden layer drifted
(rerank). The last line of stdout is always a JSON summary, also on failure.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import sys
from typing import Sequence

from lga_dist.config import build_config, make_parser
from lga_dist.console import emit_summary
from lga_dist.errors import UserError


@dataclasses.dataclass(frozen=True)
class Command:
    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "rank-layers": Command("lga_dist.commands.rank_layers", "rank layers with LGA and name the golden layer"),
    "models": Command("lga_dist.commands.models", "list the packaged models, which need no hub"),
    "demo-model": Command("lga_dist.commands.demo_model", "build or reuse the demo fact model (fast tests)"),
    "check-requests": Command("lga_dist.commands.check_requests",
                              "read and validate edit requests, quarantine rejects"),
    "rerank": Command("lga_dist.commands.rerank", "re-rank listed models whose weights/proxy/options changed; "
                                                  "drift exits 3"),
    "edit": Command("lga_dist.commands.edit",
                    "edit at the layer(s) you name (ROME, MEMIT, AlphaEdit, FT-L) and evaluate"),
    "bulk-edit": Command("lga_dist.commands.bulk_edit", "apply many requests at the ranking's golden layer(s), "
                                                        "sharded over ZeRO-3 actors, resumably; write the model"),
    "compare-bulk": Command("lga_dist.commands.compare_bulk", "bulk-edit runs side by side: curves over the edits "
                                                              "applied, final figures, edits/s"),
    "choose-rule": Command("lga_dist.commands.choose_rule", "choose LGA's score rule on the proxy split of "
                                                            "validate-golden studies, judged on their test split"),
    "validate-golden": Command("lga_dist.commands.validate_golden", "edit every request at every layer: golden layer "
                                                                    "vs sample-wise optimum vs LGA pick, with plots"),
}

EXIT_OK, EXIT_STRICT, EXIT_USER_ERROR = 0, 1, 2


def run_command(name: str, argv: Sequence[str], prog: str | None = None) -> int:
    """Parse ``argv`` for job ``name``, run it, print its summary line; return the exit status."""
    module = importlib.import_module(COMMANDS[name].module)
    parser = make_parser(module.Config, prog or f"lga-dist {name}", module.DESCRIPTION)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        config = build_config(module.Config, parser.parse_args(list(argv)))
    except UserError as err:  # unknown flags, bad values, a bad --config file, failed validation
        parser.print_usage(sys.stderr)
        return _fail(str(err).splitlines()[0])
    try:
        summary, code = module.run(config)
    except UserError as err:
        return _fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
    except Exception as err:  # noqa: BLE001 - only Ray's wrappers of an actor's failure are turned into one line
        if not type(err).__module__.startswith("ray."):
            raise
        cause = getattr(err, "cause", None) or err
        text = str(cause).strip().splitlines()
        return _fail(f"a Ray actor failed: {type(cause).__name__}: {text[-1] if text else ''} "
                     f"(its traceback is in the actor log above)")
    emit_summary(summary)
    return code


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    emit_summary({"status": "error", "error": message})
    return EXIT_USER_ERROR


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(len(n) for n in COMMANDS)
        listing = "\n".join(f"  {n.ljust(width)}  {c.summary}" for n, c in COMMANDS.items())
        print(f"usage: lga-dist <job> [options]   (lga-dist <job> --help for the job's options)\n\njobs:\n{listing}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown job {argv[0]!r}", file=sys.stderr)
            return EXIT_USER_ERROR
        return EXIT_OK
    return run_command(argv[0], argv[1:])


if __name__ == "__main__":
    sys.exit(main())
