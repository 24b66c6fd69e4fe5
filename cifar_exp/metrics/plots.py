"""Figures a trial leaves behind: confusion-matrix heatmap and learning curves (PNG, matplotlib Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: workers and CI have no display
import matplotlib.pyplot as plt
import numpy as np


def confusion_matrix_png(counts: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """Counts (left) and row-normalised recall (right) heatmaps, true class down, predicted across."""
    rows = counts.sum(axis=1, keepdims=True)
    normalised = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=float), where=rows > 0)
    fig, axes = plt.subplots(1, 2, figsize=(15, 6.5))
    for ax, matrix, fmt, label in ((axes[0], counts, "d", "count"),
                                   (axes[1], normalised, ".2f", "fraction of true class")):
        image = ax.imshow(matrix, cmap="Blues")
        fig.colorbar(image, ax=ax, fraction=0.046, label=label)
        ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
        ax.set_yticks(range(len(class_names)), class_names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        threshold = matrix.max() / 2 if matrix.size else 0
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                    color="white" if value > threshold else "black")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_curves_png(history: Mapping[str, Sequence[float]], path: Path, title: str,
                        kept_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch, train and validation (at each epoch's end); on a second axis
    the learning rate each epoch trained at, drawn over the epoch (from epoch - 1 to epoch): flat,
    or from its first step's rate to its last step's for a per-step schedule. ``kept_epoch`` (an
    index): the epoch whose model was kept, a vertical line."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lr, last = history.get("learning_rate") or [], history.get("learning_rate_last") or []
    for ax, key in zip(axes, ("loss", "accuracy"), strict=True):
        for name, style in ((key, "-"), (f"val_{key}", "--")):
            if history.get(name):
                epochs = np.arange(1, len(history[name]) + 1)
                ax.plot(epochs, history[name], style, marker="o", label=name)
        if kept_epoch is not None:
            ax.axvline(kept_epoch + 1, color="green", alpha=0.5, label=f"model kept (epoch {kept_epoch + 1})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        handles, labels = ax.get_legend_handles_labels()
        if lr:
            lr_axis = ax.twinx()
            ends = last if len(last) == len(lr) else lr
            x = np.repeat(np.arange(len(lr) + 1), 2)[1:-1]  # 0, 1, 1, 2, 2, ...: each epoch's span
            y = np.ravel(np.column_stack([lr, ends]))
            (line,) = lr_axis.plot(x, y, ":", color="grey", label="learning_rate")
            lr_axis.set_ylabel("learning rate", color="grey")
            handles, labels = [*handles, line], [*labels, "learning_rate"]
        # one legend for both axes, below the plot: never over the curves
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=3, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def prediction_grid_png(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                        path: Path, title: str, confidence: np.ndarray, columns: int = 6) -> None:
    """A grid of test images, each titled with its predicted class and that class's probability,
    and the true class in red when the prediction is wrong.

    Decision: the images are pasted into one mosaic array shown by one ``imshow``, labels as text
    on that one axes. A subplot per image with ``tight_layout`` took 1.55 s for 36 images on the
    2-core CI machine, the mosaic 0.37 s: more than half of a trial's plotting time, every trial."""
    rows = max(1, -(-len(images) // columns))
    side, gap, top = images.shape[1] if len(images) else 32, 8, 22  # pixels: tile, column gap, label band
    canvas = np.full((rows * (side + top), columns * (side + gap), 3), 255, dtype=np.uint8)
    width = 1.9 * columns
    fig = plt.figure(figsize=(width, width * canvas.shape[0] / canvas.shape[1] / 0.94))
    ax = fig.add_axes((0.0, 0.0, 1.0, 0.94))
    for k, (image, true, pred, p) in enumerate(zip(images, y_true, y_pred, confidence, strict=True)):
        row, column = divmod(k, columns)
        y, x = row * (side + top) + top, column * (side + gap) + gap // 2
        canvas[y:y + side, x:x + side] = image
        right = true == pred
        label = f"{class_names[pred]} {p:.2f}" + ("" if right else f"\n(true: {class_names[true]})")
        ax.text(x + side / 2, y - 1, label, fontsize=8, ha="center", va="bottom", color="black" if right else "red")
    ax.imshow(canvas, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=110)  # 8-point labels at 80 dpi were 9 pixels high: too small to read
    plt.close(fig)


def curves_png(curves: Mapping[str, Sequence[float]], metric: str, path: str | Path, title: str) -> None:
    """One line per named curve of ``metric`` per epoch, overlaid."""
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, values in curves.items():
        ax.plot(np.arange(1, len(values) + 1), values, marker="o", label=name)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.set(xlabel="epoch", ylabel=metric, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def recall_png(recall: Mapping[str, np.ndarray], path: Path, title: str) -> None:
    """Per class, the mean test recall over seeds as a bar, its standard deviation as an error bar,
    and each seed's value as a dot."""
    names = list(recall)
    means = [float(np.mean(recall[n])) for n in names]
    spreads = [float(np.std(recall[n], ddof=1)) if len(recall[n]) > 1 else 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(names))
    ax.bar(x, means, yerr=spreads, capsize=4, color="tab:blue", alpha=0.6, label="mean ± std")
    for i, n in enumerate(names):
        ax.plot(np.full(len(recall[n]), x[i]), recall[n], "o", color="black", markersize=3)
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("test recall")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
