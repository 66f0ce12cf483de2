"""The committed tiny base (checkpoints/tiny-base) reads and grounds in the synthetic world."""
import numpy as np
import pytest

from research.base import base_sample, score_base
from minio3 import conversation
from minio3.conversation import PLAIN_SYSTEM_PROMPT
from minio3.engine import Engine, Sample
from minio3.model import TINY_BASE, load
from minio3 import world
from minio3 import drills as drill_lib


def _run(task, n, seed):
    model, proc = load("tiny-base")
    rows, samples = [], []
    for i in range(n):
        level = list(world.LEVELS)[i % 3]
        img, q, a, meta = base_sample(np.random.default_rng([seed, i]), task, proc.budget, level)
        meta.pop("tokens")
        rows.append({"task": task, "solution": a, **meta})
        samples.append(Sample(img, world.ask(q), system=PLAIN_SYSTEM_PROMPT))
    out = Engine(model, proc).run(samples, max_turns=1, greedy=True, max_turn_tokens=120, progress=False)
    return [score_base(r, t.turn_texts[0].replace("<|im_end|>", "")) for r, t in zip(rows, out)]


def test_base_checkpoint_is_committed_and_small():
    size = sum(p.stat().st_size for p in TINY_BASE.iterdir())
    assert (TINY_BASE / "model.safetensors").exists() and size < 25e6


def test_base_reads_the_character_on_a_crop():
    assert np.mean(_run("read", 30, 11)) >= 0.9


def test_base_gives_the_box_of_the_asked_for_object():
    assert np.mean(_run("find", 24, 12)) >= 0.85
    assert np.mean(_run("locate", 12, 13)) >= 0.9


def test_base_pretraining_runs_through_the_sft_trainer_and_resumes(tmp_path, monkeypatch):
    """base.py: vision-only sheets and language tasks with the auxiliary head, held-out evaluation,
    and a kill at step 3 that resumes to the same losses (the aux head's state included)."""
    from research import base
    from minio3.data import read_jsonl
    base.write_base(tmp_path / "data", 0, 10, seed=7)

    def run(out, *extra):
        base.main(["--init", "tiny", "--out", str(out), "--steps", "4", "--batch", "2", "--save-every", "2",
                   "--tasks", "sheet:1,read:1,list:1", "--eval-data", str(tmp_path / "data" / "base_test.jsonl"),
                   "--eval-every", "4", "--eval-n", "4", *extra])
        return {r["step"]: r for r in read_jsonl(out.parent / (out.name + "_log.jsonl"))}
    full = run(tmp_path / "full")
    assert {r["task"] for r in full.values()} >= {"sheet"} and "eval" in full[4]
    real, calls = base.aux_loss, {"n": 0}

    def dies_on_third_step(*a):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a)
    monkeypatch.setattr(base, "aux_loss", dies_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed")
    monkeypatch.setattr(base, "aux_loss", real)
    resumed = run(tmp_path / "killed", "--resume")
    assert [resumed[s]["loss"] for s in (3, 4)] == pytest.approx([full[s]["loss"] for s in (3, 4)], rel=1e-5)


def test_verify_records_ask_about_the_crop_half_the_time_truly(tmp_path):
    """`verify`: "Is this the <colour> <shape>?" about a one-cell crop; the answer is the search's
    verdict sentence, built from the crop's true object; about half the questions name its shape."""
    import re

    from research import base
    from minio3.data import read_jsonl
    rng = np.random.default_rng(0)
    yes = 0
    for _ in range(60):
        img, question, answer, meta = base_sample(rng, "verify")
        colour, shape = re.match(r"Is this the (\w+) (\w+)\?", question).groups()
        assert colour == meta["colour"]
        assert answer == conversation.verdict(colour, shape, meta["shape"], meta["glyph"])
        yes += shape == meta["shape"]
    assert 18 <= yes <= 42
    base.main(["--write-data", str(tmp_path / "v"), "--n-train", "4", "--n-test", "0", "--tasks", "verify:1"])
    rows = read_jsonl(tmp_path / "v" / "base_train.jsonl")
    assert [r["task"] for r in rows] == ["verify"] * 4 and all(r["system"] == "search" for r in rows)


def test_text_tasks_are_drills_and_train(tmp_path):
    """base.py's `compare` task: a batch of drill_lib.drill_batch's verdict drills (no picture, twice the
    batch size), trained through the same loop; its `ledger` task: a batch of ledger drills."""
    from research import base
    from minio3.data import read_jsonl
    from minio3.model import build_tiny
    _, proc = build_tiny()
    task, samples = base.base_batch(0, 3, seed=1, processor=proc, weights={"compare": 1.0})
    assert task == "compare" and len(samples) == 6 and all(s["shown"] == [] for s in samples)
    base.main(["--init", "tiny", "--out", str(tmp_path / "ck"), "--steps", "3", "--batch", "2", "--aux", "0",
               "--tasks", "compare:1"])
    log = read_jsonl(tmp_path / "ck_log.jsonl")
    assert [r["task"] for r in log] == ["compare"] * 3 and all(np.isfinite(r["loss"]) for r in log)
    task, samples = base.base_batch(0, 3, seed=1, processor=proc, weights={"ledger": 1.0})
    assert task == "ledger" and len(samples) == 3 and all(s["shown"] == [] and any(s["mask"]) for s in samples)
