import json

import numpy as np
import pytest
from PIL import Image

from research import credit
from minio3.data import InputError, write_jsonl

TARGET, LOOKALIKE = [100, 100, 156, 156], [300, 100, 356, 156]
LIST = "The red objects: [0.0, 0.0, 0.125, 0.125], [0.125, 0.0, 0.25, 0.125], [0.5, 0.5, 0.625, 0.625]."


def _cell(x):
    return {"pixel_box": [x, 0, x + 192, 192], "shown": [196, 196]}


def _search(doc, answer, cells, exceeded=False, errors=0):
    """A hard search (1536 px) whose first thought lists three cells; it zooms `cells` (x of each)."""
    objects = [{"colour": "red", "shape": "square", "glyph": "3", "box": TARGET},
               {"colour": "red", "shape": "circle", "glyph": "7", "box": LOOKALIKE}]
    texts = [LIST + "<grounding>x</grounding>"] + ["Next in the list: <grounding>x</grounding>"] * (len(cells) - 1)
    return {"doc_id": doc, "difficulty": "hard", "sample": 0, "correct": answer == "3", "answered": answer is not None,
            "answer": answer, "turns": len(cells) + 1, "zooms": len(cells), "exceeded": exceeded, "truncated": False,
            "tool_errors": errors, "crops": [_cell(x) for x in cells], "turn_texts": texts,
            "target_bbox": TARGET, "objects": objects, "image_size": [1536, 1536]}


def _group():
    """One question, four rollouts: right after one zoom; wrong after two zooms on a look-alike (one a
    repeat); a guess without a look; six zooms on empty and look-alike cells that hit the limit."""
    return [_search("q", "3", [0]), _search("q", "7", [192, 192]), _search("q", "9", []),
            _search("q", None, [192, 600, 800, 1000, 1200, 1400], exceeded=True, errors=1)]


def test_credit_is_the_advantage_weighted_count_computed_by_hand():
    group = _group()
    table = credit.credit_table(group)
    # GRPO's advantages by hand: rewards 1, 0, 0, 0 standardised with the unbiased std (official stats:
    # the exceeded rollout counts in the mean and std), so A = (1 - .25) / .5 and (0 - .25) / .5
    r = np.array([1.0, 0, 0, 0])
    a = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    zooms = np.array([1, 2, 0, 6])
    mask = np.array([1, 1, 1, 0])           # masking: the exceeded rollout has no weight
    got = {arm: table["arms"][arm]["credit"] for arm in credit.ARMS}
    assert got["masking"]["any zoom"]["mean"] == pytest.approx(float((a * mask * zooms).sum()))
    assert got["no masking"]["any zoom"]["mean"] == pytest.approx(float((a * zooms).sum()))
    assert got["masking"]["repeat a zoom"]["mean"] == pytest.approx(float(a[1]))
    assert got["no masking"]["invalid call"]["mean"] == pytest.approx(float(a[3]))
    assert got["masking"]["invalid call"]["mean"] == 0.0
    assert got["masking"]["answer after seeing the target"]["mean"] == pytest.approx(float(a[0]))
    assert got["masking"]["answer without seeing it"]["mean"] == pytest.approx(float(a[1] + a[2]))
    # masking lets the long failing search go unpunished; without it, every zoom it made is pushed down
    assert got["masking"]["any zoom"]["mean"] > 0 > got["no masking"]["any zoom"]["mean"]
    assert table["mean_count_right"]["any zoom"] == 1 and table["mean_count_wrong"]["any zoom"] == pytest.approx(8 / 3)


def test_the_paper_stats_leave_masked_rollouts_out_of_the_mean():
    table = credit.credit_table(_group(), stats="paper")
    r = np.array([1.0, 0, 0])               # the three that count
    a = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    got = table["arms"]["masking"]["credit"]["answer after seeing the target"]["mean"]
    assert got == pytest.approx(float(a[0]), rel=1e-6) and got != pytest.approx(1.5, rel=1e-3)   # official: 1.5


def test_tied_groups_teach_nothing_and_the_mean_and_error_run_over_the_groups_that_train():
    tied = [_search("t", "9", [0]) for _ in range(4)]
    second = [{**t, "doc_id": "r"} for t in _group()]
    second[1] = {**_search("r", "3", [192, 192]), "doc_id": "r"}
    table = credit.credit_table(_group() + tied + second)
    assert table["groups"] == 3 and table["arms"]["masking"]["groups_trained"] == 2
    one = credit.credit_table(_group())["arms"]["masking"]["credit"]["any zoom"]["mean"]
    two = credit.credit_table(second)["arms"]["masking"]["credit"]["any zoom"]["mean"]
    got = table["arms"]["masking"]["credit"]["any zoom"]
    assert got["mean"] == pytest.approx((one + two) / 2)
    assert got["se"] == pytest.approx(np.std([one, two], ddof=1) / np.sqrt(2))


def test_groups_of_unequal_size_are_refused_with_the_file_named(tmp_path):
    with pytest.raises(InputError, match="x.jsonl: every question needs the same number"):
        credit.credit_table(_group() + [_search("lone", "3", [0])], "x.jsonl")
    with pytest.raises(InputError, match="at least 2"):
        credit.credit_table([_search("a", "3", [0]), _search("b", "3", [0])], "x.jsonl")
    with pytest.raises(InputError, match="trajectories.jsonl: not found"):
        credit.main([str(tmp_path)])


def test_cli_writes_the_table_and_the_chart(tmp_path, capsys):
    write_jsonl(tmp_path / "trajectories.jsonl", _group())
    credit.main([str(tmp_path)])
    saved = json.loads((tmp_path / "credit.json").read_text())
    assert saved == json.loads(json.dumps(credit.credit_table(_group())))
    assert Image.open(tmp_path / "credit.png").size[0] == 820
    assert "zoom on its list's end" in capsys.readouterr().out
