"""Stage 1: cold-start trajectories, collected iteratively and filtered by correctness.

    python collect.py                                            # explorer teacher on the synthetic probe
    python collect.py --model runs/tiny/sft --samples 4 --out runs/tiny/round1.jsonl   # self rollouts
    python collect.py --teacher Qwen/Qwen2.5-VL-7B-Instruct --data data/vp_train/train.jsonl   # few-shot VLM

Three sources, one output: a JSONL of trajectories (the question's record, the assistant turns'
texts, the answer, whether it is correct, the search pattern) that sft.py replays into exactly the
tokens the engine would produce. Only correct trajectories are kept, duplicates dropped, and no
pattern may take more than --max-share of the set.

The explorer is a scripted searcher that acts only on what the protocol shows a model: the overview
at the pixel budget, then each crop it asked for. It never reads the record's hidden fields.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from common import (Episode, IMAGE, IM_END, IM_START, ROOT, TINY_BUDGET, fmt_box, grade, has_special, look_verdict,
                    verdict, zoom_text)
from data import (InputError, NONNEGATIVE, NONNEGATIVE_FLOAT, POSITIVE, PROBABILITY, SHARE, load_image,
                  main_cli, read_records, turn_text, write_jsonl)
from infer import Engine, Sample, Settings
from model import load, pick_device, resolve_checkpoint
from protocol import DEFAULT, Protocol, add_protocol_args, apply_pixels, parse_with_preset, protocol_from_args
import sharegpt
from world import (COLOURS, GRID, SHAPES, biggest_object, blobs_by_cell, cell_box, describe_any, probe_sample,
                   read_glyph, shape_of)

# ----------------------------------------------------------------------------------------------
# The explorer: plays one episode through an Episode, writing its reasoning as it goes.
# ----------------------------------------------------------------------------------------------
def parse_question(problem: str) -> tuple[str, str] | None:
    words = problem.lower().replace("?", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return (colour, shape) if colour and shape else None


def said(thought: str, action: str) -> str:
    """One assistant turn: a thought, then an action (a zoom or an answer)."""
    return f"<think>{thought}</think>\n{action}"


# Thought styles of a one-by-one search. "ledger" (the default): after each miss the thought lists
# the boxes still to check, so the next zoom is the first box of a list the model has just written
# (a copy, not a search through its own earlier turns). "plain": "I check the next one" (before
# issue 12). The verdict follows the description in both: "It is a green triangle with the
# character 8, not the green circle." (base.py's `verify` task teaches the same sentence.)
# "compare": a ledger whose verdict puts the two shapes side by side before deciding ("... with the
# character 8. I want the green circle: triangle is not circle."), so the decision compares two
# words just written instead of one word with the question far above (common.verdict's styles).
# "backward": a ledger checked from its end, so every list (the opening one, each "Left to check:")
# ends on the box the call zooms into, a fixed few tokens before it: the call copies the box just
# written instead of picking the first of many look-alike boxes far back (NOTES section 9).
# "chain": no ledger; after a miss the thought writes the box just checked and the one after it in
# the opening list ("Next in the list: [a], [b]."), the very words of that list, so the next box is
# what follows the same words further up (a copy keyed on a whole box), and the call copies the box
# just written. The opening thought ends by repeating "the <colour> objects: [first]" the same way.
# "chain-compare": the chain's steps with the compare style's verdicts. "chain-goal": the chain's
# steps with the goal style's ("I want the green circle. It is a green triangle with the character
# 8: triangle is not circle."): each turn after a crop opens by naming the asked object again.
# "index-goal": the opening list numbers its boxes ("(1) [a], (2) [b], ..."), and after a miss the
# thought names the next number and its box ("Next: (3) [c]."): the number is the previous turn's
# plus one, and the box is what follows that number in the list, a copy keyed on three short
# tokens that occur once, where the chain's key is a whole box; the goal style's verdicts.
STYLES = ("ledger", "plain", "compare", "backward", "chain", "chain-compare", "chain-goal", "index-goal")
VERDICT_STYLE = {"ledger": "ledger", "plain": "ledger", "compare": "compare", "backward": "ledger", "chain": "ledger",
                 "chain-compare": "compare", "chain-goal": "goal", "index-goal": "goal"}


def found(colour: str, shape: str, glyph: str, style: str = "ledger") -> str:
    return said(verdict(colour, shape, shape, glyph, VERDICT_STYLE[style]), f"<answer>{glyph}</answer>")


def step_text(style: str, left: list[list[float]], checked: list[float] | None, number: int = 0) -> str:
    """How a thought after a miss names the next box (see STYLES); `number`: its place in the
    opening list, from 1 (the index style)."""
    nxt = left[-1] if style == "backward" else left[0]
    return ("I check the next one." if style == "plain"
            else f"Next: ({number}) {fmt_box(nxt)}." if style.startswith("index")
            else f"Next in the list: {fmt_box(checked)}, {fmt_box(nxt)}." if style.startswith("chain")
            else "Left to check: " + ", ".join(fmt_box(b) for b in left) + ".")


def missed(colour: str, shape: str, seen_shape: str | None, glyph: str | None, style: str, step: str,
           box: list[float]) -> str:
    """A turn after a crop that did not show the asked-for object: say so, name the next box (`step`,
    from step_text), then zoom on `box` (the next box, or where a slip lands: see `slip`)."""
    return said(f"{verdict(colour, shape, seen_shape, glyph, VERDICT_STYLE[style])} {step}", zoom_text(box))


# A slip (collect.py --slips P): after a miss, the call zooms a cell next to the box its own thought
# named, one row or column off, with no pixel of the asked colour in the overview (the tiny model's
# commonest copying error is such an off-by-one box);
# the next turn says what that crop shows (nothing, or an object of another colour: "... I want the
# red square: blue is not red.") and names the same box again. The slipped turn is stored as
# {"text", "learn": false}: SFT replays it but takes no loss on it, so only the recovery is taught.
def slip(cell: int, avoid: set[int], rng: random.Random) -> int | None:
    """A cell a row or a column away from `cell` and not in `avoid` (cells with any pixel of the asked
    colour in the overview), or None."""
    r, c = divmod(cell, GRID)
    near = [(r + dr) * GRID + c + dc for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= r + dr < GRID and 0 <= c + dc < GRID and (r + dr) * GRID + c + dc not in avoid]
    return rng.choice(near) if near else None


def recovered(colour: str, shape: str, seen: tuple[str, str, str] | None, style: str, step: str,
              box: list[float]) -> str:
    """The turn after a slip's crop: what it shows, then the box that was meant, again."""
    what = look_verdict(colour, shape, seen, VERDICT_STYLE[style])
    return said(f"{what} {step}", zoom_text(box))


