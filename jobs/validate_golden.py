"""Golden-layer validation grid and report: ``python jobs/validate_golden.py --method rome --out OUT``."""

import pathlib
import sys

# Run the library of the checkout this script is in (the one `ray job submit --working-dir .` uploads).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lga_dist.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("validate-golden", sys.argv[1:], prog="jobs/validate_golden.py"))
