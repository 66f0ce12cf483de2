"""The hasty teacher (collect.py --hasty): guesses beside the explorer's searches, kept only when right."""
import random

import numpy as np

import collect
from minio3 import explorer
from minio3.conversation import TINY_BUDGET, grade
from minio3.data import read_jsonl
from minio3.world import cell_box, probe_sample


def _hard(seed: int):
    image, fields, placed = probe_sample(np.random.default_rng([seed, 5]), "hard")
    return image, fields, placed


def test_a_guess_names_one_candidate_zooms_on_it_and_answers_what_it_read():
    image, fields, placed = _hard(0)
    tries = explorer.guesses(image, fields["problem"], TINY_BUDGET, random.Random(0), 12)
    assert len(tries) >= 8                       # a try is dropped only when its crop shows no character
    candidates = {tuple(cell_box(o["cell"])) for o in placed
                  if o["colour"] == placed[0]["colour"]}
    named = set()
    for t in tries:
        first, second = t["turns"]
        assert first.count("<grounding>") == 1 and "<answer>" not in first
        assert second.endswith("</answer>") and "<grounding>" not in second
        assert "not" not in second and "I want" not in second   # no verdict: the character, unchecked
        assert t["pattern"] == "guess" and f"<answer>{t['answer']}</answer>" in second
        named.add(first.split('"bbox_2d": ')[1].split("]")[0] + "]")
    boxes = {str([float(v) for v in b.strip("[]").split(",")]) for b in named}
    assert len(boxes) >= 2                       # 12 tries do not all name one candidate
    assert boxes <= {str(list(c)) for c in candidates}   # every box named is a candidate's cell


def test_a_lucky_guess_is_right_and_a_wrong_one_is_wrong():
    """Whatever a guess answers is graded like any answer: right exactly when its crop held the
    target's character (the target, or a look-alike that carries the same character)."""
    right = wrong = 0
    for seed in range(6):
        image, fields, placed = _hard(seed)
        target = placed[0]
        for t in explorer.guesses(image, fields["problem"], TINY_BUDGET, random.Random(seed), 10):
            ok = grade(t["answer"], fields)
            right, wrong = right + ok, wrong + (not ok)
            if ok:
                assert t["answer"] == target["glyph"]
    assert right > 0 and wrong > right           # lucky now and then: most guesses miss on hard


def test_no_guess_where_the_candidates_are_few():
    for seed in range(4):   # medium: 4-6 candidates, under HASTY_CANDIDATES
        image, fields, _ = probe_sample(np.random.default_rng([seed, 5]), "medium")
        assert explorer.guesses(image, fields["problem"], TINY_BUDGET, random.Random(0), 5) == []
    image, fields, _ = probe_sample(np.random.default_rng([1, 5]), "hard")
    assert explorer.guesses(image, "What is the character printed on the thing?", TINY_BUDGET,
                            random.Random(0), 5) == []
    assert explorer.guesses(image, fields["problem"], TINY_BUDGET, random.Random(0), 0) == []


def test_hasty_adds_lucky_guesses_beside_the_unchanged_searches(probe_dir, tmp_path):
    base = ["--data", str(probe_dir / "train.jsonl"), "--max-share", "1"]
    collect.main(base + ["--out", str(tmp_path / "plain.jsonl"), "--hasty", "0"])   # the explorer alone
    collect.main(base + ["--out", str(tmp_path / "hasty.jsonl"), "--hasty", "16"])
    plain, hasty = read_jsonl(tmp_path / "plain.jsonl"), read_jsonl(tmp_path / "hasty.jsonl")
    key = lambda r: (r["doc_id"], tuple(r["turns"]))
    searches = [r for r in hasty if r["pattern"] != "guess"]
    assert sorted(map(key, searches)) == sorted(map(key, plain))     # the explorer's searches as without
    guessed = [r for r in hasty if r["pattern"] == "guess"]
    assert all(r["correct"] and r["n_turns"] == 2 for r in guessed)  # kept only when right
    assert len({key(r) for r in guessed}) == len(guessed)            # no duplicates
    assert all(r["turns"][0].split("<grounding>")[0].count("[") == 1 for r in guessed)   # one box named, no list
