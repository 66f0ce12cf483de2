"""The tiny base: single-turn perception pretraining of the tiny model, from random weights.

    python -m research.base --write-data data/base --n-test 500 --seed 7          # held-out base records
    python -m research.base --init tiny --out runs/base/ck --steps 15000 --batch 16 --lr 1e-3 --vision-lr 3e-3 \
                   --warmup 0.01 --eval-data data/base/base_test.jsonl --eval-every 1500

Reads: nothing but --init (the pictures are drawn on the fly; --eval-data: held-out records).
Writes: a checkpoint folder (--out) and its log, as sft.py does; with --write-data, records
(base_train.jsonl, base_test.jsonl, images/) that sft.py can mix into trajectory training.

*Paper:* Mini-o3 starts from Qwen2.5-VL-7B-Instruct, which already reads and grounds. Here the tiny
model starts from nothing, so this script teaches it to see in the tiny world first, in the plain
chat format: describe the object in a crop; read its character; give the box of an object; list
the boxes of all objects of one colour; find "the red triangle" in an easy overview (and, as
options, text-only drills: `compare`, of the search's verdict; `ledger`, of stepping through one's
own list). An auxiliary per-token loss on the vision tower (colour, shape, character and grid cell
of what each image token shows) and vision-only steps on dense "glyph sheets" give the small vision
tower dense targets (research/LOG.md tells how each was found). It trains through
minio3/trainer.py's `train`, the same loop as SFT.
The result is committed as checkpoints/tiny-base, so nobody has to run this.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from minio3.conversation import Budget, IM_END, PLAIN_SYSTEM_PROMPT, SYSTEM_PROMPT, fmt_box, render, verdict
from minio3.data import NONNEGATIVE, NONNEGATIVE_FLOAT, atomic_path, load_image, main_cli, write_jsonl
from minio3.engine import Engine, Sample, Settings
from minio3.model import collate, pick_device, seed_everything, start_run
from minio3.drills import drill_accuracy, drill_batch
from minio3.trainer import add_training_args, read_held_out, spread, train
from sft import sft_loss
from minio3.world import (BUDGET, COLOURS, DOT, GLYPHS, GRID, LEVELS, SHAPES, SPLIT_IDS, ask, background,
                   cell_box, draw_object, probe_sample, scene)

# ----------------------------------------------------------------------------------------------
# The tasks: each sample is (image, question, answer text) rendered like the later stages render a turn
# ----------------------------------------------------------------------------------------------
BASE_TASKS = ["describe", "read", "locate", "list", "find", "verify"]
TEXT_TASKS = ["compare", "ledger"]   # no picture: sft.drill_batch's verdict and ledger drills


def describe_object(o: dict) -> str:
    return f"a {o['colour']} {o['shape']} with the character {o['glyph']}"


AUX_SIZES = (1 + len(COLOURS), 1 + len(SHAPES), 1 + len(GLYPHS), GRID, GRID)   # classes per label


def token_labels(placed: list[dict], box: tuple[int, int, int, int], size: int, shown: tuple[int, int]):
    """Per-token targets for the base model's auxiliary heads, [tokens, 5]: colour, shape and
    character of the object a token shows (0 = none, -100 = not judged) and the grid row and
    column of the token's centre in the whole scene. `box` is the region of the scene (pixels)
    that the image shows; `shown` its size at the budget (28 px a token)."""
    x0, y0, x1, y1 = box
    W, H = shown
    gw, gh = W // 28, H // 28
    sx, sy = (x1 - x0) / W, (y1 - y0) / H                     # scene pixels per shown pixel
    lab = np.zeros((gh, gw, 5), np.int64)
    cx = x0 + (np.arange(gw) + 0.5) * 28 * sx
    cy = y0 + (np.arange(gh) + 0.5) * 28 * sy
    lab[..., 3] = np.clip(cy * GRID // size, 0, GRID - 1)[:, None]
    lab[..., 4] = np.clip(cx * GRID // size, 0, GRID - 1)[None, :]
    colours, glyphs = list(COLOURS), GLYPHS
    for o in placed:
        ox0, ox1 = (o["box"][0] - x0) / sx, (o["box"][2] - x0) / sx
        oy0, oy1 = (o["box"][1] - y0) / sy, (o["box"][3] - y0) / sy
        c0, c1 = max(0, int(ox0 // 28)), min(gw, int(np.ceil(ox1 / 28)))
        r0, r1 = max(0, int(oy0 // 28)), min(gh, int(np.ceil(oy1 / 28)))
        if c0 >= c1 or r0 >= r1:
            continue
        seen = ox1 - ox0                                       # the object's size as shown
        lab[r0:r1, c0:c1, 0] = 1 + colours.index(o["colour"])
        lab[r0:r1, c0:c1, 1] = 1 + SHAPES.index(o["shape"]) if seen >= 12 else -100
        lab[r0:r1, c0:c1, 2] = -100                            # parts of the glyph: not judged
        mr, mc = int((oy0 + oy1) / 2 // 28), int((ox0 + ox1) / 2 // 28)
        if DOT / sx >= 2 and 0 <= mr < gh and 0 <= mc < gw:   # readable: its centre token names it
            lab[mr, mc, 2] = 1 + glyphs.index(o["glyph"])
    return lab.reshape(-1, 5)


def glyph_sheet(rng: np.random.Generator, size: int = 280, per_side: int = 4):
    """A dense sheet of objects drawn at zoom-in scale (4 px glyph dots), on a patch of the
    gradient background: many labelled shapes and characters a picture, for the vision tower's
    auxiliary pretraining. Returns the image and its per-token labels (no grid position)."""
    scene_size = int(rng.choice([1024, 1536]))
    ox, oy = rng.integers(0, scene_size - size, 2)
    img = Image.fromarray(background(scene_size)[oy:oy + size, ox:ox + size].copy())
    draw = ImageDraw.Draw(img)
    cell = size // per_side
    placed = []
    for r in range(per_side):
        for c in range(per_side):
            if rng.random() < 0.15:
                continue
            obj = int(rng.integers(cell - 14, cell - 3))
            x0 = c * cell + int(rng.integers(0, cell - obj + 1))
            y0 = r * cell + int(rng.integers(0, cell - obj + 1))
            o = {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)),
                 "glyph": str(rng.choice(GLYPHS)), "box": [x0, y0, x0 + obj, y0 + obj]}
            draw_object(draw, o)
            placed.append(o)
    labels = token_labels(placed, (0, 0, size, size), size, img.size)
    labels[:, 3:] = -100
    return img, labels


def labelled_overview(rng: np.random.Generator, level: str, budget: Budget = BUDGET):
    """A probe scene's overview at the budget with its per-token labels (vision pretraining)."""
    img, _, placed = probe_sample(rng, level)
    shown = budget.resize(img)
    return shown, token_labels(placed, (0, 0) + img.size, img.width, shown.size)


