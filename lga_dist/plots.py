"""Figures for reports: a headless pyplot and one way to write a PNG (local or s3://, atomically)."""

from __future__ import annotations

import io

from lga_dist.io.storage import atomic_write


def pyplot():
    """matplotlib.pyplot on the Agg backend (jobs run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: str, dpi: int = 110) -> None:
    """Write ``figure`` as PNG to ``path`` and close it."""

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    with atomic_write(path, "wb") as handle:
        handle.write(buffer.getvalue())
    pyplot().close(figure)
