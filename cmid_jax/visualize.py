"""Pictures of a run: MIM reconstruction grids and the kNN accuracy curve (numpy + PIL only).

* `reconstruction_grid` lays out, one column per image, four rows: the input crop, the masked
  input as the student sees it (masked 32-px blocks filled with the crop's per-channel mean), the
  prediction (masked pixels from the decoder, visible pixels from the input) and the MIM target
  (the unmasked crop; in CMID it equals the input, so rows 1 and 4 differ only by rounding).
* `plot_knn_curve` draws top-1 accuracy against step from `metrics.jsonl` (the online
  `knn_top1_*` scalars) or `eval.jsonl` (one series per protocol and backbone).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

GAP_VALUE = 255  # White separators between the cells of a grid.
_COLORS = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
)


def _tile(rows: Sequence[np.ndarray], gap: int) -> np.ndarray:
    """rows of (n, S, S, 3) uint8 -> one (R*S + (R-1)*gap, n*S + (n-1)*gap, 3) image."""
    n, s = rows[0].shape[:2]
    out = np.full(
        (len(rows) * s + (len(rows) - 1) * gap, n * s + (n - 1) * gap, 3), GAP_VALUE, np.uint8
    )
    for r, row in enumerate(rows):
        for c in range(n):
            out[r * (s + gap) : r * (s + gap) + s, c * (s + gap) : c * (s + gap) + s] = row[c]
    return out


def _display_range(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band (low, high) mapped to black and white: the type range for 8-bit RGB, else the
    2nd-98th percentile of the inputs, so that uint16 or multispectral scenes are visible."""
    if images.dtype == np.uint8 and images.shape[-1] == 3:
        return np.zeros(3, np.float32), np.ones(3, np.float32)
    x = _fraction(images)[..., :3]
    lo, hi = np.percentile(x, [2, 98], axis=(0, 1, 2))
    return lo.astype(np.float32), np.maximum(hi, lo + 1e-6).astype(np.float32)


def _fraction(images: np.ndarray) -> np.ndarray:
    """Pixels as a fraction of their type's maximum: the units `data.mean` / `data.std` use."""
    scale = np.iinfo(images.dtype).max if np.issubdtype(images.dtype, np.integer) else 1.0
    return images.astype(np.float32) / np.float32(scale)


def reconstruction_grid(
    batch_views: Mapping[str, np.ndarray],
    reconstruction: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    *,
    view: str = 'a',
    max_images: int = 8,
    gap: int = 2,
) -> np.ndarray:
    """uint8 (4*S + 3*gap, n*S + (n-1)*gap, 3) grid: input, masked input, prediction, target.

    `batch_views` holds `img_<view>` (B, S, S, bands) uint8 or uint16 and `mask_<view>` (B, g, g)
    bool (as the data pipeline or `make_reconstruction_fn` give them); `reconstruction` is the
    decoder's (B, S, S, bands) output in normalised pixel space; `mean` / `std` are
    `config.data.mean/std`. The first three bands are shown (one band as grey).
    """
    images = np.asarray(batch_views[f'img_{view}'])[:max_images]
    mask = np.asarray(batch_views[f'mask_{view}'])[:max_images].astype(bool)
    n, size = images.shape[:2]
    if size % mask.shape[1]:
        raise ValueError(f'mask grid {mask.shape[1:]} does not tile {size}-px images')
    factor = size // mask.shape[1]
    pixel_mask = np.repeat(np.repeat(mask, factor, axis=1), factor, axis=2)[..., None]
    x = _fraction(images)
    prediction = np.asarray(reconstruction, np.float32)[:n] * np.asarray(
        std, np.float32
    ) + np.asarray(mean, np.float32)
    lo, hi = _display_range(images)
    shown = _to_uint8(x, lo, hi)
    channel_mean = np.rint(shown.astype(np.float32).mean(axis=(1, 2), keepdims=True))
    masked = np.where(pixel_mask, channel_mean, shown).astype(np.uint8)
    composite = np.where(pixel_mask, _to_uint8(prediction, lo, hi), shown)
    return _tile([shown, masked, composite, shown], gap)


