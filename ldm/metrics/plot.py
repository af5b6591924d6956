"""A line chart of a metric against sampling steps, one line per sampler (and guidance), drawn with Pillow
(no plotting library needed)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if raw <= m * step)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step) + 1)]


def plot_metric_vs_steps(rows: Sequence[dict], path: str | Path, metric: str = "fid",
                         title: str | None = None, size: tuple[int, int] = (640, 420)) -> Path:
    """Write a PNG of `metric` against `steps` (log-scaled x axis) with one line per (sampler, guidance)."""
    series: dict[str, list[tuple[float, float]]] = {}
    guidances = {float(r["guidance"]) for r in rows}
    for r in rows:
        if r.get(metric) in (None, "") or r.get("steps") in (None, "") or int(r["steps"]) <= 0:
            continue
        name = str(r["sampler"]) + (f" g={float(r['guidance']):g}" if len(guidances) > 1 else "")
        series.setdefault(name, []).append((float(r["steps"]), float(r[metric])))
    if not series:
        raise ValueError(f"no rows with steps and {metric!r} to plot")
    return line_plot(series, path, x_label="sampling steps (log)", title=title or f"{metric} vs sampling steps",
                     log_x=True, size=size)


def plot_fid_vs_adherence(rows: Sequence[dict], path: str | Path, title: str | None = None,
                          size: tuple[int, int] = (640, 420)) -> Path:
    """The guidance trade-off: FID against prompt adherence, one line per (sampler, steps) through its guidance
    scales in order (points labelled g=…), plus single points for the reference rows (real images, autoencoder
    reconstructions: steps 0)."""
    series: dict[str, list[tuple]] = {}
    for r in sorted(rows, key=lambda r: float(r["guidance"])):
        if r.get("fid") in (None, "") or r.get("adherence") in (None, ""):
            continue
        point = (100 * float(r["adherence"]), float(r["fid"]))
        if int(r["steps"]) <= 0:
            series[str(r["sampler"])] = [point]
        else:
            series.setdefault(f"{r['sampler']} {int(r['steps'])} steps", []).append(
                (*point, f"g={float(r['guidance']):g}"))
    if not any(len(pts) > 1 for pts in series.values()):
        raise ValueError("no (sampler, steps) with two or more guidance scales to plot")
    return line_plot(series, path, x_label="prompt adherence (%)", sort_x=False, size=size,
                     title=title or "FID vs prompt adherence over guidance")


def line_plot(series: dict[str, list[tuple]], path: str | Path, *, x_label: str, title: str, log_x: bool = False,
              sort_x: bool = True, size: tuple[int, int] = (640, 420)) -> Path:
    """One line per series of (x, y) or (x, y, point label) points; x ticks at the points' x values when they are
    few, else evenly spaced. `sort_x=False` joins points in the given order (e.g. a trade-off curve)."""
    W, H = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [p[0] for pts in series.values() for p in pts]
    ys = [p[1] for pts in series.values() for p in pts]
    fx = math.log if log_x else (lambda v: v)
    x_lo, x_hi = fx(min(xs)), fx(max(xs))
    pad = max(0.06 * (x_hi - x_lo), 0.3 if log_x else 0.06 * max(abs(x_hi), 1e-9))  # end points off the frame
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_ticks = _ticks(min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0)
    y_lo, y_hi = y_ticks[0], max(y_ticks[-1], max(ys))

    def px(x: float, y: float) -> tuple[float, float]:
        u = (fx(x) - x_lo) / (x_hi - x_lo)
        v = (y - y_lo) / (y_hi - y_lo) if y_hi > y_lo else 0.5
        return left + u * (W - left - right), H - bottom - v * (H - top - bottom)

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for y in y_ticks:
        _, yy = px(min(xs), y)
        draw.line([left, yy, W - right, yy], fill=(225, 225, 225))
        draw.text((5, yy - 6), f"{y:g}", fill="black", font=font)
    x_ticks = sorted(set(xs)) if len(set(xs)) <= 8 or log_x else _ticks(min(xs), max(xs))
    for x in x_ticks:
        xx, _ = px(x, y_lo)
        draw.line([xx, H - bottom, xx, H - bottom + 4], fill="black")
        draw.text((xx - 6, H - bottom + 8), f"{x:.3g}", fill="black", font=font)
    draw.text((W // 2 - 3 * len(x_label), H - 20), x_label, fill="black", font=font)
    draw.text((5, 10), title, fill="black", font=font)
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(pts) if sort_x else list(pts)
        coords = [px(p[0], p[1]) for p in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for (cx, cy), p in zip(coords, pts, strict=True):
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
            if len(p) > 2:
                draw.text((cx + 5, cy - 12), str(p[2]), fill=colour, font=font)
        lx, ly = W - right - 150, top + 8 + 14 * i
        draw.line([lx, ly + 6, lx + 18, ly + 6], fill=colour, width=3)
        draw.text((lx + 24, ly), name, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
