"""What jobs print: tables for people, and one JSON summary line last for scripts."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import time
from typing import Any, Iterator, Sequence, TextIO

from tqdm.auto import tqdm


@contextlib.contextmanager
def library_output_to_stderr() -> Iterator[None]:
    """stdout holds the job's table and its summary line: what libraries print inside the block goes to stderr.

    transformers' save_pretrained imports DeepSpeed, which announces the accelerator it found on a logger
    bound to stdout at import; imported here its logger is bound to stderr, and one imported before is moved."""
    with contextlib.redirect_stdout(sys.stderr):
        yield
    for handler in logging.getLogger("DeepSpeed").handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.__stdout__):
            handler.setStream(sys.stderr)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain aligned text table (numbers right-aligned)."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0].keys())
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    numeric = [all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows) for c in columns]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if n else v.ljust(w) for v, w, n in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def emit_summary(summary: dict[str, Any], stream: TextIO | None = None) -> None:
    """Print the one-line JSON summary; callers print it last so schedulers can read the final line."""
    stream = stream or sys.stdout
    stream.flush()
    print(json.dumps(_strict(summary), default=str, sort_keys=False, allow_nan=False), file=stream, flush=True)


def _strict(value: Any) -> Any:
    """NaN and infinities become null: the summary must parse with any JSON reader (jq, JavaScript)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


class Progress:
    """How every long phase reports: a bar on a terminal, a line per update in job logs (tqdm's bar).

    ``ray job submit`` logs, CronJobs and CI capture stderr without a terminal, where a
    bar prints nothing useful; there each update prints ``line`` (when given) to stdout.
    """

    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0,
                 log_every_s: float = 0.0, bar: bool = True):
        """``log_every_s``: in job logs, a line at most this often, the first after that long, so a short
        phase says nothing (0: every update that brings a line). ``bar=False``: a phase inside a step
        whose own bar is showing, reported in job logs only."""
        self.tty = sys.stderr.isatty()
        self.enabled, self.total, self.done = enabled, total, initial  # a disabled tqdm does not count
        self.desc, self.unit, self.log_every_s = desc, unit, log_every_s
        self._logged, self._lines = time.monotonic(), 0
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit,
                        disable=not (enabled and self.tty and bar), mininterval=1.0, file=sys.stderr)

    def update(self, n: int, line: str | None = None, postfix: dict[str, Any] | None = None) -> None:
        self.done += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        if not self.enabled or self.tty:
            return
        now = time.monotonic()
        if line is None and self.log_every_s:
            line = f"{self.desc}: {self.done}/{self.total} {self.unit}"
        finished_a_long_phase = self.done >= self.total and (self._lines or not self.log_every_s)
        if line and (now - self._logged >= self.log_every_s or finished_a_long_phase):
            print(line, flush=True)
            self._logged, self._lines = now, self._lines + 1

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
