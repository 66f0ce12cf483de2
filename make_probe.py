"""Stage 0: synthetic Visual-Probe-style data, and converters of the real benchmarks' files.

    python make_probe.py --out data/probe --n-train 600 --n-test 90 --seed 1
    python make_probe.py --from visualprobe FILE.json --images DIR --out data/vp_hard
    python make_probe.py --from vstar DIR --out data/vstar
    python make_probe.py --from hrbench FILE.tsv --out data/hr4k

A probe image is a large canvas (768-1536 px) with a faint colour gradient, clutter, and objects
(coloured circles, squares, triangles, diamonds), each carrying a character. The question asks for
the character on one of them ("the red triangle"); the look-alikes share its colour, so in the
overview they are blobs of the same colour and only a zoom tells the shapes and the characters
apart. The objects sit one per cell of an 8 x 8 grid (one overview token each at the default
budget), jittered within the cell.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import math
import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from common import QUESTION, TINY_BUDGET, WORDS, Budget
from data import InputError, NONNEGATIVE, atomic_path, main_cli, write_jsonl

GRID = 8
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
# Writing splits.
# ----------------------------------------------------------------------------------------------
SPLIT_IDS = {"train": 1, "test": 2, "base_train": 3, "base_test": 4}


def write_probe(out: Path, n_train: int, n_test: int, seed: int, workers: int = 1) -> dict:
    """Both splits, each sample a pure function of (seed, split, index), so `workers` processes
    draw them in any order and the files are the same bytes."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, n in (("train", n_train), ("test", n_test)):
        jobs = [(out, split, i, seed) for i in range(n)]
        if workers > 1 and n > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                rows = pool.map(_write_sample, jobs, chunksize=16)
        else:
            rows = [_write_sample(job) for job in jobs]
        write_jsonl(out / f"{split}.jsonl", rows)
        summary[split] = rows
    return summary


def _write_sample(job: tuple[Path, str, int, int]) -> dict:
    out, split, i, seed = job
    level = list(LEVELS)[i % 3]    # test is balanced; train cycles the levels too
    rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
    img, fields, placed = probe_sample(rng, level)
    name = f"images/{split}_{i:06d}.png"
    with atomic_path(out / name) as tmp:
        img.save(tmp, format="PNG")
    # hidden fields, for the failure analysis only (no searcher reads them): every object
    objects = [{k: o[k] for k in ("colour", "shape", "glyph", "box")} for o in placed]
    return {"images": [name], **{k: fields[k] for k in ("problem", "solution")},
            "data_source": "synthetic_probe", "doc_id": f"{split}-{seed}-{i:06d}", **fields, "objects": objects}


def print_table(summary: dict):
    print(f"{'split':6} {'level':7} {'n':>4} {'image':>6} {'object':>6} {'obj@overview':>12} "
          f"{'glyph@overview':>14} {'glyph@crop':>10} {'look-alikes':>11} {'distractors':>11}")
    for split, rows in summary.items():
        for level in LEVELS:
            sel = [r for r in rows if r["difficulty"] == level]
            if not sel:
                continue
            s = level_stats(level)
            print(f"{split:6} {level:7} {len(sel):4d} {s['image']:6d} {s['object']:6d} "
                  f"{s['object_overview']:10.1f}px {s['glyph_overview']:12.1f}px {s['glyph_crop']:8.1f}px "
                  f"{np.mean([r['n_lookalikes'] for r in sel]):11.1f} "
                  f"{np.mean([r['n_distractors'] for r in sel]):11.1f}")


# ----------------------------------------------------------------------------------------------
# Converters of real benchmark files into the same records.
# ----------------------------------------------------------------------------------------------
def from_visualprobe(path: Path, images: Path, difficulty: str | None) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON: {e.msg} (line {e.lineno})") from None
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON list of records")
    rows = []
    for i, r in enumerate(data):
        for key in ("images", "problem", "solution"):
            if not isinstance(r, dict) or key not in r:
                raise InputError(f"{path}: record {i} has no field {key!r}")
        paths = r["images"]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise InputError(f"{path}: record {i}: field 'images' must be a non-empty list of paths")
        paths = [(images / p).resolve() for p in paths]
        if not all(p.is_relative_to(images.resolve()) for p in paths):
            raise InputError(f"{path}: record {i}: an image path leaves the image folder {images}")
        rows.append({"images": [str(p) for p in paths], "problem": r["problem"],
                     "solution": str(r["solution"]), "data_source": r.get("data_source", "visualprobe"),
                     "doc_id": str(r.get("doc_id", i)),
                     "difficulty": r.get("difficulty", difficulty or "unknown")})
    return rows


