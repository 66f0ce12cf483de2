"""ablation.py: arm means, bootstrap standard errors and paired differences, on eval folders the tests write."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from research import ablation
from minio3.data import InputError


def write_eval(folder, correct_by_q: dict, turns_by_q: dict | None = None, samples: int = 1):
    """An eval.py-shaped folder: one trajectory per (question, sample); correct_by_q[q] is a list
    (one per sample) of (correct, turns) pairs or a single bool answered at turn 2."""
    folder.mkdir(parents=True)
    with open(folder / "trajectories.jsonl", "w") as f:
        for q, val in correct_by_q.items():
            pairs = val if isinstance(val, list) else [(val, (turns_by_q or {}).get(q, 2))] * samples
            for k, (ok, turns) in enumerate(pairs):
                f.write(json.dumps({"doc_id": q, "difficulty": "hard" if q.startswith("h") else "easy",
                                    "sample": k, "correct": ok, "answered": True, "turns": turns}) + "\n")
    return folder


def test_means_gain_and_difference_match_direct_computation(tmp_path):
    rng = np.random.default_rng(0)
    qs = [f"h{i}" for i in range(40)] + [f"e{i}" for i in range(40)]
    # arm A: each question answered right at turn 3 or turn 10 (past the training cap 6)
    a_dirs, a_vals = [], []
    for s in range(3):
        vals = {q: [(bool(rng.random() < 0.6), int(rng.choice([3, 10])))] for q in qs}
        a_vals.append(vals)
        a_dirs.append(write_eval(tmp_path / f"a{s}", vals))
    b = {q: bool(rng.random() < 0.3) for q in qs}
    b_dir = write_eval(tmp_path / "b", b)
    out = tmp_path / "out"
    ablation.main(["--arm", "A=" + ",".join(map(str, a_dirs)), "--arm", f"B={b_dir}", "--diff", "A", "B",
                   "--reps", "300", "--out", str(out)])
    res = json.loads((out / "ablation.json").read_text())
    hard = [q for q in qs if q.startswith("h")]
    at = lambda vals, cap: np.mean([[ok and t <= cap for ok, t in v[q]] for v in vals for q in hard])
    assert res["arms"]["A"]["hard"]["acc"]["16"] == pytest.approx(at(a_vals, 16))
    assert res["arms"]["A"]["hard"]["acc"]["6"] == pytest.approx(at(a_vals, 6))
    assert res["arms"]["A"]["hard"]["gain_past_train_cap"] == pytest.approx(at(a_vals, 16) - at(a_vals, 6))
    assert res["arms"]["A"]["seeds"] == 3 and res["arms"]["B"]["seeds"] == 1
    d = next(x for x in res["differences"] if x["difficulty"] == "all")
    a_all = np.mean([[ok for ok, _ in v[q]] for v in a_vals for q in qs])   # every turn count is <= 16
    assert d["diff"] == pytest.approx(a_all - np.mean(list(b.values())))
    assert (out / "ablation.png").stat().st_size > 1000


def test_bootstrap_se_is_the_binomial_one_for_one_seed():
    """One seed, 400 independent questions right with p = 0.5: the SE is sqrt(p(1-p)/n) = 0.025."""
    rng = np.random.default_rng(1)
    x = (rng.random((1, 400)) < 0.5).astype(float)
    se = ablation.bootstrap([x], np.mean, 2000, np.random.default_rng(2))
    p = x.mean()
    assert se == pytest.approx(np.sqrt(p * (1 - p) / 400), rel=0.1)


def test_seed_spread_widens_the_error():
    """Three seeds that disagree (0.2, 0.5, 0.8 on every question) give a larger SE than three that agree."""
    same = np.full((3, 200), 0.5)
    spread = np.array([[0.2] * 200, [0.5] * 200, [0.8] * 200])
    g = np.random.default_rng(3)
    assert ablation.bootstrap([same], np.mean, 500, g) == pytest.approx(0.0)
    assert ablation.bootstrap([spread], np.mean, 500, g) > 0.1


def test_paired_difference_cancels_the_question_noise():
    """Two arms that agree on every question differ by exactly 0 with SE 0 (pairing by question)."""
    x = (np.random.default_rng(4).random((1, 300)) < 0.4).astype(float)
    assert ablation.bootstrap([x, x.copy()], lambda a, b: a.mean() - b.mean(), 500,
                              np.random.default_rng(5)) == pytest.approx(0.0)


def test_bad_arms_are_named(tmp_path):
    a = write_eval(tmp_path / "a", {"h1": True, "h2": False})
    other = write_eval(tmp_path / "other", {"h1": True, "h3": False})
    with pytest.raises(InputError, match="NAME=DIR"):
        ablation.main(["--arm", str(a), "--out", str(tmp_path / "o")])
    with pytest.raises(InputError, match="no trajectories.jsonl"):
        ablation.main(["--arm", f"A={tmp_path / 'nothing'}", "--out", str(tmp_path / "o")])
    with pytest.raises(InputError, match="questions differ"):
        ablation.main(["--arm", f"A={a}", "--arm", f"B={other}", "--out", str(tmp_path / "o")])
    with pytest.raises(InputError, match="no arm named 'C'"):
        ablation.main(["--arm", f"A={a}", "--diff", "A", "C", "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("env, message", [
    ({"REGIME": "bad"}, "REGIME must be tiny, hard or long, not 'bad'"),
    ({"REGIME": "long", "ARMS": "mask foo"}, "ARMS: unknown arm 'foo' (mask, nomask, nocold)"),
    ({"LANES": "0"}, "LANES must be a whole number of 1 or more, not '0'"),
])
def test_run_ablation_refuses_bad_settings_before_any_work(tmp_path, env, message):
    """run_ablation.sh checks REGIME and ARMS before it deletes, makes or trains anything."""
    script = tmp_path / "research" / "run_ablation.sh"   # a copy, run from an empty folder: nothing to find or lose
    script.parent.mkdir()
    shutil.copy(Path(__file__).parents[1] / "research" / "run_ablation.sh", script)
    kept = [tmp_path / "runs" / d / "keep" for d in ("ablation", "ablation_hard", "ablation_long")]
    for f in kept:                                 # what FRESH=1 would delete if the checks came late
        f.parent.mkdir(parents=True)
        f.write_text("x")
    res = subprocess.run(["bash", str(script)], env={**os.environ, "FRESH": "1", **env},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert message in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["research", "runs"]            # nothing made
    assert all(f.exists() for f in kept)                                                # nothing lost


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for python: records the call and its thread setting; eval.py leaves a results.json
echo "${OMP_NUM_THREADS:-unset} $*" >> "$CALLS"
[ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]] && exit 1
out=""; prev=""; for a in "$@"; do [ "$prev" = --out ] && out=$a; prev=$a; done
case $1 in eval.py|make_probe.py) mkdir -p "$out"; [ $1 = eval.py ] && echo {} > "$out/results.json" ;; esac
exit 0
"""


