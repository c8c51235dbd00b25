"""Draw the figures of docs/how-it-works.md from the worked example: python docs/make_figures.py."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

X = np.array([[3, 3, 2, 1, 0], [0, 0, 1, 3, 1], [3, 1, 2, 2, 3], [2, 0, 0, 2, 2], [2, 0, 0, 0, 1]])
W = np.array([[0, 1, 2], [2, 2, 0], [0, 1, 2]])
FIGURES = Path(__file__).resolve().parent / "figures"
COLOURS = plt.get_cmap("tab10").colors


def _grid(ax, values, title, highlight=None, colour=None):
    rows, cols = values.shape
    for i in range(rows):
        for j in range(cols):
            inside = (
                highlight is not None and highlight[0] <= i < highlight[0] + 3 and highlight[1] <= j < highlight[1] + 3
            )
            ax.add_patch(
                plt.Rectangle(
                    (j, rows - 1 - i),
                    1,
                    1,
                    fill=inside,
                    alpha=0.35 if inside else 1,
                    facecolor=colour if inside else "none",
                    edgecolor="black",
                )
            )
            ax.text(j + 0.5, rows - 0.5 - i, f"{values[i, j]:g}", ha="center", va="center", fontsize=11)
    ax.set_xlim(0, cols)
    ax.set_ylim(0, rows)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, fontsize=11)


def im2col_figure():
    windows = np.lib.stride_tricks.sliding_window_view(X, (3, 3))
    col = windows.transpose(2, 3, 0, 1).reshape(9, 9)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6), gridspec_kw={"width_ratios": [5, 9, 3]})
    _grid(axes[0], X, "image x (5x5): patch (0, 0) and (1, 2)", highlight=(0, 0), colour=COLOURS[0])
    for i in range(5):
        for j in range(5):
            if 1 <= i < 4 and 2 <= j < 5:
                axes[0].add_patch(plt.Rectangle((j, 4 - i), 1, 1, facecolor=COLOURS[1], alpha=0.3))
    _grid(axes[1], col, "patch matrix col (9x9): one column per output position")
    for column, colour in ((0, COLOURS[0]), (5, COLOURS[1])):
        axes[1].add_patch(plt.Rectangle((column, 0), 1, 9, facecolor=colour, alpha=0.3))
    _grid(axes[2], (W.reshape(1, 9) @ col).reshape(3, 3), "y = w (1x9) @ col")
    fig.tight_layout()
    fig.savefig(FIGURES / "im2col.png", dpi=110)


def col2im_figure():
    counts = np.zeros((5, 5), int)
    for p in range(3):
        for q in range(3):
            counts[p : p + 3, q : q + 3] += 1
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    _grid(axes[0], counts, "patches each pixel belongs to (one shaded)", highlight=(1, 1), colour=COLOURS[2])
    dx = np.zeros((5, 5))
    for p in range(3):
        for q in range(3):
            dx[p : p + 3, q : q + 3] += W
    _grid(axes[1], dx, "col2im(w.T @ ones): the input gradient")
    fig.tight_layout()
    fig.savefig(FIGURES / "col2im.png", dpi=110)


if __name__ == "__main__":
    FIGURES.mkdir(exist_ok=True)
    im2col_figure()
    col2im_figure()
    print(f"wrote {sorted(p.name for p in FIGURES.glob('*.png'))} to {FIGURES}")
