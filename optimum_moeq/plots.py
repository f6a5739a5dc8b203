"""Pictures of an allocation: bits per layer x expert, with the two signals that chose them."""

from __future__ import annotations

import os

from .allocation import Allocation


def plot_allocation(allocation: Allocation, path: str | os.PathLike) -> str:
    """Write a PNG heatmap of the bits (and, when known, router-norm change and MaxVar) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = list(allocation.bits)
    width = max(len(bits) for bits in allocation.bits.values())

    def grid(rows):
        data = np.full((len(names), width), np.nan)
        for i, row in enumerate(rows):
            data[i, : len(row)] = row
        return data

    panels = [("bits", grid([allocation.bits[n] for n in names]), "viridis")]
    if all(n in allocation.signals for n in names):
        panels.append(("router-norm change", grid([allocation.signals[n].router_change for n in names]), "coolwarm"))
        panels.append(("MaxVar", grid([allocation.signals[n].maxvar for n in names]), "magma"))
    height = max(2.5, 0.28 * len(names) + 1.5)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.5, height), squeeze=False)
    for ax, (title, data, cmap) in zip(axes[0], panels):
        image = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        if title == "bits" and width <= 32:
            middle = np.nanmean([np.nanmin(data), np.nanmax(data)])
            for (i, j), value in np.ndenumerate(data):
                if not np.isnan(value):
                    color = "black" if value > middle else "white"  # readable on viridis' yellow and purple
                    ax.text(j, i, int(value), ha="center", va="center", color=color, fontsize=7)
    axes[0][0].set_yticks(range(len(names)))
    axes[0][0].set_yticklabels([_short(n) for n in names], fontsize=7)
    for ax in axes[0][1:]:
        ax.set_yticks([])
    fig.suptitle(f"optimum-moeq allocation: {allocation.average_bits:.3f} average bits per expert weight")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return os.fspath(path)


def _short(name: str) -> str:
    return name.replace("model.layers.", "L").replace(".mlp.experts", "").replace(".layer.", ".")


def check_plot_path(path: str | os.PathLike) -> None:
    """Before any work: matplotlib can write ``path``'s format (named by its extension)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    extension = os.path.splitext(os.fspath(path))[1].lstrip(".").lower()
    if extension not in formats:
        shown = extension or "no extension"
        raise ValueError(f"cannot draw {path}: {shown!r} is not a picture format; use one of {sorted(formats)}.")
