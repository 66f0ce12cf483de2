"""Stage 4: accuracy per split and per turn cap, Avg@K, and pictures of the search.

    python eval.py --model runs/tiny/rl --data runs/tiny/probe/test.jsonl --out runs/tiny/eval_rl
    python eval.py --model Mini-o3/Mini-o3-7B-v1 --data data/vp_hard/test.jsonl --samples 32 \
                   --judge Qwen/Qwen2.5-72B-Instruct

Reads: a checkpoint and probe records. Writes into --out: results.json (every figure),
trajectories.jsonl (one record per rollout), turn_scaling.png, examples/*.png (zoom paths).

Every question is rolled out once (or K times with --samples) at the largest turn cap; the accuracy
at each smaller cap comes from the same trajectories: an answer given at turn t counts for every
cap >= t, and a trajectory still searching at turn c has no answer under cap c. (For greedy
decoding this is exactly what a run at cap c would give; for sampling, the same distribution.)
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common import PLAIN_SYSTEM_PROMPT, grade, normalise
from data import (InputError, NONNEGATIVE, NONNEGATIVE_FLOAT, POSITIVE, PROBABILITY, atomic_path, load_image, main_cli,
                  names, read_records, select_levels, turn_caps, write_jsonl)
import report
from infer import Engine, Sample, Settings, draw_search
from model import load, pick_device, resolve_checkpoint
from protocol import (add_protocol_args, apply_pixels, load_judge_prompt, parse_with_preset, protocol_from_args,
                      read_score)

JUDGE_PROMPT = ("You grade answers to questions about images.\nQuestion: {question}\n"
                "Reference answer: {reference}\nCandidate answer: {answer}\n"
                "Does the candidate answer mean the same as the reference answer? "
                "Reply with exactly \"Score: 1\" if it does and \"Score: 0\" if it does not.")


def judge(engine: Engine, rows: list[dict], answers: list[str | None], texts: dict | None = None) -> list[float]:
    """Mini-o3's LLM-judge reward: exact/normalised match first; otherwise the judge model (run
    through the same engine, text only, greedy) decides with "Score: 0" or "Score: 1". `texts`
    (protocol.load_judge_prompt) replaces the judge's system prompt and query."""
    texts = texts or {"system": PLAIN_SYSTEM_PROMPT, "query": JUDGE_PROMPT}
    fill = lambda i: (texts["query"].replace("{question}", rows[i]["problem"].replace("<image>", "").strip())
                      .replace("{reference}", str(rows[i]["solution"])).replace("{answer}", answers[i]))
    scores = [grade(a, r) for a, r in zip(answers, rows)]
    ask = [i for i, (a, s) in enumerate(zip(answers, scores))
           if a is not None and s == 0 and not rows[i].get("options")]
    samples = [Sample(None, fill(i), system=texts["system"] or PLAIN_SYSTEM_PROMPT) for i in ask]
    verdicts = engine.run(samples, Settings(max_turns=1, greedy=True, max_turn_tokens=32), progress=False)
    for i, t in zip(ask, verdicts):
        scores[i] = read_score(t.turn_texts[-1] if t.turn_texts else "")
    return scores


def correct_at_cap(t: dict, cap: int) -> bool:
    """Was this trajectory's answer given within `cap` turns, and right?"""
    return bool(t["correct"] and t["answered"] and t["turns"] <= cap)


# ----------------------------------------------------------------------------------------------
# Why a search failed (records with a target box: the synthetic probe)
# ----------------------------------------------------------------------------------------------
READABLE_PX = 24      # an object counts as seen when a crop shows it at least this many pixels high
OUTCOMES = ["right", "named another object in view", "saw the target, answered wrong",
            "answered without seeing the target", "no answer", "turn too long", "out of turns",
            "out of context", "wrong (no target box)"]
_NUM = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*"     # 1, 0.5, .5, 1. (never a lone "." a model may write)
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def seen(box: list[float], crop: dict) -> bool:
    """Was the object with this pixel box (in the original) inside the crop, shown large enough to read?"""
    x0, y0, x1, y1 = crop["pixel_box"]
    inside = box[0] >= x0 and box[1] >= y0 and box[2] <= x1 and box[3] <= y1
    return inside and (box[3] - box[1]) * crop["shown"][1] / (y1 - y0) >= READABLE_PX


def listed_boxes(text: str) -> list[list[float]]:
    """The relative boxes a turn's thought lists ("The red objects: [0.125, ...], [...]"), calls excluded."""
    thought = text.split("<grounding>")[0]
    return [[float(v) for v in m.groups()] for m in _BOX.finditer(thought)]


