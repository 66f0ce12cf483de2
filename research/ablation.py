"""Stage 5: the ablation table, with standard errors (run_ablation.sh runs the arms, then this).

    python -m research.ablation --arm "SFT=runs/ablation/eval_sft" \\
        --arm "RL=runs/ablation/eval_rl_s0,runs/ablation/eval_rl_s1,runs/ablation/eval_rl_s2" \\
        --arm "RL, no masking=runs/ablation/eval_nomask_s0,..." --diff RL "RL, no masking" --out runs/ablation

An arm is one or more eval.py folders on the same questions, one per RL seed (or one folder rolled
out with --samples K). Its accuracy is the mean over seeds, samples and questions. Its standard
error comes from a bootstrap that resamples the questions and, on its own, the arm's seeds: another
test split and another training seed are both noise a claim has to beat. A difference between two
arms pairs the questions (both arms answered the same ones) and resamples each arm's seeds apart.
Prints one table, writes ablation.json and draws ablation.png (accuracy on each difficulty against
the turn cap, one line per arm, with one standard error either side).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from minio3.data import InputError, POSITIVE, atomic_path, main_cli, read_jsonl, turn_caps
from eval import correct_at_cap
from minio3.plots import line_plot


def read_arm(spec: str) -> tuple[str, list[Path]]:
    """'NAME=DIR[,DIR...]' -> (name, folders); every folder must hold an evaluation."""
    name, eq, dirs = spec.partition("=")
    if not eq or not name or not dirs:
        raise InputError(f"--arm {spec!r}: expected NAME=DIR[,DIR...]")
    folders = [Path(d) for d in dirs.split(",")]
    for f in folders:
        if not (f / "trajectories.jsonl").is_file():
            raise InputError(f"--arm {name}: {f} has no trajectories.jsonl (not an eval.py output folder)")
    return name, folders


def arm_arrays(folders: list[Path], caps: list[int], questions: list[str] | None):
    """correct[seed, question, cap] (the mean over an eval's --samples) and turns[seed, question],
    with the questions in one order for every arm; also each question's difficulty."""
    per_seed = []
    for f in folders:
        by_q: dict[str, list[dict]] = {}
        for t in read_jsonl(f / "trajectories.jsonl"):
            by_q.setdefault(t["doc_id"], []).append(t)
        per_seed.append(by_q)
    questions = questions or sorted(per_seed[0])
    for f, by_q in zip(folders, per_seed):
        if sorted(by_q) != sorted(questions):
            raise InputError(
                f"{f}: its questions differ from the other evaluations' (same test split needed)"
            )
    correct = np.array(
        [
            [[np.mean([correct_at_cap(t, c) for t in by_q[q]]) for c in caps] for q in questions]
            for by_q in per_seed
        ]
    )
    turns = np.array([[np.mean([t["turns"] for t in by_q[q]]) for q in questions] for by_q in per_seed])
    difficulty = [per_seed[0][q][0]["difficulty"] for q in questions]
    return questions, difficulty, correct, turns


def bootstrap(arrays: list[np.ndarray], stat, reps: int, rng: np.random.Generator) -> float:
    """Standard error of stat(*arrays) when the questions (axis 1, shared by all arrays) and each
    array's seeds (axis 0, on their own) are drawn again with replacement."""
    n_q = arrays[0].shape[1]
    values = []
    for _ in range(reps):
        q = rng.integers(0, n_q, n_q)
        values.append(stat(*[a[rng.integers(0, len(a), len(a))][:, q] for a in arrays]))
    return float(np.std(values))


def summarise(
    arms: dict[str, np.ndarray],
    turns: dict[str, np.ndarray],
    difficulty: list[str],
    caps: list[int],
    diffs: list[tuple[str, str]],
    train_cap: int,
    reps: int,
    seed: int,
) -> dict:
    """Every figure of the table: per arm and difficulty, accuracy at each cap with its standard error,
    the gain from the training cap to the largest, mean turns; then each asked-for difference."""
    rng = np.random.default_rng(seed)
    order = lambda d: (["easy", "medium", "hard"].index(d) if d in ("easy", "medium", "hard") else 3, d)
    groups = {d: np.array([x == d for x in difficulty]) for d in sorted(set(difficulty), key=order)}
    groups["all"] = np.ones(len(difficulty), bool)
    last, k_train = len(caps) - 1, caps.index(train_cap) if train_cap in caps else None
    out: dict = {"caps": caps, "train_cap": train_cap, "arms": {}, "differences": []}
    for name, a in arms.items():
        row = {"seeds": int(a.shape[0]), "mean_turns": float(turns[name].mean())}
        for g, m in groups.items():
            sub = a[:, m]
            row[g] = {
                "acc": {str(c): float(sub[:, :, i].mean()) for i, c in enumerate(caps)},
                "se": {str(c): bootstrap([sub[:, :, i]], np.mean, reps, rng) for i, c in enumerate(caps)},
            }
            if k_train is not None:
                gain = lambda x: x[:, :, last].mean() - x[:, :, k_train].mean()
                row[g]["gain_past_train_cap"] = float(gain(sub))
                row[g]["gain_se"] = bootstrap([sub], gain, reps, rng)
        out["arms"][name] = row
    for a_name, b_name in diffs:
        for g, m in groups.items():
            a, b = arms[a_name][:, m, last], arms[b_name][:, m, last]
            d = float(a.mean() - b.mean())
            se = bootstrap([a, b], lambda x, y: x.mean() - y.mean(), reps, rng)
            out["differences"].append(
                {
                    "a": a_name,
                    "b": b_name,
                    "difficulty": g,
                    "cap": caps[last],
                    "diff": d,
                    "se": se,
                    "beyond_2se": bool(abs(d) > 2 * se),
                }
            )
    return out


def print_table(res: dict):
    last = str(res["caps"][-1])
    first = next(iter(res["arms"].values()))
    groups = [g for g in first if isinstance(first[g], dict)]     # the difficulties, then "all"
    print(f"accuracy at cap {last} (± one standard error; questions and seeds resampled)")
    print(f"{'arm':26}{'seeds':>6}" + "".join(f"{g:>15}" for g in groups) + f"{'hard gain':>16}{'turns':>7}")
    for name, row in res["arms"].items():
        cells = "".join(f"{row[g]['acc'][last]:8.3f}±{row[g]['se'][last]:.3f}" for g in groups)
        gain = (
            f"{row['hard']['gain_past_train_cap']:+9.3f}±{row['hard']['gain_se']:.3f}"
            if "hard" in row and "gain_past_train_cap" in row["hard"]
            else f"{'':16}"
        )
        print(f"{name:26}{row['seeds']:6d}{cells}{gain}{row['mean_turns']:7.2f}")
    print(f"(hard gain: accuracy on hard at cap {last} minus at the training cap {res['train_cap']})")
    for d in res["differences"]:
        verdict = "beyond 2 SE" if d["beyond_2se"] else "within 2 SE"
        print(
            f"{d['a']} - {d['b']}, {d['difficulty']}, cap {d['cap']}: "
            f"{d['diff']:+.3f} ± {d['se']:.3f} ({verdict})"
        )


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", required=True, help="NAME=DIR[,DIR...]: one arm's eval folders")
    ap.add_argument(
        "--diff",
        action="append",
        nargs=2,
        default=[],
        metavar=("A", "B"),
        help="report arm A minus arm B on each difficulty at the largest cap",
    )
    ap.add_argument("--caps", type=turn_caps, default="1,2,4,6,8,12,16", help="turn caps to tabulate")
    ap.add_argument("--train-cap", type=POSITIVE, default=6, help="the turn limit RL was trained with")
    ap.add_argument("--reps", type=POSITIVE, default=2000, help="bootstrap draws")
    ap.add_argument("--out", default="runs/ablation", help="folder for ablation.json and ablation.png")
    args = ap.parse_args(argv)
    caps = args.caps
    specs = dict(read_arm(s) for s in args.arm)
    for a, b in args.diff:
        for n in (a, b):
            if n not in specs:
                raise InputError(f"--diff {a!r} {b!r}: no arm named {n!r} (arms: {', '.join(specs)})")
    arms, turns, questions, difficulty = {}, {}, None, []
    for name, folders in specs.items():
        questions, difficulty, arms[name], turns[name] = arm_arrays(folders, caps, questions)
    res = summarise(
        arms, turns, difficulty, caps, [tuple(d) for d in args.diff], args.train_cap, args.reps, 0
    )
    print_table(res)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "ablation.json") as tmp:
        Path(tmp).write_text(json.dumps(res, indent=1))
    series = {
        f"{n} {g}": row[g]["acc"] for n, row in res["arms"].items() for g in ("hard", "all") if g in row
    }
    errors = {f"{n} {g}": row[g]["se"] for n, row in res["arms"].items() for g in ("hard", "all") if g in row}
    title = "accuracy against turn cap (hard and all), ± 1 SE"
    line_plot(series, out / "ablation.png", title, errors=errors)
    print(f"-> {out / 'ablation.json'}, {out / 'ablation.png'}")


if __name__ == "__main__":
    main_cli(main)
