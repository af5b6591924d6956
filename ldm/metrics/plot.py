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
    W, H = size
    left, right, top, bottom = 70, 20, 40, 50
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = [x for pts in series.values() for x, _ in pts]
    ys = [y for pts in series.values() for _, y in pts]
    x_lo, x_hi = math.log(min(xs)), math.log(max(xs))
    pad = max(0.06 * (x_hi - x_lo), 0.3)  # keep the end points off the frame
    x_lo, x_hi = x_lo - pad, x_hi + pad
    y_ticks = _ticks(min(0.0, min(ys)), max(ys) * 1.05 if max(ys) > 0 else 1.0)
    y_lo, y_hi = y_ticks[0], max(y_ticks[-1], max(ys))

    def px(x: float, y: float) -> tuple[float, float]:
        u = (math.log(x) - x_lo) / (x_hi - x_lo)
        v = (y - y_lo) / (y_hi - y_lo) if y_hi > y_lo else 0.5
        return left + u * (W - left - right), H - bottom - v * (H - top - bottom)

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for y in y_ticks:
        _, yy = px(min(xs), y)
        draw.line([left, yy, W - right, yy], fill=(225, 225, 225))
        draw.text((5, yy - 6), f"{y:g}", fill="black", font=font)
    for x in sorted(set(xs)):
        xx, _ = px(x, y_lo)
        draw.line([xx, H - bottom, xx, H - bottom + 4], fill="black")
        draw.text((xx - 6, H - bottom + 8), f"{x:g}", fill="black", font=font)
    draw.text((W // 2 - 50, H - 20), "sampling steps (log)", fill="black", font=font)
    draw.text((5, 10), title or f"{metric} vs sampling steps", fill="black", font=font)
    for i, (name, pts) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        pts = sorted(pts)
        coords = [px(x, y) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 3, cy - 3, cx + 3, cy + 3], fill=colour)
        lx, ly = W - right - 150, top + 8 + 14 * i
        draw.line([lx, ly + 6, lx + 18, ly + 6], fill=colour, width=3)
        draw.text((lx + 24, ly), name, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