def _to_uint8(fraction: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Pixels in type-maximum units -> RGB uint8 of the first three bands (one band as grey),
    `lo` / `hi` mapped to black / white."""
    a = fraction[..., :3] if fraction.shape[-1] >= 3 else np.repeat(fraction[..., :1], 3, axis=-1)
    a = np.nan_to_num((a - lo) / (hi - lo), nan=0.0)  # A diverged run still gets a picture.
    return np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8)


def display_images(images: np.ndarray) -> np.ndarray:
    """(n, H, W, bands) uint8 / uint16 images -> (n, H, W, 3) uint8 for display: 8-bit RGB as it
    is, other data stretched per band between the 2nd and 98th percentile of `images`."""
    return _to_uint8(_fraction(images), *_display_range(images))


def class_colors(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """uint8 class indices (...) -> (..., 3) uint8: class c in the c-th plot colour (two classes
    in black and white, as change masks), any other value (the ignore value) in mid grey."""
    palette = np.full((256, 3), 128, np.uint8)
    if num_classes == 2:
        palette[:2] = ((0, 0, 0), (255, 255, 255))
    else:
        palette[:num_classes] = [_COLORS[c % len(_COLORS)] for c in range(num_classes)]
    return palette[np.asarray(labels, np.uint8)]


def labelled_grid(
    rows: Mapping[str, np.ndarray],
    gap: int = 2,
    margin: int = 80,
    legend: Mapping[str, Sequence[int]] | None = None,
) -> np.ndarray:
    """`{row name: (n, S, S, 3) uint8}` -> one image of the rows laid out as `_tile` does, each
    row's name written in a white `margin` on its left, and an optional `legend` line below
    (`{name: RGB colour}`, e.g. the classes of a label row)."""
    grid = _tile(list(rows.values()), gap)
    line = 20 if legend else 0
    out = np.full((grid.shape[0] + line, margin + grid.shape[1], 3), GAP_VALUE, np.uint8)
    out[: grid.shape[0], margin:] = grid
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    size = next(iter(rows.values())).shape[1]
    for r, name in enumerate(rows):
        draw.text(
            (margin - 6, r * (size + gap) + size / 2), name, fill='black', font=font, anchor='rm'
        )
    x, y = margin, grid.shape[0] + line / 2
    for name, color in (legend or {}).items():
        draw.rectangle(
            [x, y - 5, x + 10, y + 5], fill=tuple(int(c) for c in color), outline='black'
        )
        draw.text((x + 14, y), name, fill='black', font=font, anchor='lm')
        x += 24 + draw.textlength(name, font=font)
    return np.asarray(img)


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes an (H, W, 3) or (H, W) uint8 image as PNG, creating the folder if needed.

    `path` may be an `etils.epath.Path` or a string, local or remote (gs://...).
    """
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open('wb') as f:
        Image.fromarray(np.asarray(image, np.uint8)).save(f, format='PNG')


def read_accuracy_series(jsonl_path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{series name: [(step, top-1), ...]} from metrics.jsonl or eval.jsonl, sorted by step."""
    series: dict[str, dict[int, float]] = {}
    with epath.Path(jsonl_path).open() as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            record = json.loads(line)
            step = record.get('step')
            if step is None:
                continue
            if 'protocol' in record and 'top1' in record:  # eval.jsonl
                points = {f'{record["protocol"]}_{record.get("which", "student")}': record['top1']}
            else:  # metrics.jsonl: the online kNN scalars
                points = {k: v for k, v in record.items() if k.startswith('knn_top1')}
            for name, value in points.items():
                if value is not None and math.isfinite(value):
                    series.setdefault(name, {})[int(step)] = float(value)  # Last write wins.
    return {name: sorted(points.items()) for name, points in sorted(series.items())}


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    span = max(hi - lo, 1e-9)
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    step = max(next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), 1)  # Whole steps.
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def plot_knn_curve(
    eval_jsonl_or_metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    size: tuple[int, int] = (720, 420),
    title: str | None = None,
) -> dict[str, list[tuple[int, float]]]:
    """Plots top-1 (%) against step for every series in the file; returns the series plotted."""
    series = read_accuracy_series(eval_jsonl_or_metrics_jsonl)
    if not series:
        raise ValueError(
            f'no accuracy records (knn_top1_* or protocol/top1) in {eval_jsonl_or_metrics_jsonl}'
        )
    if title is None:
        only_knn = all(name.startswith('knn') for name in series)
        title = 'kNN top-1 accuracy' if only_knn else 'top-1 accuracy'
    width, height = size
    left, right, top, bottom = 60, 20, 36, 44
    img = Image.new('RGB', size, 'white')
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    steps = [s for points in series.values() for s, _ in points]
    x_lo, x_hi = min(steps), max(steps)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    x_of = lambda s: left + (s - x_lo) / (x_hi - x_lo) * (width - left - right)
    y_of = lambda acc: height - bottom - acc * (height - top - bottom)  # acc in [0, 1]

    for pct in range(0, 101, 20):  # Horizontal grid and y labels.
        y = y_of(pct / 100)
        draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
        draw.text((left - 8, y), f'{pct}%', fill='black', font=font, anchor='rm')
    for s in _nice_ticks(x_lo, x_hi):
        x = x_of(s)
        draw.line([(x, height - bottom), (x, height - bottom + 4)], fill='black')
        draw.text((x, height - bottom + 6), f'{s:g}', fill='black', font=font, anchor='ma')
    draw.rectangle([left, top, width - right, height - bottom], outline='black')
    draw.text((width / 2, height - 6), 'step', fill='black', font=font, anchor='md')
    draw.text((width / 2, 8), title, fill='black', font=font, anchor='ma')

    for i, (name, points) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        xy = [(x_of(s), y_of(min(max(a, 0.0), 1.0))) for s, a in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        for x, y in xy:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        last = points[-1][1]
        legend_y = top + 8 + 14 * i
        draw.line([(left + 10, legend_y), (left + 28, legend_y)], fill=color, width=3)
        draw.text(
            (left + 34, legend_y),
            f'{name} ({100 * last:.1f}%)',
            fill='black',
            font=font,
            anchor='lm',
        )
    save_png(out_png, np.asarray(img))
    return series