def crop_sample(rng: np.random.Generator, task: str, budget: Budget, level: str):
    """describe / read / verify: a one-cell crop around one object of a probe picture."""
    k = LEVELS[level]
    img, fields, placed = probe_sample(rng, level)
    o = placed[int(rng.integers(len(placed)))]
    box = tuple(int(v * k["size"]) for v in cell_box(o["cell"]))
    shown = budget.resize(img.crop(box))
    meta = {"glyph": o["glyph"], "colour": o["colour"], "shape": o["shape"],
            "tokens": token_labels(placed, box, k["size"], shown.size)}
    if task == "describe":
        return shown, "What is in this image?", f"It is {describe_object(o)}.", meta
    if task == "verify":
        others = [s for s in SHAPES if s != o["shape"]]
        asked = o["shape"] if rng.random() < 0.5 else str(rng.choice(others))
        answer = verdict(o["colour"], asked, o["shape"], o["glyph"])
        return shown, f"Is this the {o['colour']} {asked}?", answer, meta
    return shown, f"What is the character printed on the {o['colour']} {o['shape']}?", o["glyph"], meta


def base_sample(rng: np.random.Generator, task: str, budget: Budget = BUDGET, level: str | None = None):
    """One perception sample at the pixel budget the pipeline uses: (image, question, answer, meta).

    describe: a one-cell crop around an object -> its colour, shape and character
    read:     the same crop, asked for the character of "the <colour> <shape>" (answer: the glyph)
    locate:   an overview with one object -> the box of its cell
    list:     an overview with many objects -> the boxes of all objects of one colour, in reading order
    find:     an easy overview (shapes visible) -> the box of "the <colour> <shape>"
    verify:   a one-cell crop, asked "Is this the <colour> <shape>?" (half the time it is, else a
              look-alike of the same colour) -> the search's verdict sentence, description first
    `meta` holds what scoring needs (the target's pixel box, the listed cells).
    """
    level = level or str(rng.choice(list(LEVELS)))
    k = LEVELS[level]
    if task in ("describe", "read", "verify"):
        return crop_sample(rng, task, budget, level)
    if task == "locate":
        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        img, placed = scene(rng, k["size"], k["obj"], [(colour, shape)], k["clutter"])
        o = placed[0]
    elif task == "list":
        img, fields, placed = probe_sample(rng, level)
        colour = placed[int(rng.integers(len(placed)))]["colour"]
        cells = sorted(o["cell"] for o in placed if o["colour"] == colour)
        boxes = ", ".join(fmt_box(cell_box(c)) for c in cells)
        shown = budget.resize(img)
        return (shown, f"Where are the {colour} objects?", f"The {colour} objects: {boxes}.",
                {"cells": cells, "tokens": token_labels(placed, (0, 0) + img.size, img.width, shown.size)})
    elif task == "find":
        img, fields, placed = probe_sample(rng, "easy")
        o = placed[int(rng.integers(len(placed)))]
        if sum(p["colour"] == o["colour"] and p["shape"] == o["shape"] for p in placed) > 1:
            o = placed[0]   # ask only about a unique object
    else:
        raise ValueError(f"unknown base task {task!r}; choose from {BASE_TASKS}")
    shown = budget.resize(img)
    return (shown, f"Where is the {o['colour']} {o['shape']}? Give its box.",
            f"The {o['colour']} {o['shape']} is at {fmt_box(cell_box(o['cell']))}.",
            {"target_bbox": [v / img.width for v in o["box"]],
             "tokens": token_labels(placed, (0, 0) + img.size, img.width, shown.size)})


