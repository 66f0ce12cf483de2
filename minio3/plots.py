"""Pictures drawn with PIL alone (no plotting library): accuracy against turn cap, one line per
series, and an image with its zoom boxes numbered."""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from minio3.data import atomic_path


def font(size: int = 13):
    """Pillow's scalable default font (readable labels); its old bitmap font if FreeType is missing."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def line_plot(series: dict[str, dict[str, float]], path: Path, title: str, xlabel: str = "turn cap",
              errors: dict[str, dict[str, float]] | None = None):
    """Accuracy against turn cap (or any x), one line per series (drawn with PIL: no plotting library);
    `errors` (same keys) draws a bar of one standard error either side of each point."""
    R = max(130, 45 + 7 * max((len(n) for n in series), default=0))   # room for the longest legend label
    W, H, L, T, B = 510 + R, 420, 64, 40, 50
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.font = font()
    caps = sorted({int(c) for s in series.values() for c in s})
    x = lambda c: L + (W - L - R) * (c - caps[0]) / max(1, caps[-1] - caps[0])   # each x at its true place
    y = lambda v: H - B - (H - T - B) * v
    d.text((L, 12), title, fill="black")
    for v in np.linspace(0, 1, 6):
        d.line([L, y(v), W - R, y(v)], fill=(225, 225, 225))
        d.text((L - 34, y(v) - 6), f"{v:.1f}", fill="black")
    for c in caps:
        d.text((x(c) - 6, H - B + 8), str(c), fill="black")
    d.text(((W - R + L) // 2 - 30, H - 22), xlabel, fill="black")
    d.line([L, T, L, H - B, W - R, H - B], fill="black")
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (90, 90, 90),
               (23, 190, 207), (188, 189, 34), (227, 119, 194), (140, 86, 75), (0, 0, 0), (120, 160, 255)]
    for i, (name, s) in enumerate(series.items()):
        pts = [(x(int(c)), y(v)) for c, v in sorted(s.items(), key=lambda kv: int(kv[0]))]
        col = colours[i % len(colours)]
        d.line(pts, fill=col, width=3)
        for px, py in pts:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
        for c, e in (errors or {}).get(name, {}).items():
            v = s[c]
            d.line([x(int(c)), y(v - e), x(int(c)), y(v + e)], fill=col, width=1)
            d.line([x(int(c)) - 4, y(v - e), x(int(c)) + 4, y(v - e)], fill=col)
            d.line([x(int(c)) - 4, y(v + e), x(int(c)) + 4, y(v + e)], fill=col)
        d.line([W - R + 12, T + 18 * i + 6, W - R + 32, T + 18 * i + 6], fill=col, width=3)
        d.text((W - R + 38, T + 18 * i), name, fill="black")
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def draw_search(image: Image.Image, crops: list[dict], path: str):
    """The image with every zoom box drawn and numbered in order."""
    from PIL import ImageDraw
    im = image.convert("RGB").copy()
    d = ImageDraw.Draw(im)
    w = max(2, im.width // 300)
    for i, c in enumerate(crops, 1):
        x0, y0, x1, y1 = c["pixel_box"]
        d.rectangle([x0, y0, x1, y1], outline=(255, 0, 160), width=w)
        d.text((x0 + w + 2, y0 + w + 2), str(i), fill=(255, 0, 160))
    im.save(path)
