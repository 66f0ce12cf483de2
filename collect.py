"""Stage 1: cold-start trajectories, collected from a teacher and filtered by correctness.

    python collect.py                                            # the explorer (and the hasty teacher)
    python collect.py --model runs/tiny/sft --samples 4 --out runs/tiny/round1.jsonl --append runs/tiny/coldstart.jsonl
    python collect.py --teacher Qwen/Qwen2.5-VL-7B-Instruct --data data/vp_train/train.jsonl   # few-shot VLM

Reads: probe records (--data). Writes: a JSONL of trajectories (--out: the question's record, the
assistant turns' texts, the answer, whether it is correct, the search pattern) that sft.py replays
into exactly the tokens the engine would produce; with --sharegpt, the same as LLaMA-Factory's JSON.

Mini-o3 collects its cold start from a teacher shown a few example searches, keeps only the
trajectories whose answer is right, and repeats with the trained model (`--append` keeps an earlier
round). Here three teachers give one output:
  * the explorer (the default; minio3/explorer.py), a scripted searcher of the tiny world that sees
    only what a model sees. It is a perfect teacher: it checks every candidate until it finds the
    target.
  * the hasty teacher beside it (`--hasty N`): N quick tries a question that name one candidate as
    the target at random and answer what that crop shows. The filter keeps the lucky ones, as the
    paper's filter keeps a VLM teacher's lucky guesses, so the cold start also teaches to answer
    before the search has found the target: the habit RL with over-turn masking must unlearn.
  * a model: the few-shot VLM teacher (--teacher, with the six exemplars in context) or a trained
    checkpoint's own rollouts (--model), both through the engine.
`filter_trajectories` is the filter: correct, under the turn limit, unique, and no search pattern
above --max-share of the kept set.
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

from minio3 import sharegpt
from minio3.conversation import Episode, IMAGE, IM_END, IM_START, ROOT, TINY_BUDGET, grade, has_special
from minio3.data import (InputError, NONNEGATIVE, NONNEGATIVE_FLOAT, POSITIVE, PROBABILITY, SHARE, load_image,
                         main_cli, read_records, turn_text, write_jsonl)
from minio3.engine import Engine, Sample, Settings
from minio3.explorer import STYLES, explore, guesses
from minio3.model import load, pick_device, resolve_checkpoint
from minio3.protocol import DEFAULT, Protocol, add_protocol_args, apply_pixels, parse_with_preset, protocol_from_args
from minio3.world import probe_sample


# ----------------------------------------------------------------------------------------------
# The filter: what of the teachers' trajectories becomes the cold start
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


# ----------------------------------------------------------------------------------------------
# The teachers: the explorer (with the hasty teacher), a model through the engine
# ----------------------------------------------------------------------------------------------
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
            tries = guesses(image, public["problem"], TINY_BUDGET, hasty_rng, args.hasty, args.thoughts)
            found += [{**t, "source": "hasty", "_row": row} for t in tries]
    return found


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
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
    src.add_argument("--thoughts", choices=STYLES, default="chain-compare",
                     help="explorer: how its thoughts are worded (see STYLES)")
    src.add_argument("--slips", type=SHARE, default=0.0,
                     help="explorer: chance that a zoom after a miss lands a cell off, and the next turn "
                     "recovers (see `slip`; the slipped turn carries no SFT loss, and the ShareGPT export "
                     "cannot say so: it is written as an ordinary turn)")
    src.add_argument("--hasty", type=NONNEGATIVE, default=3,
                     help="explorer: tries of the hasty teacher per question whose candidates it lists (see "
                     "`guesses`: one random candidate named as the target and answered; kept only when right)")
    src.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-share", type=PROBABILITY, default=0.6, help="largest share of one pattern")
    add_protocol_args(ap)
    return parse_with_preset(ap, argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
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