def list_steps(t: dict) -> tuple[int, int]:
    """(turns whose thought lists boxes and then zooms, those that zoom on the list's first or last
    box): whether the search steps through the list it has just written (the opening list of
    candidates, a ledger of the boxes still to check), from its front or from its end (collect.py's
    `ledger` and `backward` thoughts). A chain step ("Next in the list: [checked], [next].") follows
    only when it zooms on its last box: its first is the box already checked."""
    listed = followed = 0
    for text in t["turn_texts"]:
        boxes, call = listed_boxes(text), text.split("<grounding>", 1)[1:]
        zoom = _BOX.search(call[0]) if call else None
        if boxes and zoom:
            listed += 1
            ends = (boxes[-1],) if "Next in the list:" in text.split("<grounding>")[0] else (boxes[0], boxes[-1])
            followed += [float(v) for v in zoom.groups()] in ends
    return listed, followed


def diagnose(t: dict) -> dict:
    """Why one trajectory ended as it did: `outcome`, one of OUTCOMES (the first that applies), and
    flags: was the target ever seen readable, did the search open with a list of candidates (two
    boxes or more in its first thought; else a direct guess, one box) and did that list hold the
    target, how many zooms repeated an earlier box, how many calls were invalid."""
    target, crops = t.get("target_bbox"), t["crops"]
    saw = target is not None and any(seen(target, c) for c in crops)
    objects = t.get("objects") or []
    in_view = [o for o in objects if o["box"] != target and any(seen(o["box"], c) for c in crops)]
    answer = normalise(t["answer"]) if t["answer"] is not None else None
    named_other = any(answer == normalise(o["glyph"]) for o in in_view)
    listed = listed_boxes(t["turn_texts"][0]) if t["turn_texts"] else []
    has_target = None
    if listed and target is not None and t.get("image_size"):
        w, h = t["image_size"]
        cx, cy = (target[0] + target[2]) / 2 / w, (target[1] + target[3]) / 2 / h
        has_target = any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in listed)
    boxes = [tuple(c["pixel_box"]) for c in crops]
    verdicts = crop_verdicts(t)
    if t["correct"]:
        outcome = "right"
    elif t["exceeded"]:
        outcome = "out of context" if t.get("over_length") else "out of turns"
    elif t["truncated"]:
        outcome = "turn too long"
    elif not t["answered"]:
        outcome = "no answer"
    elif target is None:
        outcome = "wrong (no target box)"
    else:
        outcome = ("named another object in view" if named_other else "saw the target, answered wrong" if saw
                   else "answered without seeing the target")
    listed_turns, followed = list_steps(t)
    return {"outcome": outcome, "saw_target": saw, "opens_with_list": len(listed) >= 2,
            "list_has_target": has_target,
            "repeated_zooms": len(boxes) - len(set(boxes)), "invalid_calls": t["tool_errors"],
            "listed_turns": listed_turns, "followed": followed, **verdicts}


def crop_verdicts(t: dict) -> dict:
    """The search's verdict on each crop that shows one candidate readable: the target alone, or
    look-alikes (objects of the target's colour) without it. A crop is *accepted* when the search
    answers right after it (it is the last crop of an answered search), else passed by. Counted
    from positions and boxes only, whatever the thoughts say."""
    target, objects = t.get("target_bbox"), t.get("objects") or []
    out = {"target_crops": 0, "target_accepted": 0, "lookalike_crops": 0, "lookalike_accepted": 0}
    asked = next((o for o in objects if o["box"] == target), None)
    if asked is None:
        return out
    lookalikes = [o for o in objects if o["colour"] == asked["colour"] and o["box"] != target]
    for i, c in enumerate(t["crops"]):
        accepted = int(t["answered"] and i == len(t["crops"]) - 1)
        shows_target, shows_other = seen(target, c), any(seen(o["box"], c) for o in lookalikes)
        if shows_target and not shows_other:
            out["target_crops"] += 1
            out["target_accepted"] += accepted
        elif shows_other and not shows_target:
            out["lookalike_crops"] += 1
            out["lookalike_accepted"] += accepted
    return out