NO_ANSWER = "<answer>none</answer>"


def explore(image: Image.Image, problem: str, budget, rng: random.Random, max_turns: int = 16,
            depth_first: float = 0.0, style: str = "ledger", slips: float = 0.0) -> dict | None:
    """Search like a model would: returns {"turns": [...], "answer", "pattern"} or None when the
    question is not one the explorer understands."""
    goal = parse_question(problem)
    if goal is None:
        return None
    colour, shape = goal
    ep = Episode(image, budget)
    overview = np.asarray(ep.shown[0])
    cells = sorted(blobs_by_cell(overview, colour))

    def look(box: list[float]) -> np.ndarray:
        _, shown = ep.apply(ep.parse(zoom_text(box)))
        return np.asarray(shown)

    def check(arr: np.ndarray) -> tuple[str | None, str | None]:
        obj = biggest_object(arr, colour)
        return (None, None) if obj is None else (shape_of(obj), read_glyph(arr, obj, colour))

    if not cells:
        turns = [said(f"I see no {colour} object at this size. I look at the whole image more closely.",
                      zoom_text([0.0, 0.0, 0.5, 0.5])),
                 said(f"I cannot find the {colour} {shape}.", NO_ANSWER)]
        return {"turns": turns, "answer": "none", "pattern": "failed"}
    # in a large overview blob the shape can be told apart: then one zoom is enough
    blob_h = lambda m: np.ptp(np.nonzero(m)[0]) + 1
    seen = {c: shape_of(m) if blob_h(m) >= 12 else None for c, m in blobs_by_cell(overview, colour).items()}
    direct = [c for c in cells if seen[c] == shape]
    if len(direct) == 1 and all(seen[c] not in (None, shape) for c in cells if c != direct[0]):
        box = cell_box(direct[0])
        got_shape, glyph = check(look(box))
        if got_shape == shape and glyph:
            thought = f"I am looking for the {colour} {shape}. The {colour} {shape} is at {fmt_box(box)}."
            turns = [said(thought, zoom_text(box)), found(colour, shape, glyph, style)]
            return {"turns": turns, "answer": glyph, "pattern": "direct"}
        ep = Episode(image, budget)   # fall back to checking every candidate
    number = (lambda k: f"({k + 1}) ") if style.startswith("index") else (lambda k: "")
    listing = ", ".join(number(k) + fmt_box(cell_box(c)) for k, c in enumerate(cells))
    intro = f"I am looking for the {colour} {shape}. The {colour} objects: {listing}."
    if depth_first and len(cells) >= 4 and rng.random() < depth_first:
        return _depth_first(cells, colour, shape, intro, max_turns, check, look, style)
    avoid = set(blobs_by_cell(overview, colour, min_pixels=1))

    def slip_to(cell: int) -> list[float] | None:   # where a slip before `cell` lands, if one happens
        wrong = slip(cell, avoid, rng) if slips and rng.random() < slips else None
        return None if wrong is None else cell_box(wrong)
    return _one_by_one(cells, colour, shape, intro, max_turns, check, look, style, slip_to)


