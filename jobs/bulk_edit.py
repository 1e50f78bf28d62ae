"""Bulk edit at the golden layer(s): ``python jobs/bulk_edit.py --ranking R.parquet --requests s3://bucket/prefix/``."""

import pathlib
import sys

# Run the library of the checkout this script is in (the one `ray job submit --working-dir .` uploads).
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from lga_dist.cli import run_command  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_command("bulk-edit", sys.argv[1:], prog="jobs/bulk_edit.py"))
