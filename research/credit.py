"""What does GRPO's reward push? The credit each search habit gets, from sampled rollouts.

    python eval.py --model runs/tiny/sft --data runs/tiny/probe/train.jsonl --levels hard --limit 64 \\
        --samples 8 --temperature 0.7 --turn-caps 6 --max-total-tokens 4096 --out runs/tiny/rollouts_sft
    python -m research.credit runs/tiny/rollouts_sft

eval.py --samples K rolls each question out K times, as an RL step does (use rl.py's temperature,
turn limit and token limit). Each question's K rollouts are one group: their rewards (1 if right)
give GRPO's advantages A_i, standardised within the group (rl.group_advantages), and a group whose
rewards all tie is left out, as rl.py drops it. A habit's *credit* is the sum over a group's rollouts
of A_i x (how many times rollout i shows the habit), averaged over the groups that train: the
direction, to first order, in which one step of the policy-gradient loss moves the habit's
log-probability summed over its occurrences (positive: the step makes it more likely). With
over-turn masking the rollouts that hit the turn limit (or the context) get no weight; without, they
count with their reward, 0. Because the credit counts occurrences, a habit that wrong rollouts show
more often than right ones can be pushed down even when it makes a search more likely to succeed:
long failing searches hold more of every step they take. The standard error is over groups.

Reads: an eval folder's trajectories.jsonl. Writes: <dir>/credit.json and credit.png.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from minio3.data import InputError, atomic_path, main_cli, read_jsonl
from minio3.failures import diagnose
from minio3.plots import font
from rl import group_advantages

# habit -> how many times one rollout shows it, from its record and eval.diagnose's flags
HABITS = {
    "zoom on its list's end": lambda t, d: d["followed"],
    "zoom off its list": lambda t, d: d["listed_turns"] - d["followed"],
    "repeat a zoom": lambda t, d: d["repeated_zooms"],
    "any zoom": lambda t, d: len(t["crops"]),
    "invalid call": lambda t, d: t["tool_errors"],
    "pass by the target's crop": lambda t, d: d["target_crops"] - d["target_accepted"],
    "answer after seeing the target": lambda t, d: int(t["answered"] and d["saw_target"]),
    "answer without seeing it": lambda t, d: int(t["answered"] and not d["saw_target"]),
}
ARMS = {"masking": False, "no masking": True}   # arm -> whether exceeded rollouts are trained on


def groups_of(trajs: list[dict], where: str) -> list[list[dict]]:
    """The rollouts grouped by question; every question must have the same number (K >= 2)."""
    by = defaultdict(list)
    for t in trajs:
        by[t["doc_id"]].append(t)
    sizes = {len(g) for g in by.values()}
    if len(sizes) != 1 or min(sizes) < 2:
        raise InputError(f"{where}: every question needs the same number of rollouts, at least 2 "
                         f"(eval.py --samples K); found {sorted(sizes)}")
    return list(by.values())


def group_credit(group: list[dict], train_exceeded: bool, stats: str) -> dict[str, float] | None:
    """One group's credit per habit, or None when the group's counted rewards tie (rl.py drops it)."""
    rewards = torch.tensor([float(t["correct"]) for t in group])
    keep = torch.tensor([train_exceeded or not t["exceeded"] for t in group])
    counted = rewards[keep] if stats == "paper" else rewards
    if len(counted) < 2 or float(counted.std(unbiased=False)) < 1e-4:
        return None
    adv = group_advantages(rewards, len(group), keep, exclude_masked_from_stats=stats == "paper")
    weight = (adv * keep.float()).numpy()
    flags = [diagnose(t) for t in group]
    return {h: float(sum(w * f(t, d) for w, t, d in zip(weight, group, flags))) for h, f in HABITS.items()}


def credit_table(trajs: list[dict], where: str = "trajectories", stats: str = "official") -> dict:
    """Per arm: each habit's mean credit over the groups that train, its standard error, and the
    number of those groups; and each habit's mean count in right and in wrong rollouts."""
    groups = groups_of(trajs, where)
    out = {"groups": len(groups), "rollouts_per_group": len(groups[0]), "stats": stats, "arms": {}}
    for arm, train_exceeded in ARMS.items():
        rows = [c for c in (group_credit(g, train_exceeded, stats) for g in groups) if c is not None]
        out["arms"][arm] = {"groups_trained": len(rows), "credit": {
            h: {"mean": float(np.mean([r[h] for r in rows])) if rows else 0.0,
                "se": float(np.std([r[h] for r in rows], ddof=1) / np.sqrt(len(rows))) if len(rows) > 1 else 0.0}
            for h in HABITS}}
    flags = [diagnose(t) for t in trajs]
    for name, want in (("right", True), ("wrong", False)):
        picked = [(t, d) for t, d in zip(trajs, flags) if bool(t["correct"]) == want]
        out[f"mean_count_{name}"] = {h: float(np.mean([f(t, d) for t, d in picked])) if picked else None
                                     for h, f in HABITS.items()}
    return out


