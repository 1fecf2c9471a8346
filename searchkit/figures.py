"""Writing matplotlib figures: the one way every plot of the library is saved."""

from __future__ import annotations

import os
from pathlib import Path


def save_figure(fig, path: str | os.PathLike) -> Path:
    """Save `fig` as `path` (its folder created), close it, and return the path."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
