"""The Matplotlib pieces the reports share: a figure on the non-interactive Agg canvas (no pyplot window, no
global backend change), an annotated heat-map panel, and a PNG written atomically through :mod:`shaspec_tf.fileio`
(so a ``gs://`` path works)."""
from __future__ import annotations

import math

import numpy as np

from shaspec_tf import fileio


def save_figure(fig, path: str, **savefig) -> None:
    """``fig`` as a PNG at ``path`` (local or URI), written aside and moved into place."""
    with fileio.atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", **savefig)


def heatmap_panel(fig, ax, matrix, row_labels, col_labels, title, cmap, vmin, vmax, fmt, colorbar_label,
                  mean_row: bool = True, colorbar: bool = True):
    """``matrix`` drawn on ``ax`` with each value written in its cell (``fmt``; NaN as "n/a") and a line above the
    last row (the Average) when ``mean_row``."""
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(col_labels)), labels=col_labels)
    ax.set_yticks(range(len(row_labels)), labels=row_labels)
    ax.tick_params(axis="x", top=True, bottom=False, labeltop=True, labelbottom=False)
    ax.set_title(title, fontsize=10, pad=22)
    cmap_obj = image.get_cmap()
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            value = matrix[i, j]
            if math.isnan(value):
                ax.text(j, i, "n/a", ha="center", va="center", fontsize=8, color="black")
                continue
            rgba = cmap_obj(image.norm(value))
            luminance = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]
            ax.text(j, i, fmt.format(value), ha="center", va="center", fontsize=8,
                    color="black" if luminance > 0.55 else "white")
    if mean_row and len(row_labels) > 1:
        ax.axhline(len(row_labels) - 1.5, color="black", linewidth=1.5)
    if colorbar:
        bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
        bar.set_label(colorbar_label)
    return image


def new_figure(width: float, rows: int):
    """A figure ``width`` inches wide and tall enough for ``rows`` table rows, on the Agg canvas."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, 0.36 * rows + 1.6), dpi=150, layout="constrained")
