"""The committed tiny base (checkpoints/tiny-base) reads and grounds in the synthetic world."""
import numpy as np

import make_probe
from base import base_sample, score_base
from common import PLAIN_SYSTEM_PROMPT
from infer import Engine, Sample
from model import TINY_BASE, load


def _run(task, n, seed):
    model, proc = load("tiny-base")
    rows, samples = [], []
    for i in range(n):
        level = list(make_probe.LEVELS)[i % 3]
        img, q, a, meta = base_sample(np.random.default_rng([seed, i]), task, proc.budget, level)
        meta.pop("tokens")
        rows.append({"task": task, "solution": a, **meta})
        samples.append(Sample(img, make_probe.ask(q), system=PLAIN_SYSTEM_PROMPT))
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
