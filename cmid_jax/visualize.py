"""Pictures of a run: MIM reconstruction grids, training curves and kNN accuracy (numpy + PIL).

* `reconstruction_grid` lays out, one column per image, four named rows: the input crop, the
  masked input as the student sees it (masked 32-px blocks filled with the crop's per-channel
  mean), the prediction (masked pixels from the decoder, visible pixels from the input) and the
  MIM target (the unmasked crop; in CMID it equals the input, so rows 1 and 4 differ only by
  rounding).
* `plot_training_curves` draws logged scalars (loss terms, embedding_std, recon_psnr, ...)
  against step from `metrics.jsonl`, one panel each.
* `plot_knn_curve` draws top-1 accuracy against step from `metrics.jsonl` (the online
  `knn_top1_*` scalars) or `eval.jsonl` (one series per protocol and backbone).

Both JSONL readers take every complete line of the file (`cmid_jax.workdir.read_jsonl_file`, which
skips a line cut by a crash): a resumed run appends to the same file, and for a step logged twice
(steps redone after a crash) the later line wins.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
from etils import epath
from PIL import Image, ImageDraw, ImageFont

from cmid_jax.workdir import read_jsonl_file

GAP_VALUE = 255  # White separators between the cells of a grid.
ROW_LABELS = ('input', 'masked input', 'prediction', 'target')
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
# Panels of `plot_training_curves`: what the README's "What healthy training looks like" shows.
TRAINING_CURVES = ('loss', 'loss_mim', 'loss_global', 'loss_local', 'recon_psnr', 'embedding_std')
Series = dict[str, list[tuple[int, float]]]


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
    """uint8 (4*S + 3*gap, M + n*S + (n-1)*gap, 3) grid: input, masked input, prediction and
    target rows, named in a left margin M pixels wide (`ROW_LABELS`).

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
    return labelled_grid(dict(zip(ROW_LABELS, (shown, masked, composite, shown))), gap)


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
    legend: Mapping[str, Sequence[int]] | None = None,
    pad: int = 6,
) -> np.ndarray:
    """`{row name: (n, S, S, 3) uint8}` -> one image of the rows laid out as `_tile` does, each
    row's name right-aligned in a white left margin as wide as the longest name, and an optional
    `legend` line below (`{name: RGB colour}`, e.g. the classes of a label row)."""
    grid = _tile(list(rows.values()), gap)
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new('RGB', (1, 1)))
    margin = math.ceil(max(measure.textlength(name, font=font) for name in rows)) + 2 * pad
    line = 20 if legend else 0
    out = np.full((grid.shape[0] + line, margin + grid.shape[1], 3), GAP_VALUE, np.uint8)
    out[: grid.shape[0], margin:] = grid
    img = Image.fromarray(out)
    draw = ImageDraw.Draw(img)
    size = next(iter(rows.values())).shape[1]
    for r, name in enumerate(rows):
        draw.text(
            (margin - pad, r * (size + gap) + size / 2), name, fill='black', font=font, anchor='rm'
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
        Image.fromarray(np.asarray(image, np.uint8)).save(f, format='PNG', optimize=True)


def _read_jsonl_series(
    jsonl_path: str | os.PathLike, points: Callable[[dict], Mapping[str, float]]
) -> Series:
    """{name: [(step, value), ...]} sorted by step, from the `points(record)` of every record that
    has a step (read by the workdir's JSONL reader, which skips a line cut by a crash); for a step
    logged twice the later line wins; non-finite values are left out."""
    series: dict[str, dict[int, float]] = {}
    for record in read_jsonl_file(jsonl_path):
        step = record.get('step')
        if step is None:
            continue
        for name, value in points(record).items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(name, {})[int(step)] = float(value)
    return {name: sorted(values.items()) for name, values in sorted(series.items())}


def read_accuracy_series(jsonl_path: str | os.PathLike) -> Series:
    """{series name: [(step, top-1), ...]} from metrics.jsonl or eval.jsonl, sorted by step."""

    def points(record):
        if 'protocol' in record and 'top1' in record:  # eval.jsonl
            return {f'{record["protocol"]}_{record.get("which", "student")}': record['top1']}
        return {k: v for k, v in record.items() if k.startswith('knn_top1')}  # metrics.jsonl

    return _read_jsonl_series(jsonl_path, points)


def read_scalar_series(jsonl_path: str | os.PathLike, names: Iterable[str]) -> Series:
    """{name: [(step, value), ...]} of the scalars `names` in a metrics.jsonl."""
    wanted = tuple(names)
    return _read_jsonl_series(jsonl_path, lambda r: {k: r[k] for k in wanted if k in r})


def _nice_ticks(lo: float, hi: float, target: int = 5, whole: bool = False) -> list[float]:
    """Round tick values (1, 2, 2.5 or 5 times a power of ten apart) covering [lo, hi];
    `whole`: whole-number spacing only (steps)."""
    raw = max(hi - lo, 1e-9) / target
    if whole:
        raw = max(raw, 1.0)
    mag = 10 ** math.floor(math.log10(raw))
    spacing = next(
        m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw and not (whole and m * mag % 1)
    )
    first = math.ceil(lo / spacing - 1e-9) * spacing
    return [first + i * spacing for i in range(int((hi - first) / spacing + 1e-9) + 1)]


def _draw_panel(
    draw: ImageDraw.ImageDraw,
    box: tuple[int, int, int, int],
    series: Series,
    *,
    title: str,
    y_range: tuple[float, float] | None = None,
    y_label: Callable[[float], str] = lambda v: f'{v:g}',
    references: Mapping[str, float] | None = None,
    legend: bool = True,
) -> None:
    """Line plot of `series` against step inside `box` (left, top, right, bottom), with axes,
    grid, title and a legend giving each series' last value. `references`: labelled dashed
    horizontal lines."""
    font = ImageFont.load_default()
    x0, y0, x1, y1 = box
    left, right, top, bottom = x0 + 52, x1 - 12, y0 + 22, y1 - 30
    steps = [s for points in series.values() for s, _ in points]
    s_lo, s_hi = min(steps), max(steps)
    if s_hi == s_lo:
        s_lo, s_hi = s_lo - 1, s_hi + 1
    if y_range is None:
        values = [v for points in series.values() for _, v in points]
        values += list((references or {}).values())
        v_lo, v_hi = min(values), max(values)
        margin = 0.08 * (v_hi - v_lo) or 0.5 * max(abs(v_hi), 1e-3)
        y_range = (v_lo - margin, v_hi + margin)
    v_lo, v_hi = y_range
    x_of = lambda s: left + (s - s_lo) / (s_hi - s_lo) * (right - left)
    y_of = lambda v: bottom - (min(max(v, v_lo), v_hi) - v_lo) / (v_hi - v_lo) * (bottom - top)

    for v in _nice_ticks(v_lo, v_hi, target=4):
        draw.line([(left, y_of(v)), (right, y_of(v))], fill=(225, 225, 225))
        draw.text((left - 6, y_of(v)), y_label(v), fill='black', font=font, anchor='rm')
    for s in _nice_ticks(s_lo, s_hi, whole=True):
        draw.line([(x_of(s), bottom), (x_of(s), bottom + 4)], fill='black')
        draw.text((x_of(s), bottom + 6), f'{s:g}', fill='black', font=font, anchor='ma')
    draw.rectangle([left, top, right, bottom], outline='black')
    draw.text(((left + right) / 2, y1 - 4), 'step', fill='black', font=font, anchor='md')
    draw.text(((left + right) / 2, y0 + 6), title, fill='black', font=font, anchor='ma')
    for name, value in (references or {}).items():
        y = y_of(value)
        for x in range(int(left), int(right), 8):  # Dashed.
            draw.line([(x, y), (min(x + 4, right), y)], fill=(120, 120, 120))
        above = y - top > 14  # The label goes below a line drawn near the top.
        draw.text(
            (right - 4, y - 2 if above else y + 3),
            name,
            fill=(90, 90, 90),
            font=font,
            anchor='rd' if above else 'ra',
        )
    for i, (name, points) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        xy = [(x_of(s), y_of(v)) for s, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=color, width=2)
        if len(xy) <= 30:  # Markers where they stay readable.
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        if legend:
            legend_y = top + 10 + 14 * i
            draw.line([(left + 8, legend_y), (left + 24, legend_y)], fill=color, width=3)
            draw.text(
                (left + 30, legend_y),
                f'{name} ({y_label(points[-1][1])})',
                fill='black',
                font=font,
                anchor='lm',
            )


def _percent(fraction: float) -> str:
    return f'{100 * fraction:.1f}%'.replace('.0%', '%')


def plot_training_curves(
    metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    names: Sequence[str] = TRAINING_CURVES,
    references: Mapping[str, Mapping[str, float]] | None = None,
    columns: int = 3,
    panel_size: tuple[int, int] = (320, 210),
) -> Series:
    """One panel per logged scalar in `names` (those the file has) against step; returns the
    series plotted. `references` maps a scalar to labelled dashed lines for its panel, e.g.
    `{'loss_global': {'ln(1 + queue)': 5.55}}`."""
    series = read_scalar_series(metrics_jsonl, names)
    if not series:
        raise ValueError(f'none of {list(names)} in {metrics_jsonl}')
    shown = [n for n in names if n in series]
    rows = -(-len(shown) // columns)
    width, height = panel_size
    img = Image.new('RGB', (columns * width, rows * height), 'white')
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(shown):
        x, y = (i % columns) * width, (i // columns) * height
        label = _percent if name.startswith('knn_top1') else (lambda v: f'{v:.3g}')
        _draw_panel(
            draw,
            (x, y, x + width, y + height),
            {name: series[name]},
            title=name,
            y_label=label,
            references=(references or {}).get(name),
            legend=False,
        )
    save_png(out_png, np.asarray(img))
    return {n: series[n] for n in shown}


def plot_knn_curve(
    eval_jsonl_or_metrics_jsonl: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    size: tuple[int, int] = (720, 420),
    title: str | None = None,
) -> Series:
    """Plots top-1 (%) against step for every series in the file; returns the series plotted."""
    series = read_accuracy_series(eval_jsonl_or_metrics_jsonl)
    if not series:
        raise ValueError(
            f'no accuracy records (knn_top1_* or protocol/top1) in {eval_jsonl_or_metrics_jsonl}'
        )
    if title is None:
        only_knn = all(name.startswith('knn') for name in series)
        title = 'kNN top-1 accuracy' if only_knn else 'top-1 accuracy'
    img = Image.new('RGB', size, 'white')
    _draw_panel(
        ImageDraw.Draw(img),
        (0, 0, *size),
        series,
        title=title,
        y_range=(0.0, 1.0),
        y_label=_percent,
    )
    save_png(out_png, np.asarray(img))
    return series
