"""Rank a model's layers with LGA: ``ray job submit --working-dir . -- python jobs/rank_layers.py ...``."""

import pathlib
import sys

# Run the library of the checkout this script is in (the one `ray job submit --working-dir .` uploads).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lga_dist.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("rank-layers", sys.argv[1:], prog="jobs/rank_layers.py"))
