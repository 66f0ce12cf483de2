"""The tiny world: how a probe picture is drawn and what a question about it asks.

A probe image is a large canvas (768-1536 px) with a faint colour gradient, clutter, and objects
(coloured circles, squares, triangles, diamonds), each carrying a character. The question asks for
the character on one of them ("the red triangle"); the look-alikes share its colour, so in the
overview they are blobs of the same colour and only a zoom tells the shapes and the characters
apart. The objects sit one per cell of an 8 x 8 grid (one overview token each at the default
budget), jittered within the cell. `make_probe.py` writes splits of these; the drills, the
explorer (`collect.py`) and the base's tasks (`base.py`) draw with the same code. The last part
reads a picture back by plain pixel rules (colour masks, shape profiles, glyph templates): the
scripted explorer's eyes.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from minio3.conversation import QUESTION, TINY_BUDGET, WORDS, Budget

GRID = 8
# Each sample is drawn from the generator seeded with (seed, SPLIT_IDS[split], index).
SPLIT_IDS = {"train": 1, "test": 2, "base_train": 3, "base_test": 4}
COLOURS = {"red": (214, 40, 40), "green": (36, 150, 60), "blue": (40, 80, 214), "yellow": (236, 196, 24)}
SHAPES = WORDS["shapes"]
GLYPHS = WORDS["glyphs"]
# A 5 x 7 bitmap font: crisp at any integer scale, the same bytes on every machine.
FONT = {
    "0": "01110 10001 10011 10101 11001 10001 01110", "1": "00100 01100 00100 00100 00100 00100 01110",
    "2": "01110 10001 00001 00010 00100 01000 11111", "3": "11110 00001 00001 01110 00001 00001 11110",
    "4": "00010 00110 01010 10010 11111 00010 00010", "5": "11111 10000 11110 00001 00001 10001 01110",
    "6": "00110 01000 10000 11110 10001 10001 01110", "7": "11111 00001 00010 00100 01000 01000 01000",
    "8": "01110 10001 10001 01110 10001 10001 01110", "9": "01110 10001 10001 01111 00001 00010 01100",
    "A": "01110 10001 10001 11111 10001 10001 10001", "E": "11111 10000 10000 11110 10000 10000 11111",
    "H": "10001 10001 10001 11111 10001 10001 10001", "K": "10001 10010 10100 11000 10100 10010 10001",
    "P": "11110 10001 10001 11110 10000 10000 10000", "X": "10001 10001 01010 00100 01010 10001 10001",
}
# Difficulty knobs: canvas size, object size (px), look-alikes (same colour, other shape) and
# other distractor objects (ranges, inclusive), clutter marks.
LEVELS = {
    "easy":   dict(size=1024, obj=64, lookalikes=(1, 2), distractors=(5, 8),   clutter=100),
    "medium": dict(size=1024, obj=56, lookalikes=(3, 5), distractors=(8, 12),  clutter=130),
    "hard":   dict(size=1536, obj=56, lookalikes=(6, 9), distractors=(12, 18), clutter=260),
}
DOT = 4   # one dot of the 5 x 7 glyph, in image pixels: under one pixel in any overview


def ask(question: str) -> str:
    """A synthetic problem: the question, then the image. (VisualProbe puts the image first; the
    protocol places it wherever "<image>" is.) With the question first, causal attention lets the
    image tokens see what is asked, which a model this small needs to pick out one colour."""
    return question + "\n<image>"


BUDGET = TINY_BUDGET   # the tiny default; used for the stats table
_GRADIENTS: dict[int, np.ndarray] = {}


def background(size: int) -> np.ndarray:
    """A faint gradient (red rises left to right, blue top to bottom): every place looks a bit
    different, which gives a small vision tower a cue of absolute position."""
    if size not in _GRADIENTS:
        ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
        img = np.empty((size, size, 3), np.float32)
        img[..., 0] = 150 + 80 * ramp[None, :]
        img[..., 1] = 170 + 10 * (ramp[None, :] + ramp[:, None])
        img[..., 2] = 150 + 80 * ramp[:, None]
        _GRADIENTS[size] = img.round().astype(np.uint8)
    return _GRADIENTS[size]


def draw_glyph(draw: ImageDraw.ImageDraw, char: str, cx: float, cy: float, scale: int, fill):
    rows = FONT[char].split()
    x0, y0 = round(cx - 2.5 * scale), round(cy - 3.5 * scale)
    for r, row in enumerate(rows):
        for c, bit in enumerate(row):
            if bit == "1":
                draw.rectangle([x0 + c * scale, y0 + r * scale, x0 + (c + 1) * scale - 1,
                                y0 + (r + 1) * scale - 1], fill=fill)


def draw_object(draw: ImageDraw.ImageDraw, obj: dict):
    x0, y0, x1, y1 = obj["box"]
    colour = COLOURS[obj["colour"]]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    if obj["shape"] == "circle":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif obj["shape"] == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
    elif obj["shape"] == "triangle":
        draw.polygon([(cx, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=colour)
        cy = y0 + 0.64 * (y1 - y0)   # the glyph sits in the wide part
    else:  # diamond
        draw.polygon([(cx, y0), (x1 - 1, cy), (cx, y1 - 1), (x0, cy)], fill=colour)
    scale = DOT
    ink = (20, 20, 20) if obj["colour"] == "yellow" else (250, 250, 250)
    draw_glyph(draw, obj["glyph"], cx, cy, scale, ink)


def cell_box(cell: int) -> list[float]:
    """Relative box of one grid cell (row-major index)."""
    r, c = divmod(cell, GRID)
    return [c / GRID, r / GRID, (c + 1) / GRID, (r + 1) / GRID]


def scene(rng: np.random.Generator, size: int, obj: int, objects: list[tuple[str, str]], clutter: int):
    """Draw a scene: `objects` is a list of (colour, shape); each gets a random cell and glyph.
    Returns the image and the objects with their pixel boxes, cells and glyphs."""
    img = Image.fromarray(background(size).copy())
    draw = ImageDraw.Draw(img)
    cell_px = size / GRID
    for _ in range(clutter):   # muted marks: lines, dots and frames, never an object's colour
        x, y = rng.uniform(0, size, 2)
        tone = tuple(int(v) for v in rng.integers(70, 190, 3))
        kind = rng.integers(3)
        if kind == 0:
            a = rng.uniform(0, 2 * math.pi)
            ln = rng.uniform(0.2, 0.8) * obj
            width = int(rng.integers(1, 3))
            draw.line([x, y, x + ln * math.cos(a), y + ln * math.sin(a)], fill=tone, width=width)
        elif kind == 1:
            r = rng.uniform(1.5, 0.08 * obj)
            draw.ellipse([x - r, y - r, x + r, y + r], fill=tone)
        else:
            w = rng.uniform(0.2, 0.5) * obj
            draw.rectangle([x, y, x + w, y + 0.6 * w], outline=tone)
    cells = rng.choice(GRID * GRID, size=len(objects), replace=False)
    placed = []
    margin = max(2, int(0.06 * cell_px))
    for (colour, shape), cell in zip(objects, cells):
        r, c = divmod(int(cell), GRID)
        slack = int(cell_px - obj - 2 * margin)
        x0 = int(c * cell_px) + margin + int(rng.integers(0, slack + 1))
        y0 = int(r * cell_px) + margin + int(rng.integers(0, slack + 1))
        o = {"colour": colour, "shape": shape, "glyph": str(rng.choice(GLYPHS)), "cell": int(cell),
             "box": [x0, y0, x0 + obj, y0 + obj]}
        draw_object(draw, o)
        placed.append(o)
    return img, placed


def probe_sample(rng: np.random.Generator, level: str):
    """One visual-search question: (image, record fields, objects). objects[0] is the target."""
    k = LEVELS[level]
    colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
    n_look = int(rng.integers(k["lookalikes"][0], k["lookalikes"][1] + 1))
    n_dis = int(rng.integers(k["distractors"][0], k["distractors"][1] + 1))
    others = [s for s in SHAPES if s != shape]
    objects = [(colour, shape)] + [(colour, str(rng.choice(others))) for _ in range(n_look)]
    other_colours = [c for c in COLOURS if c != colour]
    objects += [(str(rng.choice(other_colours)), str(rng.choice(SHAPES))) for _ in range(n_dis)]
    img, placed = scene(rng, k["size"], k["obj"], objects, k["clutter"])
    fields = {"problem": ask(QUESTION.format(colour=colour, shape=shape)),
              "solution": placed[0]["glyph"], "difficulty": level, "target_bbox": placed[0]["box"],
              "n_lookalikes": n_look, "n_distractors": n_dis}
    return img, fields, placed


def level_stats(level: str, budget: Budget = BUDGET) -> dict:
    """Pixel sizes that decide readability: the target and its glyph in the overview and in a
    one-cell crop, at the given budget."""
    k = LEVELS[level]
    over = budget.size(k["size"], k["size"])[0] / k["size"]
    cell = k["size"] // GRID
    crop = budget.size(cell, cell)[0] / cell
    dot = DOT
    return {"image": k["size"], "object": k["obj"], "object_overview": k["obj"] * over,
            "glyph_overview": 7 * dot * over, "glyph_crop": 7 * dot * crop, "dot_overview": dot * over,
            "dot_crop": dot * crop, "crop_side": budget.size(cell, cell)[0]}


# ----------------------------------------------------------------------------------------------
# Reading a picture back by plain pixel rules: the scripted explorer's eyes (collect.py).
# ----------------------------------------------------------------------------------------------
INK = {"white": lambda a: (a.min(-1) > 190), "black": lambda a: (a.max(-1) < 90)}


def colour_mask(arr: np.ndarray, colour: str, tol: int = 90) -> np.ndarray:
    return np.abs(arr.astype(int) - np.array(COLOURS[colour])).sum(-1) < tol


def blobs_by_cell(arr: np.ndarray, colour: str, min_pixels: int = 8, grid: int = GRID) -> dict:
    """Cells of a grid x grid split of the image (row-major index) that hold a blob of `colour`."""
    mask = colour_mask(arr, colour)
    h, w = mask.shape
    out = {}
    for cell in range(grid * grid):
        r, c = divmod(cell, grid)
        sub = mask[r * h // grid:(r + 1) * h // grid, c * w // grid:(c + 1) * w // grid]
        if sub.sum() >= min_pixels:
            out[cell] = sub
    return out


def shape_of(mask: np.ndarray) -> str | None:
    """circle / square / triangle / diamond from the widths of the blob at 1/4, 1/2, 3/4 height
    (the glyph's ink inside the shape does not matter: only the outermost pixels count)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 8 or ys.max() - ys.min() < 6:
        return None
    y0, y1 = ys.min(), ys.max()
    row = lambda f: ys == round(y0 + f * (y1 - y0))
    width = lambda f: np.ptp(xs[row(f)]) + 1 if row(f).any() else 0
    full = max(np.ptp(xs) + 1, 1)
    w = np.array([width(0.2), width(0.5), width(0.8)]) / full
    profiles = {"square": (1, 1, 1), "circle": (0.8, 1, 0.8), "triangle": (0.3, 0.55, 0.85),
                "diamond": (0.45, 0.95, 0.45)}
    return min(profiles, key=lambda s: np.abs(w - np.array(profiles[s])).sum())


def read_glyph(arr: np.ndarray, mask: np.ndarray, colour: str) -> str | None:
    """Read the character printed on the object in `mask` by matching the 5 x 7 templates."""
    ys, xs = np.nonzero(mask)
    inside = np.zeros_like(mask)   # the shape's interior, away from its (resampled) edges
    for y in range(ys.min() + 2, ys.max() - 1):
        row = xs[ys == y]
        if len(row):
            inside[y, row.min() + 2:row.max() - 1] = True
    ink = INK["black" if colour == "yellow" else "white"](arr) & inside
    ink = ink[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    iy, ix = np.nonzero(ink)
    if len(iy) < 6:
        return None
    top, bottom, left = iy.min(), iy.max() + 1, ix.min()
    dot = (bottom - top) / 7
    best, best_d = None, 99
    for ch, rows in FONT.items():
        bits = np.array([[b == "1" for b in row] for row in rows.split()])
        c0 = np.nonzero(bits.any(0))[0][0]
        yy = (top + (np.arange(7) + 0.5) * dot).astype(int).clip(0, ink.shape[0] - 1)
        xx = (left + (np.arange(5) - c0 + 0.5) * dot).astype(int).clip(0, ink.shape[1] - 1)
        d = int((ink[yy][:, xx] != bits).sum())
        if d < best_d:
            best, best_d = ch, d
    return best if best_d <= 6 else None


def biggest_object(arr: np.ndarray, colour: str) -> np.ndarray | None:
    """The mask of the largest blob of `colour` in a crop, holes filled row by row."""
    mask = colour_mask(arr, colour)
    if mask.sum() < 20:
        return None
    ys, xs = np.nonzero(mask)
    # keep the densest region: the bounding box of pixels near the median position
    cy, cx = np.median(ys), np.median(xs)
    size = max(np.percentile(np.abs(ys - cy), 95), np.percentile(np.abs(xs - cx), 95)) * 1.3 + 2
    near = (np.abs(ys - cy) <= size) & (np.abs(xs - cx) <= size)
    out = np.zeros_like(mask)
    out[ys[near], xs[near]] = True
    return out


def describe_any(arr: np.ndarray) -> tuple[str, str, str] | None:
    """(colour, shape, character) of the largest readable object of any colour in a crop, or None."""
    objs = [(c, m) for c in COLOURS if (m := biggest_object(arr, c)) is not None]
    if not objs:
        return None
    colour, mask = max(objs, key=lambda o: o[1].sum())
    shape, glyph = shape_of(mask), read_glyph(arr, mask, colour)
    return (colour, shape, glyph) if shape and glyph else None
