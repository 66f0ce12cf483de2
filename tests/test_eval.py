import json

import numpy as np
from PIL import Image

import eval as ev
from common import read_jsonl
from model import save_checkpoint


def _t(doc, diff, correct, answered, turns, zooms=1, sample=0, exceeded=False):
    return {"doc_id": doc, "difficulty": diff, "sample": sample, "correct": correct, "answered": answered,
            "turns": turns, "zooms": zooms, "exceeded": exceeded, "tool_errors": 0}


def test_turn_caps_are_derived_from_the_same_trajectories():
    trajs = [_t("a", "hard", True, True, 3), _t("b", "hard", True, True, 9), _t("c", "easy", True, True, 1, zooms=0),
             _t("d", "easy", False, True, 2), _t("e", "hard", False, False, 16, exceeded=True)]
    r = ev.summarise(trajs, [1, 2, 4, 8, 16])
    assert r["by_turn_cap"] == {"1": 0.2, "2": 0.2, "4": 0.4, "8": 0.4, "16": 0.6}
    assert r["by_turn_cap_difficulty"]["hard"] == {"1": 0.0, "2": 0.0, "4": 1 / 3, "8": 1 / 3, "16": 2 / 3}
    assert r["overall"] == 0.6 and r["by_difficulty"] == {"easy": 0.5, "hard": 2 / 3}
    assert r["mean_turns_correct"] == (3 + 9 + 1) / 3 and r["zoom_rate"] == 3 / 4 and r["exceeded_rate"] == 0.2


def test_eval_cli_results_agree_with_its_trajectories(tiny, probe_dir, tmp_path):
    model, proc = tiny
    save_checkpoint(model, proc, tmp_path / "ck")
    res = ev.main(["--model", str(tmp_path / "ck"), "--data", str(probe_dir / "test.jsonl"), "--out", str(tmp_path / "ev"),
                   "--turn-caps", "1,2,3", "--samples", "2", "--max-turn-tokens", "10", "--examples", "2"])
    trajs = read_jsonl(tmp_path / "ev" / "trajectories.jsonl")
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert len(trajs) == 2 * len(read_jsonl(probe_dir / "test.jsonl")) == saved["n_trajectories"]
    again = ev.summarise(trajs, [1, 2, 3])
    for k, v in again.items():
        assert saved[k] == v, k
    assert saved["overall"] == np.mean([t["correct"] and t["answered"] and t["turns"] <= 3 for t in trajs])
    assert {"overall", "by_difficulty", "by_turn_cap", "mean_turns_correct"} <= set(saved)
    assert Image.open(tmp_path / "ev" / "turn_scaling.png").size == (640, 420)