def failure_table(trajs: list[dict]) -> dict:
    """Per difficulty (and "all"): the share of each outcome, and the flags' rates."""
    every = [diagnose(t) for t in trajs]
    groups = {d: [x for x, t in zip(every, trajs) if t["difficulty"] == d]
              for d in sorted({t["difficulty"] for t in trajs})}
    out = {}
    for d, ds in {**groups, "all": every}.items():
        listed = [x["list_has_target"] for x in ds if x["list_has_target"] is not None]
        shares = {o: sum(x["outcome"] == o for x in ds) / len(ds) for o in OUTCOMES}
        out[d] = {"n": len(ds), "outcomes": shares,
                  "saw_target": float(np.mean([x["saw_target"] for x in ds])),
                  "opens_with_list": float(np.mean([x["opens_with_list"] for x in ds])),
                  "list_has_target": float(np.mean(listed)) if listed else None,
                  "repeated_zooms": float(np.mean([x["repeated_zooms"] for x in ds])),
                  "invalid_calls": float(np.mean([x["invalid_calls"] > 0 for x in ds]))}
        n = sum(x["listed_turns"] for x in ds)   # zooms, per listing turn: the share on an end of its list
        out[d]["listed_turns"], out[d]["zoom_follows_list"] = n, sum(x["followed"] for x in ds) / n if n else None
        for kind in ("target", "lookalike"):   # verdicts, per crop: the share accepted
            n = sum(x[f"{kind}_crops"] for x in ds)
            out[d][f"{kind}_crops"] = n
            out[d][f"{kind}_accepted"] = sum(x[f"{kind}_accepted"] for x in ds) / n if n else None
    return out


def print_failures(table: dict):
    used = [o for o in OUTCOMES if any(r["outcomes"][o] for r in table.values())]
    print(f"\n{'why':36}" + "".join(f"{d:>9}" for d in table))
    for o in used:
        print(f"{o:36}" + "".join(f"{r['outcomes'][o]:9.2f}" for r in table.values()))
    for flag in report.FLAGS:
        cells = ["      -  " if r.get(flag) is None else f"{r[flag]:9.2f}" for r in table.values()]
        print(f"{flag.replace('_', ' '):36}" + "".join(cells))
    print("(opens with list: the first thought lists two boxes or more, not one direct guess;\n"
          " zoom follows list: of the turns whose thought lists boxes, the share that zoom on its first\n"
          " or last box (the ledger steps from the front, the backward ledger from the end);\n"
          " target / lookalike accepted: of the crops showing the target alone / look-alikes alone, the share\n"
          " after which the search answered; crops: " + ", ".join(
              f"{d} {r['target_crops']}/{r['lookalike_crops']}" for d, r in table.items()) + ")")


def bar_chart(table: dict, path: Path, title: str):
    """One stacked bar per difficulty: the share of each outcome (drawn with PIL)."""
    used = [o for o in OUTCOMES if any(r["outcomes"][o] for r in table.values())]
    colours = [(44, 160, 44), (214, 39, 40), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194),
               (31, 119, 180), (23, 190, 207), (127, 127, 127)]
    W, H, L, T, bar = 760, 60 + 34 * len(table) + 20 * len(used), 110, 40, 22
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.font = _font()
    d.text((L, 12), title, fill="black")
    span = W - L - 30
    for i, (name, r) in enumerate(table.items()):
        y, x = T + 34 * i, L
        d.text((8, y + 5), f"{name} ({r['n']})", fill="black")
        for o in used:
            w = r["outcomes"][o] * span
            d.rectangle([x, y, x + w, y + bar], fill=colours[OUTCOMES.index(o)])
            x += w
    for j, o in enumerate(used):
        y = T + 34 * len(table) + 20 * j
        d.rectangle([L, y + 2, L + 14, y + 14], fill=colours[OUTCOMES.index(o)])
        d.text((L + 22, y + 2), o, fill="black")
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def summarise(trajs: list[dict], caps: list[int]) -> dict:
    """Every figure of results.json, computed from the trajectory records alone."""
    by = lambda key: sorted({t[key] for t in trajs})
    acc = lambda ts, cap=max(caps): float(np.mean([correct_at_cap(t, cap) for t in ts])) if ts else 0.0
    answered = [t for t in trajs if t["answered"]]
    right = [t for t in trajs if correct_at_cap(t, max(caps))]
    per_sample = [acc([t for t in trajs if t["sample"] == k]) for k in by("sample")]
    return {
        "overall": acc(trajs),
        "by_difficulty": {d: acc([t for t in trajs if t["difficulty"] == d]) for d in by("difficulty")},
        "by_turn_cap": {str(c): acc(trajs, c) for c in caps},
        "by_turn_cap_difficulty": {d: {str(c): acc([t for t in trajs if t["difficulty"] == d], c)
                                       for c in caps} for d in by("difficulty")},
        "avg_at_k": float(np.mean(per_sample)), "k": len(per_sample),
        "mean_turns": float(np.mean([t["turns"] for t in trajs])),
        "mean_turns_correct": float(np.mean([t["turns"] for t in right])) if right else 0.0,
        "zoom_rate": float(np.mean([t["zooms"] > 0 for t in answered])) if answered else 0.0,
        "answered_rate": len(answered) / len(trajs),
        "exceeded_rate": float(np.mean([t["exceeded"] for t in trajs])),
        "tool_error_rate": float(np.mean([t["tool_errors"] > 0 for t in trajs])),
        "n_questions": len({t["doc_id"] for t in trajs}), "n_trajectories": len(trajs),
        "failures": failure_table(trajs),
    }


