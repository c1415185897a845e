"""Matplotlib without a display, and PNGs written atomically into the store (one place for both)."""

from __future__ import annotations

import io
from pathlib import Path

from .store import write_bytes

# One style for every figure (the reducer's, the induction job's, the case study's).
STYLE = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
         "legend.fontsize": 7, "figure.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3,
         "image.cmap": "viridis", "lines.markersize": 3, "savefig.dpi": 110}


def pyplot():
    """matplotlib.pyplot on the Agg backend (jobs run on headless nodes), in the project's STYLE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def save_png(fig, path: Path, **savefig_kwargs) -> Path:
    """Render `fig` to PNG bytes, close it, and write the file atomically (icl_scale.store)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **savefig_kwargs)
    pyplot().close(fig)
    write_bytes(path, buf.getvalue())
    return Path(path)
