"""Drawing the figures: image panels, filter grids, feature maps, attribution maps and prediction grids as PNGs.

Everything here takes tensors that are already computed (by the model or attribution.py) and only
draws; matplotlib is imported when the first figure is drawn, with the file-only Agg backend.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import torch

from inat_classifier.presets import Preprocess
from inat_classifier.storage import save_png

RIGHT, WRONG = "#1a9850", "#d73027"  # frame colours of right and wrong predictions


def pyplot() -> ModuleType:
    """matplotlib.pyplot with the file-only backend, imported only when a figure is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    # Text as written: a class name such as "US$ 5 $" is a label, not TeX (mathtext would fail to draw it).
    matplotlib.rcParams["text.parse_math"] = False
    # A class name in a script the font lacks draws as boxes; the report names it, the warning adds nothing.
    warnings.filterwarnings("ignore", message=r"Glyph \d+ .* missing from font", category=UserWarning)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, dpi: int) -> Path:
    """Write the figure as a PNG, whole or not at all (a full disk is the one-line error naming the folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        save_png(fig, out, dpi=dpi, bbox_inches="tight", facecolor="white")
    finally:
        pyplot().close(fig)
    return out


def integer_xticks(ax, first: int, last: int) -> None:
    """Whole-number x ticks only (runs, epochs), also when there is one: first..last with half a step either side."""
    from matplotlib.ticker import MaxNLocator

    # min_n_ticks=2 would fall back to 0.945, 0.96... for one epoch
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1, steps=[1, 2, 5, 10]))
    ax.set_xlim(first - 0.5, last + 0.5)


def round_ticks(lo: float, hi: float, log: bool = False, integer: bool = False) -> list[float]:
    """Round values inside [lo, hi] (1-2-5 steps; on a log axis 1 and 3 per decade): 0.4, never 0.4211."""
    from matplotlib.ticker import LogLocator, MaxNLocator

    if not hi > lo:
        return [lo]

    def inside(values) -> list[float]:
        return [float(v) for v in values if lo - 1e-9 * (hi - lo) <= v <= hi + 1e-9 * (hi - lo)]

    if log:
        values = inside(LogLocator(base=10, subs=(1.0, 3.0)).tick_values(lo, hi))
        if len(values) >= 3:
            return values
    return inside(MaxNLocator(nbins=5, steps=[1, 2, 5, 10], integer=integer).tick_values(lo, hi))


def tick_label(value: float) -> str:
    """A round tick as it reads: 0.0003, 0.45, 64 (no float noise such as 0.30000000000000004)."""
    return f"{float(f'{value:.6g}'):g}"


def overlapping(texts) -> bool:
    """Whether any two of these drawn texts overlap on the canvas."""
    boxes = [t.get_window_extent() for t in texts if t.get_text()]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def unnormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A normalised (3, H, W) image tensor back to (H, W, 3) RGB in [0, 1] for imshow."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * s + m).clamp(0, 1).permute(1, 2, 0).cpu()


def gradient_image(g: torch.Tensor, std: Sequence[float]) -> torch.Tensor:
    """A (3, H, W) input gradient as an RGB picture: grey = 0, per image scaled by its 99.5th |g| percentile."""
    g = g.detach().float().cpu() / torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)  # pixel space
    scale = torch.quantile(g.abs().flatten(), 0.995).item() or g.abs().max().item() or 1.0
    return (0.5 + 0.5 * g / scale).clamp(0, 1).permute(1, 2, 0)


def grid_shape(n: int, max_cols: int = 8) -> tuple[int, int]:
    cols = min(max_cols, max(1, math.ceil(math.sqrt(n))))
    return math.ceil(n / cols), cols


# ----------------------------------------------------------------------------- predictions
def plot_prediction_grid(
    records: list[dict],
    class_names: Sequence[str],
    preprocess: Preprocess,
    out: Path,
    cols: int,
    title: str,
    dpi: int = 100,
) -> list[str]:
    """Images titled with true and predicted class; wrong ones framed red, right ones green.

    `records` hold image (normalised), true, pred, confidence and correct per panel. Returns the
    frame colour of every panel, in the order of `records`.
    """
    plt = pyplot()
    rows = max(1, math.ceil(len(records) / cols))
    # 1.45 in a row: the default 10x3 grid is about 1,670 px tall at --dpi 110, a page's height
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols, 1.45 * rows + 0.6), squeeze=False, layout="constrained")
    colours = []
    for ax in axes.flat:
        ax.axis("off")
    for ax, r in zip(axes.flat, records, strict=False):  # the grid may have more axes than records
        colour = RIGHT if r["correct"] else WRONG
        colours.append(colour)
        ax.axis("on")
        ax.imshow(unnormalize(r["image"], preprocess.mean, preprocess.std).numpy())
        ax.set_xticks([]), ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
        ax.set_title(
            f"true: {class_names[r['true']]}\npred: {class_names[r['pred']]} ({r['confidence']:.0%})",
            fontsize=8,
            color=colour,
        )
    n_right = sum(r["correct"] for r in records)
    fig.suptitle(
        f"{title}\n{n_right}/{len(records)} right (green frame), {len(records) - n_right} wrong (red frame)",
        fontsize=9,
    )
    save_figure(fig, out, dpi)
    return colours


# ----------------------------------------------------------------------------- filters, feature maps
def plot_filters(weight: torch.Tensor, out: Path, title: str, max_filters: int = 64, dpi: int = 110) -> None:
    """One panel per output channel: RGB when the layer sees the image, else channels averaged.

    Every filter is normalised on its own: min-max to [0, 1] for colour, symmetric about 0
    (red positive, blue negative) for the averaged ones.
    """
    plt = pyplot()
    w = weight.detach().float().cpu()
    n = w.shape[0] if max_filters <= 0 else min(w.shape[0], max_filters)
    w = w[:n]
    colour = w.shape[1] == 3
    rows, cols = grid_shape(n, 8 if n <= 64 else 16)
    panel = 1.1 if cols <= 8 else 0.8
    fig, axes = plt.subplots(
        rows, cols, figsize=(panel * cols, panel * rows + 0.7), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        if colour:
            f = w[i]
            f = (f - f.min()) / (f.max() - f.min()).clamp(min=1e-12)
            ax.imshow(f.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            f = w[i].mean(0)
            lim = f.abs().max().clamp(min=1e-12).item()
            ax.imshow(f.numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
        ax.set_title(str(i), fontsize=7, pad=2)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, out, dpi)


MIN_MAP_SIDE = 2  # a 1xN map is one value per channel: its panels would be flat squares, all alike


def maps_worth_showing(maps: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The (1, C, H, W) maps with both sides >= MIN_MAP_SIDE, and a 'name (HxW)' for each one left out."""
    shown = {n: m for n, m in maps.items() if min(m.shape[-2:]) >= MIN_MAP_SIDE}
    left_out = [f"{n} ({m.shape[-2]}x{m.shape[-1]})" for n, m in maps.items() if n not in shown]
    return shown, left_out