def _font(size: int = 13):
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
    d.font = _font()
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


def compare(dirs: list[str], out: Path):
    """One table (accuracy per difficulty at each turn cap) and one plot for several evaluations."""
    missing = [d for d in dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no results.json (not an eval.py output folder)")
    runs = {Path(d).name: json.loads((Path(d) / "results.json").read_text()) for d in dirs}
    caps = sorted({int(c) for r in runs.values() for c in r["by_turn_cap"]})
    header = "".join(f"{'cap ' + str(c):>9}" for c in caps)
    print(f"{'run':14}{'difficulty':12}" + header + f"{'turns':>8}{'zoom':>7}")
    for name, r in runs.items():
        for d, s in {**r["by_turn_cap_difficulty"], "all": r["by_turn_cap"]}.items():
            extra = f"{r['mean_turns']:8.2f}{r['zoom_rate']:7.2f}" if d == "all" else ""
            print(f"{name:14}{d:12}" + "".join(f"{s.get(str(c), float('nan')):9.3f}" for c in caps) + extra)
    line_plot({f"{n} {d}": s for n, r in runs.items() for d, s in {**r["by_turn_cap_difficulty"],
                                                                   "all": r["by_turn_cap"]}.items()}, out,
              " vs ".join(runs))
    print(f"report: {report.write_compare(out, runs)}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("input and output")
    io.add_argument("--compare", nargs="+", metavar="DIR", help="print one table for these eval folders "
                    "and draw them in one plot (--out is then the PNG)")
    io.add_argument("--model", default="runs/tiny/rl", help="the checkpoint to evaluate")
    io.add_argument("--data", default="runs/tiny/probe/test.jsonl", help="questions (probe records)")
    io.add_argument("--out", default="runs/tiny/eval", help="folder for results.json, trajectories, PNGs")
    io.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    io.add_argument("--examples", type=NONNEGATIVE, default=6, help="trajectory pictures to draw")
    io.add_argument("--levels", type=names, help="only these difficulties, e.g. hard (all by default)")
    io.add_argument("--limit", type=NONNEGATIVE, default=0, help="use only the first N questions (of --levels)")
    gen = ap.add_argument_group("rollouts")
    gen.add_argument("--turn-caps", type=turn_caps, default="1,2,4,6,8,12,16")
    gen.add_argument("--samples", type=POSITIVE, default=1, help="rollouts per question (Avg@K)")
    gen.add_argument("--greedy", action="store_true", help="greedy decoding (default: temperature 1.0)")
    gen.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=1.0)
    gen.add_argument("--top-p", type=PROBABILITY, default=1.0, help="sample from the nucleus of this mass")
    gen.add_argument("--max-turn-tokens", type=POSITIVE, default=256)
    gen.add_argument("--max-total-tokens", type=POSITIVE, default=8192)
    gen.add_argument("--max-images", type=POSITIVE, default=32, help="the original and its crops")
    gen.add_argument("--max-batch", type=POSITIVE, default=32)
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                     help="weights for the rollouts (auto: bfloat16 on CUDA, float32 on the CPU)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--judge", help="an LLM judge for open answers (path or hub name)")
    gen.add_argument("--judge-prompt", help="the judge's texts: a JSON file {system, query} or the official "
                     "reward file (verl/utils/reward_score/general_qa_tool.py, read, never run)")
    add_protocol_args(ap)
    return parse_with_preset(ap, argv)


