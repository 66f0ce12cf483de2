"""Stage 5: accuracy per difficulty and per turn cap, Avg@K, why searches failed, and a report page.

    python eval.py                        # run_tiny's SFT and RL models on the test split, compared
    python eval.py --model runs/tiny/rl --levels hard --out runs/tiny/eval_hard
    python eval.py --model Mini-o3/Mini-o3-7B-v1 --data data/vp_hard/test.jsonl --samples 32 \
                   --temperature 1.0 --judge Qwen/Qwen2.5-72B-Instruct

Reads: checkpoints and probe records. Writes, for one model, into --out (for several, into
--out/<model's folder name> each, and the comparison into --out): results.json (every figure),
trajectories.jsonl (one record per rollout), turn_scaling.png, failures.png, report.html (every
search, picture by picture), examples/*.png (zoom paths).

Every question is rolled out once (or K times with --samples) at the largest turn cap; the accuracy
at each smaller cap comes from the same trajectories (`correct_at_cap`): an answer given at turn t
counts for every cap >= t, and a trajectory still searching at turn c has no answer under cap c.
(For greedy decoding, the default, this is exactly what a run at cap c would give; for sampling,
the same distribution.) Turn scaling, the paper's figure, is this accuracy against the cap.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from minio3 import report
from minio3.conversation import grade
from minio3.data import (InputError, NONNEGATIVE, NONNEGATIVE_FLOAT, POSITIVE, PROBABILITY, atomic_path, load_image,
                         load_json, main_cli, names, read_records, select_levels, turn_caps, write_jsonl)
from minio3.engine import Engine, Sample, Settings
from minio3.failures import bar_chart, diagnose, failure_table, print_failures
from minio3.judge import judge
from minio3.model import load, pick_device, resolve_checkpoint
from minio3.plots import draw_search, line_plot
from minio3.protocol import add_protocol_args, apply_pixels, load_judge_prompt, parse_with_preset, protocol_from_args


# ----------------------------------------------------------------------------------------------
# Accuracy at every turn cap, from one set of trajectories
# ----------------------------------------------------------------------------------------------
def correct_at_cap(t: dict, cap: int) -> bool:
    """Was this trajectory's answer given within `cap` turns, and right?"""
    return bool(t["correct"] and t["answered"] and t["turns"] <= cap)



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