def _one_by_one(cells, colour, shape, intro, max_turns, check, look, style: str = "ledger", slip_to=None) -> dict:
    """Zoom into each candidate cell in reading order (backward: from the last) until one shows the
    asked-for shape. The lists stay in reading order; the backward one ends on its next box."""
    backward = style == "backward"
    first = fmt_box(cell_box(cells[0]))
    how = (f"the {colour} objects: {first}" if style.startswith("chain")       # the list's own words again
           else f"them in order: (1) {first}" if style.startswith("index") else "them one by one")
    more = "" if len(cells) == 1 or backward else f" They look alike from here, so I check {how}."
    order = cells[::-1] if backward else cells
    turns = [said(intro + more, zoom_text(cell_box(order[0])))]
    for i, cell in enumerate(order):
        if len(turns) > max_turns:
            return {"turns": turns[:max_turns], "answer": None, "pattern": "trial_and_error",
                    "exceeded": True}
        got_shape, glyph = check(look(cell_box(cell)))
        if got_shape == shape and glyph:
            turns.append(found(colour, shape, glyph, style))
            return {"turns": turns, "answer": glyph, "pattern": "trial_and_error"}
        if i + 1 < len(cells):
            left = cells[: len(cells) - 1 - i] if backward else cells[i + 1:]
            step = step_text(style, [cell_box(c) for c in left], cell_box(cell), i + 2)
            nxt = cell_box(order[i + 1])
            wrong = slip_to(order[i + 1]) if slip_to else None
            turns.append(missed(colour, shape, got_shape, glyph, style, step, wrong or nxt))
            if wrong:   # a slip: no loss on the turn that made it, then the recovery (see `slip`)
                turns[-1] = {"text": turns[-1], "learn": False}
                turns.append(recovered(colour, shape, describe_any(look(wrong)), style, step, nxt))
    turns.append(said(f"None of the {colour} objects is the {colour} {shape}.", NO_ANSWER))
    return {"turns": turns, "answer": "none", "pattern": "failed"}


# The hasty teacher (collect.py --hasty N): where the explorer would list the look-alike candidates,
# a hasty searcher instead names one of them at random as the target, zooms on it, and answers what
# that crop shows, sure of its guess ("It is a red triangle with the character 8."), whatever the
# crop shows. It tries N times a question, each time with one of GUESSES' wordings, as a sampling
# VLM teacher would; the correctness filter keeps the lucky tries (the guess was the target, or a
# look-alike that carries the same character), beside the explorer's full search of the question.
# So the cold start holds the failure Mini-o3's RL corrects: answering before the search has
# found the target.
GUESSES = ("The {colour} {shape} is at {box}.", "The {colour} {shape} must be the one at {box}.",
           "I think the {colour} {shape} is at {box}.", "The {colour} {shape} looks like the one at {box}.")


