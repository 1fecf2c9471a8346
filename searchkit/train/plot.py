"""Training curves as a PNG: loss and validation recall per epoch."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..figures import save_figure


def plot_history(history: Sequence, path: str | Path) -> Path:
    """Two panels (training loss; validation R@1/R@10 both ways and mean) written to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h.epoch for h in history]
    fig, (ax_loss, ax_rec) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    ax_loss.plot(epochs, [h.loss for h in history], marker="o")
    ax_loss.set(title="training loss (symmetric InfoNCE)", xlabel="epoch", ylabel="loss")
    for key in ("t2i_R@1", "t2i_R@10", "i2t_R@1", "i2t_R@10", "mean"):
        ax_rec.plot(epochs, [h.val[key] for h in history], marker=".", label=key, lw=2 if key == "mean" else 1)
    ax_rec.set(title="validation recall (%)", xlabel="epoch", ylabel="recall %")
    ax_rec.legend(fontsize=8)
    for ax in (ax_loss, ax_rec):
        ax.grid(alpha=0.3)
    return save_figure(fig, path)