def rollout(args, rows: list[dict], root: Path, caps: list[int]) -> list[dict]:
    """Roll every question out --samples times at the largest cap; one record per trajectory.
    Images are loaded when a question enters the batch and dropped when it leaves (memory)."""
    model, processor = load(args.model, device=pick_device(), dtype=None if args.dtype == "auto" else
                            getattr(torch, args.dtype))
    apply_pixels(processor, args)
    engine = Engine(model, processor, max_batch=args.max_batch, max_len=args.max_total_tokens)
    settings = Settings(max_turns=max(caps), greedy=args.greedy, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed, max_turn_tokens=args.max_turn_tokens, max_total_tokens=args.max_total_tokens,
                        max_images=args.max_images, protocol=args.protocol)
    loader = lambda r: (lambda: load_image(r, root))   # called when the question enters the batch
    samples = [Sample(loader(r), r["problem"]) for r in rows for _ in range(args.samples)]
    results = engine.run(samples, settings)
    flat_rows = [r for r in rows for _ in range(args.samples)]
    if args.judge:
        correct = judge(Engine(*load(args.judge, device=pick_device()), max_batch=args.max_batch), flat_rows,
                        [t.answer for t in results], args.judge_texts)
    else:
        correct = [grade(t.answer, r) for t, r in zip(results, flat_rows)]
    return [{"doc_id": r["doc_id"], "difficulty": r.get("difficulty", "all"), "sample": k % args.samples,
             "solution": r["solution"], "answer": t.answer, "correct": bool(c), "answered": t.answered,
             "turns": t.turns, "zooms": len(t.crops), "exceeded": t.exceeded, "truncated": t.truncated,
             "tool_errors": t.tool_errors, "over_length": t.over_length, "crops": t.crops,
             "turn_texts": t.turn_texts, "image_size": t.image_size, "target_bbox": r.get("target_bbox"),
             "objects": r.get("objects")}
            for k, (t, r, c) in enumerate(zip(results, flat_rows, correct))]


def print_summary(res: dict, caps: list[int], out: Path):
    series = {**res["by_turn_cap_difficulty"], "all": res["by_turn_cap"]}
    print(f"\n{'':12}" + "".join(f"{'cap ' + str(c):>9}" for c in caps))
    for d, s in series.items():
        print(f"{d:12}" + "".join(f"{s[str(c)]:9.3f}" for c in caps))
    print(f"overall {res['overall']:.3f}  Avg@{res['k']} {res['avg_at_k']:.3f}  "
          f"mean turns {res['mean_turns']:.2f} (correct: {res['mean_turns_correct']:.2f})  "
          f"zoom rate {res['zoom_rate']:.2f}  exceeded {res['exceeded_rate']:.2f}  "
          f"[{res['n_trajectories']} rollouts, {res['seconds']:.0f}s] -> {out}")


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, Path(args.out if args.out.endswith(".png") else args.out + ".png"))
    caps = args.turn_caps
    args.protocol = protocol_from_args(args)                # prompts files are read before any work too
    args.judge_texts = load_judge_prompt(args.judge_prompt) if args.judge_prompt else None
    rows = select_levels(read_records(args.data), args.levels, args.data)[: args.limit or None]   # checked first
    root, out = Path(args.data).parent, Path(args.out)
    for name in [args.model] + ([args.judge] if args.judge else []):
        resolve_checkpoint(name)
    if (out / "results.json").exists() and not args.overwrite:
        raise InputError(f"{out} holds the results of an evaluation: pass --overwrite to replace them")
    t0 = time.time()
    trajs = rollout(args, rows, root, caps)
    res = summarise(trajs, caps)
    res.update({"model": args.model, "data": args.data, "greedy": args.greedy, "samples": args.samples,
                "temperature": args.temperature, "top_p": args.top_p,
                "turn_caps": caps, "seconds": round(time.time() - t0, 1),
                "protocol": {"preset": args.preset, "prompts": args.prompts, "numbering": args.numbering,
                             "parser": args.parser, "answer": args.answer, "judge_prompt": args.judge_prompt}})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "trajectories.jsonl", trajs)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    series = {**res["by_turn_cap_difficulty"], "all": res["by_turn_cap"]}
    line_plot(series, out / "turn_scaling.png", f"{Path(args.model).name} on {Path(args.data).name}")
    bar_chart(res["failures"], out / "failures.png", f"why searches ended: {Path(args.model).name}")
    page = report.write(out, res, trajs, lambda i: load_image(rows[i // args.samples], root),
                        f"{Path(args.model).name} on {Path(args.data).name}", diagnose)
    (out / "examples").mkdir(exist_ok=True)
    for i in [i for i, t in enumerate(trajs) if t["crops"]][: args.examples]:
        t = trajs[i]
        name = f"{i:03d}_{t['difficulty']}_{'right' if t['correct'] else 'wrong'}.png"
        draw_search(load_image(rows[i // args.samples], root), t["crops"], out / "examples" / name)
    print_summary(res, caps, out)
    print_failures(res["failures"])
    print(f"report: {page}")
    return res


if __name__ == "__main__":
    main_cli(main)
