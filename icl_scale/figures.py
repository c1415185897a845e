"""Matplotlib without a display, and PNGs written atomically into the store (one place for both)."""

from __future__ import annotations

import io
from pathlib import Path

from .store import write_bytes


def pyplot():
    """matplotlib.pyplot on the Agg backend (jobs run on headless nodes)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig, path: Path, **savefig_kwargs) -> Path:
    """Render `fig` to PNG bytes, close it, and write the file atomically (icl_scale.store)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    pyplot().close(fig)
    write_bytes(path, buf.getvalue())
    return Path(path)