def guess(image: Image.Image, problem: str, budget, rng: random.Random, style: str = "ledger") -> dict | None:
    """One hasty try: a random candidate named as the target, one zoom, then its character as the
    answer. None when the question is not understood or has fewer than two candidates."""
    goal = parse_question(problem)
    if goal is None:
        return None
    colour, shape = goal
    ep = Episode(image, budget)
    cells = sorted(blobs_by_cell(np.asarray(ep.shown[0]), colour))
    if len(cells) < 2:
        return None
    box = cell_box(rng.choice(cells))
    claim = rng.choice(GUESSES).format(colour=colour, shape=shape, box=fmt_box(box))
    _, shown = ep.apply(ep.parse(zoom_text(box)))
    arr = np.asarray(shown)
    obj = biggest_object(arr, colour)
    glyph = None if obj is None else read_glyph(arr, obj, colour)
    if glyph is None:
        return None
    turns = [said(f"I am looking for the {colour} {shape}. {claim}", zoom_text(box)), found(colour, shape, glyph, style)]
    return {"turns": turns, "answer": glyph, "pattern": "guess"}


QUARTERS = {"top-left": [0.0, 0.0, 0.5, 0.5], "top-right": [0.5, 0.0, 1.0, 0.5],
            "bottom-left": [0.0, 0.5, 0.5, 1.0], "bottom-right": [0.5, 0.5, 1.0, 1.0]}


