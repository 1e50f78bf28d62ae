"""How every benchmark hands its result over: the Markdown table printed (and written to --markdown for
run_all.py's page), then the machine-readable summary as the last line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(lines: list[str], markdown: str | None, summary: Any = None) -> None:
    print("\n".join(lines))
    if markdown:
        Path(markdown).write_text("\n".join(lines) + "\n")
    if summary is not None:
        print(json.dumps(summary))