# ----------------------------------------------------------------------------------------------
# The curriculum: which task, drawn on the fly, at which step
# ----------------------------------------------------------------------------------------------
BASE_CURRICULUM = [  # (first step, task weights). "sheet" and "scene" train the vision tower only.
    (0, {"sheet": 0.6, "scene": 0.4}),
    (1500, {"describe": 0.2, "read": 0.15, "locate": 0.2, "list": 0.15, "sheet": 0.15, "scene": 0.15}),
    (4000, {"describe": 0.15, "read": 0.1, "locate": 0.15, "list": 0.3, "find": 0.15, "sheet": 0.15}),
    (5400, {"describe": 0.1, "read": 0.1, "locate": 0.05, "list": 0.4, "find": 0.2, "sheet": 0.15}),
]
SEARCH_PROMPT_SHARE = 0.5


def base_batch(step: int, size: int, seed: int, processor, weights: dict | None = None, style: str = "ledger"):
    """A micro-batch of one base task at one difficulty level (so image sizes, and with them the
    matrix shapes, repeat from batch to batch; `style`: the verdict drills' wording). Returns (task, samples)."""
    weights = weights or [w for start, w in BASE_CURRICULUM if step >= start][-1]
    rng = np.random.default_rng([seed, step])
    task = str(rng.choice(list(weights), p=np.array(list(weights.values())) / sum(weights.values())))
    level = str(rng.choice(list(LEVELS)))
    # half the language records carry the search protocol's long system prompt instead of the plain
    # one, so that grounding and reading survive that context (the SFT stage starts from it)
    system = SYSTEM_PROMPT if rng.random() < SEARCH_PROMPT_SHARE else PLAIN_SYSTEM_PROMPT
    if task == "sheet":      # dense sheets of labelled objects: 4 x 4 a picture, so fewer pictures
        return task, [dict(zip(("shown", "aux"), ([im], lab))) for im, lab in
                      (glyph_sheet(rng) for _ in range(max(1, size // 2)))]
    if task == "compare":    # text only, short: twice as many a batch
        return task, drill_batch(step, 2 * size, seed, processor, search_share=SEARCH_PROMPT_SHARE, style=style)
    if task == "ledger":     # text only, a whole search's copies: as many as the batch size
        return task, drill_batch(step, size, seed, processor, search_share=SEARCH_PROMPT_SHARE, kind="ledger")
    if task == "scene":
        return task, [dict(zip(("shown", "aux"), ([im], lab))) for im, lab in
                      (labelled_overview(rng, level, processor.budget) for _ in range(size))]
    out = []
    for _ in range(size):
        img, question, answer, meta = base_sample(rng, task, processor.budget, level)
        out.append({**render(img, ask(question), [answer], processor, system=system), "aux": meta["tokens"]})
    return task, out


# ----------------------------------------------------------------------------------------------
# The auxiliary loss on the vision tower's output
# ----------------------------------------------------------------------------------------------
def aux_loss(head: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Auxiliary per-token classification on the vision tower's output (base pretraining only):
    colour, shape and character of what each image token shows, and its grid row and column.
    Dense targets reach the small vision tower directly, instead of only through the few answer
    tokens; the head is thrown away afterwards and the model stays the stock architecture."""
    logits = head(feats.float()).split(AUX_SIZES, dim=-1)
    judged = [j for j in range(len(logits)) if (labels[:, j] != -100).any()]   # (sheets: no grid position)
    return sum(F.cross_entropy(logits[j], labels[:, j], ignore_index=-100) for j in judged) / len(logits)


def base_loss(model, head, weight: float):
    """The loss of a base micro-batch: SFT's on the answer tokens (none for a vision-only batch)
    plus `weight` x the auxiliary loss on the vision tower's output, captured by a forward hook."""
    captured = {}
    if head is not None:
        capture = lambda module, inputs, output: captured.__setitem__("feats", output.pooler_output)
        model.model.visual.register_forward_hook(capture)

    def loss_fn(model, batch, n_tokens, n_micro):
        if "input_ids" in batch:
            loss = sft_loss(model, batch, n_tokens, n_micro)
        else:            # a vision-only batch: the auxiliary loss alone
            model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
            loss = torch.zeros((), device=batch["pixel_values"].device)
        if head is not None and "aux" in batch:
            with torch.autocast("cuda", enabled=False):
                loss = loss + weight * aux_loss(head, captured["feats"], batch["aux"]) / n_micro
        return loss
    return loss_fn


# ----------------------------------------------------------------------------------------------
# Evaluation of base records: greedy decode, then per-task accuracy
# ----------------------------------------------------------------------------------------------
def _boxes(text: str) -> list[list[float]]:
    return [[float(v) for v in m.split(",")] for m in re.findall(r"\[([0-9., ]+)\]", text)
            if len(m.split(",")) == 4]


def score_base(row: dict, pred: str) -> float:
    """read/describe/list: exact answer; locate/find: the box given contains the target's box."""
    pred = pred.strip()
    if row["task"] in ("locate", "find"):
        boxes = _boxes(pred)
        if not boxes:
            return 0.0
        (x0, y0, x1, y1), (t0, u0, t1, u1) = boxes[0], row["target_bbox"]
        return float(x0 <= t0 + 1e-3 and y0 <= u0 + 1e-3 and x1 >= t1 - 1e-3 and y1 >= u1 - 1e-3)
    return float(pred == row["solution"].strip())


@torch.no_grad()
def evaluate_base(model, processor, rows: list[dict], root: Path, max_new_tokens: int = 160) -> dict:
    samples = [Sample(load_image(r, root), r["problem"], system=PLAIN_SYSTEM_PROMPT) for r in rows]
    settings = Settings(max_turns=1, greedy=True, max_turn_tokens=max_new_tokens)
    results = Engine(model, processor).run(samples, settings, progress=False)
    per: dict[str, list[float]] = {}
    for r, res in zip(rows, results):
        per.setdefault(r["task"], []).append(score_base(r, res.turn_texts[0].replace(IM_END, "")))
    return {t: float(np.mean(v)) for t, v in sorted(per.items())}


# ----------------------------------------------------------------------------------------------
# Records on disk (held-out evaluation; mixing into SFT)
# ----------------------------------------------------------------------------------------------
def write_base(out: Path, n_train: int, n_test: int, seed: int, tasks: list[str] = BASE_TASKS):
    (out / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("base_train", n_train), ("base_test", n_test)):
        rows = []
        for i in range(n):
            task = tasks[i % len(tasks)]
            rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
            img, question, answer, meta = base_sample(rng, task)
            meta.pop("tokens")
            name = f"images/{split}_{i:06d}.png"
            with atomic_path(out / name) as tmp:
                img.save(tmp, format="PNG")
            rows.append({"images": [name], "problem": ask(question), "solution": answer,
                         "data_source": "synthetic_base", "system": "search" if task == "verify" else "plain",
                         "doc_id": f"{split}-{seed}-{i:06d}", "task": task, **meta})
        write_jsonl(out / f"{split}.jsonl", rows)
        print(f"{split}: {n} records ({', '.join(tasks)} in turn)")


def task_weights(text: str) -> dict[str, float]:
    """--tasks "read:1,locate:2": known task names with positive weights."""
    known = BASE_TASKS + TEXT_TASKS + ["sheet", "scene"]
    try:
        weights = {k: float(v) for k, v in (p.split(":") for p in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form task:weight,task:weight") from None
    bad = [k for k, v in weights.items() if k not in known or not v > 0]
    if bad:
        raise argparse.ArgumentTypeError(f"{bad[0]!r}: tasks are {', '.join(known)}, with weights > 0")
    return weights


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write-data", metavar="DIR", help="write base records to DIR instead of training")
    ap.add_argument("--n-train", type=NONNEGATIVE, default=0, help="with --write-data: training records")
    ap.add_argument("--n-test", type=NONNEGATIVE, default=500, help="with --write-data: held-out records")
    ap.add_argument("--aux", type=NONNEGATIVE_FLOAT, default=1.0, help="auxiliary loss weight (0: off)")
    ap.add_argument("--tasks", type=task_weights, default=None,
                    help="task weights, e.g. read:1,locate:2 (default: the curriculum)")
    add_training_args(ap, init="tiny", out="runs/base/ck", steps=15000)
    args = ap.parse_args(argv)
    if args.write_data:
        tasks = [t for t in args.tasks if t in BASE_TASKS] if args.tasks else BASE_TASKS
        return write_base(Path(args.write_data), args.n_train, args.n_test, args.seed, tasks)
    if args.threads:
        torch.set_num_threads(args.threads)
    weights = args.tasks
    held_out = read_held_out(args.eval_data, 10 ** 9, ("images", "problem", "solution", "task"))
    held_out = spread([r for r in held_out if not weights or r["task"] in weights], args.eval_n)  # trained tasks
    seed_everything(args.seed)
    model, processor, state = start_run(Path(args.out), args.init, args.resume, pick_device(), args.overwrite)
    for p in model.model.visual.parameters():   # the vision tower learns here
        p.requires_grad_(True)
    head = None
    if args.aux > 0:
        head = torch.nn.Linear(model.config.vision_config.out_hidden_size, sum(AUX_SIZES)).to(model.device)
    make = lambda k: (lambda task, samples: (task, collate(samples, processor, "cpu")))(
        *base_batch(k, args.batch, args.seed, processor, weights, args.verdict_style))
    drills = {"compare": "verdict", "ledger": "ledger"}
    drills = {task: kind for task, kind in drills.items() if task in (weights or {})}
    evaluate = None
    if held_out or drills:   # held-out records, and fresh drills of each kind trained
        root = Path(args.eval_data).parent if held_out else None
        evaluate = lambda m: {**(evaluate_base(m, processor, held_out, root) if held_out else {}),
                              **{task: drill_accuracy(m, processor, style=args.verdict_style, kind=kind)
                                 for task, kind in drills.items()}}
    train(args, model, processor, state, make, base_loss(model, head, args.aux), evaluate,
          {"aux_head": head} if head is not None else {})


if __name__ == "__main__":
    main_cli(main)