def print_credit(table: dict):
    arms = table["arms"]
    print(f"{table['groups']} questions x {table['rollouts_per_group']} rollouts; groups that train: "
          + ", ".join(f"{a} {r['groups_trained']}" for a, r in arms.items()))
    print(f"{'habit':32}{'right':>7}{'wrong':>7}" + "".join(f"{a:>20}" for a in arms))
    for h in HABITS:
        counts = [table[f"mean_count_{k}"][h] for k in ("right", "wrong")]
        cells = "".join("      -" if c is None else f"{c:7.2f}" for c in counts)
        print(f"{h:32}{cells}" + "".join(f"{r['credit'][h]['mean']:+11.3f} ± {r['credit'][h]['se']:.3f}"
                                          for r in arms.values()))
    print("(right / wrong: the habit's mean count in right and wrong rollouts; the arms: its credit, the mean\n"
          " over training groups of the sum of advantage x count; positive: a GRPO step makes it more likely)")


def credit_chart(table: dict, path: Path, title: str):
    """Horizontal bars, one pair per habit (an arm each), with one standard error either side."""
    arms, habits = list(table["arms"]), list(HABITS)
    span = max((abs(c["mean"]) + c["se"] for r in table["arms"].values() for c in r["credit"].values()),
               default=1.0) or 1.0
    W, L, T, row = 820, 250, 50, 34
    H = T + row * len(habits) + 56
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.font = font()
    d.text((10, 12), title, fill="black")
    mid, half = L + (W - L - 20) / 2, (W - L - 20) / 2 - 10
    x = lambda v: mid + half * v / span
    colours = [(31, 119, 180), (255, 127, 14)]
    for i, h in enumerate(habits):
        y = T + row * i
        d.text((10, y + 8), h, fill="black")
        for j, a in enumerate(arms):
            c = table["arms"][a]["credit"][h]
            top = y + 3 + 13 * j
            d.rectangle([min(x(0), x(c["mean"])), top, max(x(0), x(c["mean"])), top + 11], fill=colours[j])
            d.line([x(c["mean"] - c["se"]), top + 5, x(c["mean"] + c["se"]), top + 5], fill="black")
    d.line([mid, T - 4, mid, T + row * len(habits)], fill="black")
    for v in (-span, 0.0, span):
        d.text((x(v) - 14, T + row * len(habits) + 2), f"{v:+.2f}", fill="black")
    for j, a in enumerate(arms):
        d.rectangle([L + 160 * j, H - 26, L + 160 * j + 14, H - 14], fill=colours[j])
        d.text((L + 160 * j + 20, H - 27), a, fill="black")
    d.text((10, H - 27), "credit (advantage x count)", fill="black")
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dir", help="an eval.py --out folder made with --samples K (K >= 2)")
    ap.add_argument("--stats", choices=["official", "paper"], default="official",
                    help="as rl.py: whether masked rollouts count in the group mean/std (official) or not (paper)")
    args = ap.parse_args(argv)
    src = Path(args.dir) / "trajectories.jsonl"
    if not src.is_file():
        raise InputError(f"{src}: not found (run eval.py --samples K --out {args.dir} first)")
    table = credit_table(read_jsonl(src), str(src), args.stats)
    print_credit(table)
    with atomic_path(Path(args.dir) / "credit.json") as tmp:
        Path(tmp).write_text(json.dumps(table, indent=1))
    credit_chart(table, Path(args.dir) / "credit.png", f"GRPO credit per habit: {args.dir}")
    print(f"-> {args.dir}/credit.json, credit.png")


if __name__ == "__main__":
    main_cli(main)