# ----------------------------------------------------------------------------------------------
# Rolling the questions out
# ----------------------------------------------------------------------------------------------
def rollout(args, model_name: str, rows: list[dict], root: Path, caps: list[int]) -> list[dict]:
    """Roll every question out --samples times at the largest cap; one record per trajectory.
    Images are loaded when a question enters the batch and dropped when it leaves (memory)."""
    model, processor = load(model_name, device=pick_device(), dtype=None if args.dtype == "auto" else
                            getattr(torch, args.dtype))
    apply_pixels(processor, args)
    engine = Engine(model, processor, max_batch=args.max_batch, max_len=args.max_total_tokens)
    settings = Settings(max_turns=max(caps), greedy=args.temperature == 0, temperature=args.temperature, top_p=args.top_p,
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


# ----------------------------------------------------------------------------------------------
# One model, several models, the flags
# ----------------------------------------------------------------------------------------------
def evaluate(args, model: str, rows: list[dict], root: Path, out: Path) -> dict:
    """One model: its rollouts, results.json, trajectories.jsonl, the plots and the report page."""
    caps = args.turn_caps
    t0 = time.time()
    trajs = rollout(args, model, rows, root, caps)
    res = summarise(trajs, caps)
    res.update({"model": model, "data": args.data, "greedy": args.temperature == 0, "samples": args.samples,
                "temperature": args.temperature, "top_p": args.top_p,
                "turn_caps": caps, "seconds": round(time.time() - t0, 1),
                "protocol": {"preset": args.preset, "prompts": args.prompts, "numbering": args.numbering,
                             "parser": args.parser, "answer": args.answer, "judge_prompt": args.judge_prompt}})
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "trajectories.jsonl", trajs)
    with atomic_path(out / "results.json") as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    series = {**res["by_turn_cap_difficulty"], "all": res["by_turn_cap"]}
    line_plot(series, out / "turn_scaling.png", f"{Path(model).name} on {Path(args.data).name}")
    bar_chart(res["failures"], out / "failures.png", f"why searches ended: {Path(model).name}")
    page = report.write(out, res, trajs, lambda i: load_image(rows[i // args.samples], root),
                        f"{Path(model).name} on {Path(args.data).name}", diagnose)
    (out / "examples").mkdir(exist_ok=True)
    for i in [i for i, t in enumerate(trajs) if t["crops"]][: args.examples]:
        t = trajs[i]
        name = f"{i:03d}_{t['difficulty']}_{'right' if t['correct'] else 'wrong'}.png"
        draw_search(load_image(rows[i // args.samples], root), t["crops"], out / "examples" / name)
    print_summary(res, caps, out)
    print_failures(res["failures"])
    print(f"report: {page}")
    return res


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    if args.compare:
        return compare(args.compare, Path(args.out if args.out.endswith(".png") else args.out + ".png"))
    args.protocol = protocol_from_args(args)                # prompts files are read before any work too
    args.judge_texts = load_judge_prompt(args.judge_prompt) if args.judge_prompt else None
    rows = select_levels(read_records(args.data), args.levels, args.data)[: args.limit or None]   # checked first
    root, out = Path(args.data).parent, Path(args.out)
    # one model: its results in --out; several: each in --out/<its folder's name>, compared in --out
    outs = [out] if len(args.model) == 1 else [out / Path(m).name for m in args.model]
    if len(set(outs)) < len(outs):
        raise InputError(f"--model {' '.join(args.model)}: two models share a folder name; evaluate them one by one")
    for name in args.model + ([args.judge] if args.judge else []):
        resolve_checkpoint(name)
    for o in outs:
        if (o / "results.json").exists() and not args.overwrite:
            raise InputError(f"{o} holds the results of an evaluation: pass --overwrite to replace them")
    results = [evaluate(args, m, rows, root, o) for m, o in zip(args.model, outs)]
    if len(outs) > 1:
        compare([str(o) for o in outs], out / "compare.png")
    return results[0] if len(results) == 1 else results


RESULT_FIELDS = {"model": str, "turn_caps": list, "by_turn_cap": dict, "by_turn_cap_difficulty": dict,
                 "mean_turns": (int, float), "zoom_rate": (int, float), "n_trajectories": int}


def check_results(res: dict, where: Path) -> dict:
    """An eval.py results.json as `compare` reads it, or an InputError naming what it lacks."""
    bad = [k for k, t in RESULT_FIELDS.items() if not isinstance(res.get(k), t) or isinstance(res.get(k), bool)]
    if bad:
        raise InputError(f"{where}: not an eval.py result (no valid {', '.join(bad)})")
    caps = [str(c) for c in res["turn_caps"]]
    for name, series in {"all": res["by_turn_cap"], **res["by_turn_cap_difficulty"]}.items():
        if not isinstance(series, dict) or not all(type(series.get(c)) in (int, float) for c in caps):
            raise InputError(f"{where}: the accuracy of {name!r} is not a number at every turn cap {', '.join(caps)}")
    try:
        report.failures(res["failures"]) if "failures" in res else None
    except (KeyError, TypeError, AttributeError, ValueError, IndexError):
        raise InputError(f"{where}: its 'failures' table is not eval.py's") from None
    return res


def compare(dirs: list[str], out: Path):
    """One table (accuracy per difficulty at each turn cap) and one plot for several evaluations."""
    missing = [d for d in dirs if not (Path(d) / "results.json").is_file()]
    if missing:
        raise InputError(f"{missing[0]}: no results.json (not an eval.py output folder)")
    runs = {Path(d).name: check_results(load_json(Path(d) / "results.json", dict), Path(d) / "results.json")
            for d in dirs}
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
    io.add_argument("--model", nargs="+", default=["runs/tiny/sft", "runs/tiny/rl"],
                    help="the checkpoints to evaluate (folders, tiny-base, hub names)")
    io.add_argument("--data", default="runs/tiny/probe/test.jsonl", help="questions (probe records)")
    io.add_argument("--out", default="runs/tiny/eval", help="folder for results.json, trajectories, PNGs "
                    "(several models: a folder each inside it, and compare.png / compare.html)")
    io.add_argument("--overwrite", action="store_true", help="replace the results already in --out")
    io.add_argument("--examples", type=NONNEGATIVE, default=6, help="trajectory pictures to draw")
    io.add_argument("--levels", type=names, help="only these difficulties, e.g. hard (all by default)")
    io.add_argument("--limit", type=NONNEGATIVE, default=0, help="use only the first N questions (of --levels)")
    gen = ap.add_argument_group("rollouts")
    gen.add_argument("--turn-caps", type=turn_caps, default="1,2,4,6,8,12,16")
    gen.add_argument("--samples", type=POSITIVE, default=1, help="rollouts per question (Avg@K)")
    gen.add_argument("--temperature", type=NONNEGATIVE_FLOAT, default=0.0,
                     help="0: greedy decoding (the default); above 0: sampling at this temperature")
    gen.add_argument("--greedy", action="store_const", const=0.0, dest="temperature", help="the same as --temperature 0")
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
    args = parse_with_preset(ap, argv)
    if args.samples > 1 and args.temperature == 0:
        raise InputError(f"--samples {args.samples} with greedy decoding gives one rollout {args.samples} times: "
                         "sample with --temperature above 0")
    return args


if __name__ == "__main__":
    main_cli(main)