def _mc_problem(question: str, options: list[str]) -> str:
    letters = "ABCDEFGH"
    lines = "\n".join(f"({letters[i]}) {o}" for i, o in enumerate(options))
    return f"<image>\n{question}\n{lines}\nAnswer with the option's letter from the given choices directly."


def from_vstar(root: Path, seed: int) -> list[dict]:
    rows = []
    for category in ("direct_attributes", "relative_position"):
        folder = root / category
        if not folder.is_dir():
            continue
        for meta in sorted(folder.glob("*.json")):
            try:
                m = json.loads(meta.read_text(encoding="utf-8"))
                question, options = m["question"], list(m["options"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise InputError(f"{meta}: not a V* annotation ({e})") from None
            image = next((p for p in folder.glob(meta.stem + ".*") if p.suffix.lower() != ".json"), None)
            if image is None:
                raise InputError(f"{meta}: no image beside it")
            # the raw files always list the right option first: shuffle with a fixed seed
            order = np.random.default_rng([seed, len(rows)]).permutation(len(options))
            shuffled = [options[j] for j in order]
            rows.append({"images": [str(image.resolve())], "problem": _mc_problem(question, shuffled),
                         "solution": "ABCDEFGH"[int(np.where(order == 0)[0][0])], "options": shuffled,
                         "data_source": "vstar", "doc_id": f"{category}/{meta.stem}", "difficulty": category})
    if not rows:
        raise InputError(f"{root}: no direct_attributes/ or relative_position/ annotations found")
    return rows


def from_hrbench(path: Path, out: Path) -> list[dict]:
    import csv
    csv.field_size_limit(1 << 30)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        need = {"index", "question", "answer", "A", "B", "C", "D", "category", "image"}
        if not need <= set(reader.fieldnames or []):
            raise InputError(f"{path}: missing columns {sorted(need - set(reader.fieldnames or []))}")
        for lineno, r in enumerate(reader, 2):
            try:
                data = base64.b64decode(r["image"], validate=True)
                img = Image.open(io.BytesIO(data))
                img.load()
            except Exception as e:
                raise InputError(f"{path}:{lineno}: column 'image' is not a base64 image ({e})") from None
            # the index names a file: only letters, digits, - and _ (a row cannot write outside --out)
            safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(r["index"]))[:80]
            name = f"images/hr_{safe}.{(img.format or 'png').lower()}"
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(data)
            options = [r[k] for k in "ABCD"]
            rows.append({"images": [name], "problem": _mc_problem(r["question"], options),
                         "solution": r["answer"].strip(), "options": options, "data_source": "hrbench",
                         "doc_id": str(r["index"]), "difficulty": r["category"],
                         "cycle_category": r.get("cycle_category", "")})
    return rows


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny/probe", help="folder for *.jsonl and images/")
    syn = ap.add_argument_group("synthetic probe (default)")
    syn.add_argument("--n-train", type=NONNEGATIVE, default=600)
    syn.add_argument("--n-test", type=NONNEGATIVE, default=90)
    syn.add_argument("--seed", type=int, default=1, help="also shuffles V* options")
    syn.add_argument("--workers", type=NONNEGATIVE, default=os.cpu_count() or 1,
                     help="processes drawing the pictures (the files do not depend on it)")
    conv = ap.add_argument_group("converting a benchmark (writes <out>/test.jsonl)")
    conv.add_argument("--from", dest="source", choices=["visualprobe", "vstar", "hrbench"])
    conv.add_argument("input", nargs="?", help="the benchmark file or folder to convert (with --from)")
    conv.add_argument("--images", help="VisualProbe's image folder")
    conv.add_argument("--difficulty", help="VisualProbe split name to record (easy/medium/hard)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    if not args.source:
        print_table(write_probe(out, args.n_train, args.n_test, args.seed, args.workers))
        print(f"wrote {out} in {time.time() - t0:.1f}s")
        return
    if not args.input:
        ap.error("--from needs the input file or folder")
    src = Path(args.input)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if args.source == "visualprobe":
        rows = from_visualprobe(src, Path(args.images or src.parent), args.difficulty)
    elif args.source == "vstar":
        rows = from_vstar(src, args.seed)
    else:
        rows = from_hrbench(src, out)
    write_jsonl(out / "test.jsonl", rows)
    print(f"wrote {len(rows)} records to {out / 'test.jsonl'} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main_cli(main)
