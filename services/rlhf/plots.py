"""The few lines every figure of the platform shares: matplotlib on its file-only backend, and a
figure written to a PNG (titled, laid out, its directory made, the figure closed)."""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (no display needed: workers, CI, containers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path | BinaryIO, *, title: str | None = None,
                title_size: float | None = None, dpi: int = 110) -> Path | BinaryIO:
    """Write `fig` as a PNG to `path` — a file path (its directory made) or a binary file object
    such as `io.BytesIO` (a web page's image) — with `title` above its panels when given, and
    close it; returns where it went."""
    import matplotlib.pyplot as plt

    try:
        if title:
            fig.suptitle(title, fontsize=title_size)
        fig.tight_layout()
        if hasattr(path, "write"):
            fig.savefig(path, dpi=dpi, format="png")
            return path
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=dpi, format="png")
        return out
    finally:
        plt.close(fig)