def plot_feature_maps(
    image: torch.Tensor,
    maps: dict[str, torch.Tensor],
    preprocess: Preprocess,
    out: Path,
    title: str,
    channels: int = 8,
    dpi: int = 100,
) -> None:
    """One row per layer: the input, then its `channels` most active channels (each normalised)."""
    plt = pyplot()
    rows = len(maps)
    cols = channels + 1
    fig, axes = plt.subplots(
        rows, cols, figsize=(1.6 * cols + 0.8, 1.75 * rows + 0.6), squeeze=False, layout="constrained"
    )
    rgb = unnormalize(image, preprocess.mean, preprocess.std).numpy()
    for r, (name, fmap) in enumerate(maps.items()):
        fmap = fmap[0]
        axes[r, 0].imshow(rgb)
        axes[r, 0].set_xticks([]), axes[r, 0].set_yticks([])
        axes[r, 0].set_ylabel(f"{name}\n{fmap.shape[0]}x{fmap.shape[1]}x{fmap.shape[2]}", fontsize=8)
        order = fmap.mean((1, 2)).argsort(descending=True)[:channels]
        for c, ax in enumerate(axes[r, 1:]):
            ax.axis("off")
            if c >= len(order):
                continue
            ch = int(order[c])
            ax.imshow(fmap[ch].numpy(), cmap="viridis", interpolation="nearest")
            ax.set_title(f"ch {ch}", fontsize=7, pad=2)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, out, dpi)


# ----------------------------------------------------------------------------- attribution maps
def plot_guided_backprop(rows: list[list[tuple[torch.Tensor, str]]], out: Path, dpi: int) -> None:
    """One row per image of (H, W, 3) RGB panels with titles: the image, then its guided-backprop maps."""
    plt = pyplot()
    cols = max(len(r) for r in rows)
    fig, axes = plt.subplots(
        len(rows), cols, figsize=(2.6 * cols, 2.85 * len(rows) + 0.6), squeeze=False, layout="constrained"
    )
    for r, panels in enumerate(rows):
        for ax, (img, title) in zip(axes[r], panels, strict=False):  # rows may be shorter than the grid
            ax.imshow(img.numpy())
            ax.set_title(title, fontsize=8)
            ax.axis("off")
    fig.suptitle("Guided backpropagation: input pixels that increase the score (grey = no effect)", fontsize=10)
    save_figure(fig, out, dpi)


def plot_gradcam(pairs: list[tuple[torch.Tensor, torch.Tensor, str, str]], layer: str, out: Path, dpi: int) -> None:
    """Per image (rgb, cam, image title, heat-map title): the image, then the cam over it; two pairs a row."""
    plt = pyplot()
    n = len(pairs)
    per_row = 2 if n > 1 else 1  # image pairs (image, heat map) per row
    rows = math.ceil(n / per_row)
    fig, axes = plt.subplots(
        rows, 2 * per_row, figsize=(5.4 * per_row, 2.9 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for ax in axes.flat:
        ax.axis("off")
    for i, (rgb, cam, image_title, cam_title) in enumerate(pairs):
        r, c = divmod(i, per_row)
        img = rgb.numpy()
        axes[r, 2 * c].imshow(img)
        axes[r, 2 * c].set_title(image_title, fontsize=8)
        axes[r, 2 * c + 1].imshow(img)
        axes[r, 2 * c + 1].imshow(cam.numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        axes[r, 2 * c + 1].set_title(cam_title, fontsize=8)
    fig.suptitle(f"Grad-CAM at layer '{layer}' for the predicted class (red = most evidence)", fontsize=10)
    save_figure(fig, out, dpi)