def fake_run_ablation(tmp_path, **env):
    """run_ablation.sh in tmp_path with FAKE_PYTHON as python: (result, [(threads, args) per call])."""
    script = tmp_path / "research" / "run_ablation.sh"
    script.parent.mkdir()
    shutil.copy(Path(__file__).parents[1] / "research" / "run_ablation.sh", script)
    for f in ("runs/tiny/probe/train.jsonl", "runs/tiny/sft/model.safetensors"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).write_text("")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "python").write_text(FAKE_PYTHON)
    (bin_ / "python").chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "CALLS": str(calls), **env}
    env.pop("OMP_NUM_THREADS", None)
    res = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)
    return res, [ln.split(" ", 1) for ln in calls.read_text().splitlines()]


@pytest.mark.parametrize("lanes", ["1", "2"])
def test_run_ablation_runs_every_arm_and_seed_once_in_any_number_of_lanes(tmp_path, lanes):
    """LANES=2 splits the (arm, seed) runs over two lanes, each on half the cores; LANES=1 keeps
    them in one on all cores. Either way each is trained and evaluated once, and the table reads all."""
    res, lines = fake_run_ablation(tmp_path, LANES=lanes, SEEDS="0 1 2")
    assert res.returncode == 0, res.stdout + res.stderr
    rl = sorted(args.split("--out ")[1].split()[0] for _, args in lines if args.startswith("rl.py"))
    assert rl == sorted(f"runs/ablation/rl_{a}_s{s}" for a in ("mask", "nomask", "nocold") for s in range(3))
    evals = [args for _, args in lines if args.startswith("eval.py")]
    assert len(evals) == 10 and len(set(evals)) == 10                    # the SFT model and 9 RL models
    threads = {t for t, args in lines if args.startswith("rl.py")}
    assert threads == ({"unset"} if lanes == "1" else {str(max(1, len(os.sched_getaffinity(0)) // 2))})
    table = next(args for _, args in lines if args.startswith("-m research.ablation"))
    assert table.count("--arm") == 4 and "eval_nocold_s0,runs/ablation/eval_nocold_s1" in table
    if lanes == "2":
        assert (tmp_path / "runs/ablation/lane0.log").read_text() and (tmp_path / "runs/ablation/lane1.log").read_text()


def test_run_ablation_fails_when_a_lane_fails_and_the_other_lane_finishes(tmp_path):
    res, lines = fake_run_ablation(tmp_path, LANES="2", SEEDS="0 1", FAIL_ON="rl_nomask_s0")
    assert res.returncode == 1 and "a lane failed" in res.stdout
    assert not any(args.startswith("-m research.ablation") for _, args in lines)          # no table from a part
    rl = sorted(args.split("--out ")[1].split()[0].split("/")[-1] for _, args in lines if args.startswith("rl.py"))
    # lane 0: mask s0, nocold s0, nomask s1, all run; lane 1: nomask s0 failed, so mask s1 and nocold s1 never started
    assert rl == ["rl_mask_s0", "rl_nocold_s0", "rl_nomask_s0", "rl_nomask_s1"]