def _depth_first(cells, colour, shape, intro, max_turns, check, look, style: str = "ledger") -> dict:
    """Zoom into the quarters that hold candidates (most first); in a quarter the shapes can be
    told apart, so zoom again only onto the one that matches, then read it."""
    def quarter(cell):
        r, c = divmod(cell, GRID)
        return ("top" if r < GRID // 2 else "bottom") + "-" + ("left" if c < GRID // 2 else "right")
    counts = Counter(quarter(c) for c in cells)
    order = [q for q, _ in counts.most_common()]
    turns = [said(intro + f" Most of them are in the {order[0]} quarter, so I look there first.",
                  zoom_text(QUARTERS[order[0]]))]
    for k, q in enumerate(order):
        x0, y0, _, _ = QUARTERS[q]
        arr = look(QUARTERS[q])
        hit = None
        half = GRID // 2   # a quarter holds half x half cells of the original grid
        for cell, mask in sorted(blobs_by_cell(arr, colour, 20, grid=half).items()):
            if shape_of(mask) == shape:
                r, c = divmod(cell, half)
                hit = int((y0 * GRID + r) * GRID + x0 * GRID + c)
                break
        if hit is not None and hit in cells:
            box = cell_box(hit)
            turns.append(said(f"Here the {colour} {shape} is at {fmt_box(box)}.", zoom_text(box)))
            got_shape, glyph = check(look(box))
            if got_shape == shape and glyph:
                turns.append(found(colour, shape, glyph, style))
                return {"turns": turns, "answer": glyph, "pattern": "depth_first"}
            break
        if k + 1 < len(order) and len(turns) < max_turns:
            thought = f"There is no {colour} {shape} in this quarter. I look at the {order[k + 1]} quarter."
            turns.append(said(thought, zoom_text(QUARTERS[order[k + 1]])))
    turns.append(said(f"I could not find the {colour} {shape}.", NO_ANSWER))
    return {"turns": turns, "answer": "none", "pattern": "failed"}


# ----------------------------------------------------------------------------------------------
# Self rollouts and the few-shot VLM teacher: both through the engine.
# ----------------------------------------------------------------------------------------------
def pattern_of(crops: list[dict]) -> str:
    """Label a model's trajectory by its zooms: none, one (direct), into a large region first
    (depth_first), or several small ones (trial_and_error)."""
    if not crops:
        return "no_zoom"
    if len(crops) == 1:
        return "direct"
    area = lambda c: (c["pixel_box"][2] - c["pixel_box"][0]) * (c["pixel_box"][3] - c["pixel_box"][1])
    if area(crops[0]) > 2 * min(area(c) for c in crops[1:]):
        return "depth_first"
    return "trial_and_error"


EXEMPLARS = ROOT / "exemplars" / "exemplars.json"


def few_shot_prefix(path: Path = EXEMPLARS, protocol: Protocol = DEFAULT) -> tuple[str, list[Image.Image]]:
    """The exemplar conversations as earlier turns of the chat: their images and texts."""
    data = json.loads(path.read_text(encoding="utf-8"))
    text, images = "", []
    for ex in data:
        image, _, _ = probe_sample(np.random.default_rng(ex["seed"]), ex["level"])
        ep = Episode(image, TINY_BUDGET, protocol)   # only to cut the crops; the engine resizes
        text += f"{IM_START}user\n{IMAGE}\n{ex['question']}{IM_END}\n"
        images.append(image)
        for i, turn in enumerate(ex["turns"]):
            text += f"{IM_START}assistant\n{turn}{IM_END}\n"
            action = ep.parse(turn)
            if action.kind == "zoom" and i + 1 < len(ex["turns"]):
                user, _ = ep.apply(action)
                text += f"{IM_START}user\n{user}{IM_END}\n"
                images.append(ep.images[-1])
    return text, images


def model_rollouts(rows: list[dict], root: Path, args) -> list[dict]:
    """--samples attempts per question by a checkpoint (--model) or the few-shot teacher (--teacher,
    with the six exemplars in context), through the engine."""
    few_shot = bool(args.teacher)
    model, processor = load(args.teacher or args.model, device=pick_device())
    prefix = few_shot_prefix(protocol=args.protocol) if few_shot else None
    batch = [Sample(load_image(r, root), r["problem"], context=prefix)
             for r in rows for _ in range(args.samples)]
    apply_pixels(processor, args)
    settings = Settings(max_turns=args.max_turns, temperature=args.temperature, seed=args.seed,
                        max_turn_tokens=256, protocol=args.protocol)
    trajs = Engine(model, processor, max_batch=16).run(batch, settings)
    return [{"turns": [x.replace(IM_END, "") for x in t.turn_texts], "answer": t.answer,
             "pattern": pattern_of(t.crops), "exceeded": t.exceeded,
             "source": "teacher" if few_shot else "self", "_row": rows[k // args.samples]}
            for k, t in enumerate(trajs)]


def explorer_rollouts(rows: list[dict], root: Path, args) -> list[dict]:
    """One search per question by the explorer, shown only the image and the question."""
    rng, hasty_rng = random.Random(args.seed), random.Random(f"hasty {args.seed}")   # (the searches stay as without)
    found = []
    for row in tqdm(rows, desc="explore", dynamic_ncols=True):
        public = {k: row[k] for k in ("images", "problem")}   # what a model would see
        image = load_image(public, root)
        res = explore(image, public["problem"], TINY_BUDGET, rng, args.max_turns, args.depth_first, args.thoughts,
                      args.slips)
        if res is not None:
            found.append({**res, "source": "explorer", "_row": row})
        if res is not None and res["pattern"] in ("trial_and_error", "depth_first"):   # it listed candidates
            tries = [guess(image, public["problem"], TINY_BUDGET, hasty_rng, args.thoughts) for _ in range(args.hasty)]
            found += [{**t, "source": "hasty", "_row": row} for t in tries if t is not None]
    return found


def label(found: list[dict], root: Path) -> list[dict]:
    """Give each trajectory its question's fields (images as absolute paths) and its grade."""
    for f in found:
        row = f.pop("_row")
        f.update({k: row[k] for k in row if k in ("images", "problem", "solution", "difficulty", "doc_id",
                                                  "data_source", "options")})
        f["images"] = [str((root / p).resolve()) if not Path(p).is_absolute() else p for p in row["images"]]
        f["correct"] = bool(grade(f["answer"], row))
        f["n_turns"] = len(f["turns"])
    return found


# ----------------------------------------------------------------------------------------------
# Filter and report
# ----------------------------------------------------------------------------------------------
def filter_trajectories(found: list[dict], max_share: float, seed: int) -> list[dict]:
    """Correct, non-exceeded, unique, free of special tokens; then no pattern above max_share of the
    kept set."""
    seen, good = set(), []
    for f in found:
        key = (f["doc_id"], tuple(turn_text(t) for t in f["turns"]))
        junk = any(has_special(turn_text(t)) for t in f["turns"])    # e.g. a spelled-out <|image_pad|>
        if f["correct"] and not f.get("exceeded") and not junk and key not in seen:
            seen.add(key)
            good.append(f)
    random.Random(seed).shuffle(good)
    counts = Counter(f["pattern"] for f in good)
    others = {p: sum(v for q, v in counts.items() if q != p) for p in counts}
    out, taken = [], Counter()
    for f in good:
        p = f["pattern"]
        # the cap: a pattern may hold at most max_share of the final set
        if len(counts) == 1 or max_share >= 1:
            limit = counts[p]
        else:
            limit = int(max_share / (1 - max_share) * others[p])
        if taken[p] < max(limit, 1):
            taken[p] += 1
            out.append(f)
    return out


def table(found: list[dict], kept: list[dict]):
    print(f"{'pattern':16} {'found':>6} {'correct':>8} {'kept':>6} {'mean turns':>10}  kept by difficulty")
    for p in sorted({f["pattern"] for f in found}):
        fs = [f for f in found if f["pattern"] == p]
        ks = [f for f in kept if f["pattern"] == p]
        by = Counter(f.get("difficulty", "?") for f in ks)
        turns = np.mean([len(f["turns"]) for f in ks]) if ks else 0
        print(f"{p:16} {len(fs):6d} {sum(f['correct'] for f in fs):8d} {len(ks):6d} {turns:10.2f}  "
              + " ".join(f"{d}:{n}" for d, n in sorted(by.items())))
    hist = Counter(len(f["turns"]) for f in kept)
    print("kept by number of turns: " + " ".join(f"{t}:{n}" for t, n in sorted(hist.items())))


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("input and output")
    io.add_argument("--data", default="runs/tiny/probe/train.jsonl", help="questions (probe records)")
    io.add_argument("--out", default="runs/tiny/coldstart.jsonl", help="the kept trajectories (JSONL)")
    io.add_argument("--sharegpt", help="also write the kept trajectories as ShareGPT JSON (LLaMA-Factory's "
                    "format, the official cold-start data's); crops go beside it")
    io.add_argument("--append", help="an earlier trajectory file whose rows are kept too (iterative rounds)")
    io.add_argument("--limit", type=NONNEGATIVE, default=0, help="use only the first N questions")
    src = ap.add_argument_group("source (default: the explorer)")
    src.add_argument("--model", help="self rollouts of this checkpoint instead of the explorer")
    src.add_argument("--teacher", help="a VLM shown the six exemplars in context (few-shot teacher)")
    src.add_argument("--samples", type=POSITIVE, default=4, help="attempts per question (model sources)")
    src.add_argument("--max-turns", type=POSITIVE, default=16)
    src.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=1.0)
    src.add_argument("--depth-first", type=SHARE, default=0.3,
                     help="explorer: share of searches that zoom into quarters first")
    src.add_argument("--thoughts", choices=STYLES, default="ledger",
                     help="explorer: how its thoughts are worded (see STYLES)")
    src.add_argument("--slips", type=SHARE, default=0.0,
                     help="explorer: chance that a zoom after a miss lands a cell off, and the next turn "
                     "recovers (see `slip`; the slipped turn carries no SFT loss, and the ShareGPT export "
                     "cannot say so: it is written as an ordinary turn)")
    src.add_argument("--hasty", type=NONNEGATIVE, default=0,
                     help="explorer: tries of the hasty teacher per question whose candidates it lists (see "
                     "`guess`: one random candidate named as the target and answered; kept only when right)")
    src.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-share", type=PROBABILITY, default=0.6, help="largest share of one pattern")
    add_protocol_args(ap)
    args = parse_with_preset(ap, argv)
    args.protocol = protocol_from_args(args)
    inputs = [args.data] + ([args.append] if args.append else [])
    if args.sharegpt and not sharegpt.is_sharegpt(args.sharegpt):
        raise InputError(f"--sharegpt {args.sharegpt}: the ShareGPT file's name must end in .json")
    if any(Path(args.out).resolve() == Path(f).resolve() for f in inputs):
        raise InputError(f"--out {args.out} is also an input: write the trajectories to another file")
    rows = read_records(args.data)[: args.limit or None]      # every input is checked before any work
    earlier = read_records(args.append, ("images", "problem", "turns")) if args.append else []
    if args.model or args.teacher:
        resolve_checkpoint(args.model or args.teacher)
    root = Path(args.data).parent
    t0 = time.time()
    rollouts = model_rollouts if args.model or args.teacher else explorer_rollouts
    found = label(rollouts(rows, root, args), root)
    kept = filter_trajectories(found, args.max_share, args.seed)
    kept = earlier + kept
    write_jsonl(args.out, kept)
    if args.sharegpt:
        n = sharegpt.export(kept, args.sharegpt, TINY_BUDGET, args.protocol)
        print(f"{n} trajectories as ShareGPT -> {args.sharegpt}")
    table(found, kept)
    print(f"kept {len(kept)} of {len(found)} trajectories -> {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main_cli(main)
