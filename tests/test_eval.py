import json

import numpy as np
import pytest
from PIL import Image

import eval as ev
from minio3.data import InputError, read_jsonl
from minio3.model import save_checkpoint
from minio3 import failures


def _t(doc, diff, correct, answered, turns, zooms=1, sample=0, exceeded=False):
    return {"doc_id": doc, "difficulty": diff, "sample": sample, "correct": correct, "answered": answered,
            "turns": turns, "zooms": zooms, "exceeded": exceeded, "tool_errors": 0, "truncated": False,
            "answer": "x" if answered else None, "crops": [], "turn_texts": []}


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
    ev.main(["--model", str(tmp_path / "ck"), "--data", str(probe_dir / "test.jsonl"), "--out", str(tmp_path / "ev"),
                   "--turn-caps", "1,2,3", "--samples", "2", "--temperature", "1.0", "--max-turn-tokens", "10",
                   "--examples", "2"])
    trajs = read_jsonl(tmp_path / "ev" / "trajectories.jsonl")
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert len(trajs) == 2 * len(read_jsonl(probe_dir / "test.jsonl")) == saved["n_trajectories"]
    again = ev.summarise(trajs, [1, 2, 3])
    for k, v in again.items():
        assert saved[k] == v, k
    assert saved["overall"] == np.mean([t["correct"] and t["answered"] and t["turns"] <= 3 for t in trajs])
    assert {"overall", "by_difficulty", "by_turn_cap", "mean_turns_correct"} <= set(saved)
    assert Image.open(tmp_path / "ev" / "turn_scaling.png").size == (640, 420)
    assert Image.open(tmp_path / "ev" / "failures.png").size[0] == 760
    assert saved["failures"]["all"]["n"] == len(trajs)
    assert sum(saved["failures"]["all"]["outcomes"].values()) == pytest.approx(1.0)
    assert trajs[0]["objects"] and trajs[0]["target_bbox"] and trajs[0]["image_size"]



def test_eval_levels_picks_the_difficulties_before_the_limit(tiny, probe_dir, tmp_path):
    model, proc = tiny
    save_checkpoint(model, proc, tmp_path / "ck")
    args = ["--model", str(tmp_path / "ck"), "--data", str(probe_dir / "test.jsonl"), "--turn-caps", "1",
            "--max-turn-tokens", "5", "--examples", "0"]
    ev.main(args + ["--out", str(tmp_path / "ev"), "--levels", "hard", "--limit", "1", "--samples", "2",
                    "--temperature", "1.0"])
    trajs = read_jsonl(tmp_path / "ev" / "trajectories.jsonl")
    assert [t["difficulty"] for t in trajs] == ["hard", "hard"] and len({t["doc_id"] for t in trajs}) == 1
    with pytest.raises(InputError, match="test.jsonl: no record has a difficulty in extreme"):
        ev.main(args + ["--out", str(tmp_path / "ev2"), "--levels", "extreme"])

def _search(answer, crops, first="", **kw):
    """A hard-level search (1536 px image) for the character on the target at [100, 100, 156, 156]."""
    objects = [{"colour": "red", "shape": "square", "glyph": "3", "box": [100, 100, 156, 156]},
               {"colour": "red", "shape": "circle", "glyph": "7", "box": [300, 100, 356, 156]}]
    t = {"doc_id": "q", "difficulty": "hard", "sample": 0, "correct": answer == "3", "answered": answer is not None,
         "answer": answer, "turns": len(crops) + 1, "zooms": len(crops), "exceeded": False, "truncated": False,
         "tool_errors": 0, "crops": crops, "turn_texts": [first + "<grounding>x</grounding>"],
         "target_bbox": objects[0]["box"], "objects": objects, "image_size": [1536, 1536]}
    return {**t, **kw}


def _crop(box, shown):
    return {"pixel_box": box, "shown": [shown, shown]}


def test_failure_analysis_says_why_each_search_ended():
    cell = lambda x: _crop([x, 0, x + 192, 192], 196)           # one cell: the object is ~57 px high
    quarter = _crop([0, 0, 768, 768], 224)                      # a quarter: ~16 px, too small to read
    assert failures.seen([100, 100, 156, 156], cell(0)) and not failures.seen([100, 100, 156, 156], quarter)
    cases = {
        "right": _search("3", [cell(0)]),
        "named another object in view": _search("7", [cell(192)]),
        "saw the target, answered wrong": _search("E", [cell(0)]),
        "answered without seeing the target": _search("E", [quarter]),
        "out of turns": _search(None, [cell(0)] * 6, exceeded=True),
        "turn too long": _search(None, [], truncated=True),
        "no answer": _search(None, [cell(192)]),
    }
    for outcome, t in cases.items():
        assert failures.diagnose(t)["outcome"] == outcome, outcome
    # the opening list: does one of its boxes hold the target's centre (0.083, 0.083)?
    assert failures.diagnose(_search("3", [], first="The red objects: [0.0, 0.0, 0.125, 0.125], [0.5, 0.5, 0.625, 0.625]."))[
        "list_has_target"] is True
    assert failures.diagnose(_search("3", [], first="The red objects: [0.5, 0.5, 0.625, 0.625]."))["list_has_target"] is False
    assert failures.diagnose(_search("3", []))["list_has_target"] is None
    # the opening: a list of two boxes or more, or a direct guess of one
    assert failures.diagnose(_search("3", [], first="The red objects: [0.0, 0.0, 0.125, 0.125], [0.5, 0.5, 0.625, 0.625]."))[
        "opens_with_list"] is True
    assert failures.diagnose(_search("3", [], first="The red square is at [0.0, 0.0, 0.125, 0.125]."))[
        "opens_with_list"] is False
    # a model's broken boxes ("[., ., ., .]", seen from an untrained policy) are no boxes, never a crash
    broken = _search("3", [], first="The red objects: [., ., ., .], [0.0, 0.0, .125, .125].")
    assert failures.listed_boxes("The red objects: [., ., ., .], [0.0, 0.0, .125, .125].") == [[0.0, 0.0, 0.125, 0.125]]
    assert failures.diagnose(broken)["list_has_target"] is True
    assert failures.diagnose(cases["out of turns"])["repeated_zooms"] == 5
    table = failures.failure_table(list(cases.values()))
    assert table["hard"]["n"] == 7 and table["hard"]["outcomes"]["named another object in view"] == pytest.approx(1 / 7)
    assert table["all"]["saw_target"] == pytest.approx(3 / 7)
    # the premature answer: answered, right or wrong, with no crop that showed the target readably
    # (named another object 7, answered E without seeing it): 2 of 7; a lucky guess counts too
    assert table["all"]["answered_unseen"] == pytest.approx(2 / 7)
    lucky = _search("3", [quarter])
    assert failures.diagnose(lucky)["answered_unseen"] and failures.diagnose(lucky)["outcome"] == "right"
    two = "The red objects: [0.0, 0.0, 0.125, 0.125], [0.5, 0.5, 0.625, 0.625]."
    one = "The red square is at [0.5, 0.5, 0.625, 0.625]."
    openings = failures.failure_table([_search("3", [], first=two), _search("3", [], first=one), _search("3", [])])
    assert openings["hard"]["opens_with_list"] == pytest.approx(1 / 3)


def test_zoom_follows_list_compares_each_call_with_the_ends_of_the_list_its_thought_wrote():
    call = lambda b: '<grounding>{"bbox_2d": %s, "source": "original_image"}</grounding>' % b
    three = "[0.0, 0.0, 0.125, 0.125], [0.5, 0.5, 0.625, 0.625], [0.75, 0.0, 0.875, 0.125]"
    texts = [f"<think>The red objects: {three}.</think>" + call("[0.000, 0.000, 0.125, 0.125]"),  # the first
             f"<think>The red objects: {three}.</think>" + call("[0.750, 0.000, 0.875, 0.125]"),  # the last
             f"<think>The red objects: {three}.</think>" + call("[0.500, 0.500, 0.625, 0.625]"),  # the middle
             "<think>Left to check: [0.5, 0.5, 0.625, 0.625].</think>" + call("[0.25, 0.5, 0.375, 0.625]"),  # not
             "<think>I look again.</think>" + call("[0.5, 0.5, 0.625, 0.625]"),         # lists nothing
             "<think>Left to check: [0.5, 0.5, 0.625, 0.625].</think><grounding>{oops</grounding>",  # no box
             "<think>It is at [0.5, 0.5, 0.625, 0.625].</think><answer>3</answer>"]      # no call
    t = _search("3", [], turn_texts=texts)
    assert failures.list_steps(t) == (4, 2)
    pair = "<think>Next in the list: [0.0, 0.0, 0.125, 0.125], [0.5, 0.5, 0.625, 0.625].</think>"
    chain = [pair + call("[0.500, 0.500, 0.625, 0.625]"), pair + call("[0.000, 0.000, 0.125, 0.125]")]
    assert failures.list_steps(_search("3", [], turn_texts=chain)) == (2, 1)   # a chain step: its last box only
    d = failures.diagnose(t)
    assert (d["listed_turns"], d["followed"]) == (4, 2)
    table = failures.failure_table([t, _search("3", [])])
    assert table["hard"]["listed_turns"] == 4 and table["hard"]["zoom_follows_list"] == 0.5
    assert failures.failure_table([_search("3", [])])["all"]["zoom_follows_list"] is None


def test_verdicts_count_which_crops_the_search_accepted():
    """A crop is accepted when the search answers right after it; only crops that show the target
    alone or look-alikes (same colour) alone are judged."""
    cell = lambda x: _crop([x, 0, x + 192, 192], 196)
    v = lambda t: {k: failures.crop_verdicts(t)[k] for k in ("target_crops", "target_accepted", "lookalike_crops",
                                                        "lookalike_accepted")}
    assert v(_search("3", [cell(0)])) == {"target_crops": 1, "target_accepted": 1, "lookalike_crops": 0,
                                          "lookalike_accepted": 0}
    assert v(_search("7", [cell(192)])) == {"target_crops": 0, "target_accepted": 0, "lookalike_crops": 1,
                                            "lookalike_accepted": 1}
    # passed the target by, then took the look-alike
    assert v(_search("7", [cell(0), cell(192)])) == {"target_crops": 1, "target_accepted": 0, "lookalike_crops": 1,
                                                     "lookalike_accepted": 1}
    # no answer: nothing accepted; a crop showing both objects readable is judged neither way
    assert v(_search(None, [cell(192), cell(0)]))["target_accepted"] == 0
    both = _crop([0, 0, 384, 384], 392)
    assert v(_search("3", [both])) == {"target_crops": 0, "target_accepted": 0, "lookalike_crops": 0,
                                       "lookalike_accepted": 0}
    # a blue object is no look-alike of the red target
    blue = _search("5", [cell(192)])
    blue["objects"] = [blue["objects"][0], {**blue["objects"][1], "colour": "blue"}]
    assert v(blue)["lookalike_crops"] == 0
    table = failures.failure_table([_search("3", [cell(0)]), _search("7", [cell(0), cell(192)])])
    assert table["hard"]["target_crops"] == 2 and table["hard"]["target_accepted"] == pytest.approx(0.5)
    assert table["hard"]["lookalike_accepted"] == pytest.approx(1.0)
    assert failures.failure_table([_search("3", [])])["hard"]["target_accepted"] is None


def test_report_page_is_well_formed_and_holds_every_trajectory_and_the_numbers(tiny, probe_dir, tmp_path):
    import xml.etree.ElementTree as ET
    model, proc = tiny
    save_checkpoint(model, proc, tmp_path / "ck")
    res = ev.main(["--model", str(tmp_path / "ck"), "--data", str(probe_dir / "test.jsonl"), "--out", str(tmp_path / "a"),
                   "--turn-caps", "1,2", "--samples", "2", "--temperature", "1.0", "--max-turn-tokens", "12",
                   "--top-p", "0.9"])
    assert (res["temperature"], res["top_p"], res["greedy"]) == (1.0, 0.9, False)
    page = (tmp_path / "a" / "report.html").read_text(encoding="utf-8")
    root = ET.fromstring(page.split("\n", 1)[1])            # well-formed XHTML (after the DOCTYPE line)
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    rows = [d for d in root.iter("{http://www.w3.org/1999/xhtml}div") if "traj" in d.get("class", "").split()]
    assert len(rows) == res["n_trajectories"] == 12
    outcomes = {d.get("data-outcome") for d in rows}
    assert outcomes <= set(failures.OUTCOMES)
    cells = [td.text for td in root.iterfind(".//h:table[1]//h:td", ns)]
    for cap, p in res["by_turn_cap"].items():                 # the headline numbers are results.json's
        assert any(c and c.startswith(f"{p:.3f} ± ") for c in cells), cap
    for name in [i.get("src") for i in root.iter("{http://www.w3.org/1999/xhtml}img")]:
        assert (tmp_path / "a" / name).is_file(), name     # every picture is a file beside the page
    ev.main(["--model", str(tmp_path / "ck"), "--data", str(probe_dir / "test.jsonl"), "--out", str(tmp_path / "b"),
             "--turn-caps", "1,2", "--max-turn-tokens", "12"])
    ev.main(["--compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp.png")])
    ET.fromstring((tmp_path / "cmp.html").read_text(encoding="utf-8").split("\n", 1)[1])


def test_several_models_are_evaluated_each_in_its_folder_and_compared(tiny, probe_dir, tmp_path):
    """eval.py with several models (its default: run_tiny's SFT and RL) writes each model's results
    into --out/<its folder's name> and the comparison into --out; greedy by default."""
    model, proc = tiny
    for name in ("sft", "rl"):
        save_checkpoint(model, proc, tmp_path / "m" / name)
    res = ev.main(["--model", str(tmp_path / "m" / "sft"), str(tmp_path / "m" / "rl"), "--data",
                   str(probe_dir / "test.jsonl"), "--out", str(tmp_path / "ev"), "--turn-caps", "1,2",
                   "--max-turn-tokens", "8", "--examples", "0"])
    assert [r["greedy"] for r in res] == [True, True] and res[0]["by_turn_cap"] == res[1]["by_turn_cap"]
    for name in ("sft", "rl"):
        assert json.loads((tmp_path / "ev" / name / "results.json").read_text())["model"].endswith(name)
    assert (tmp_path / "ev" / "compare.png").is_file() and (tmp_path / "ev" / "compare.html").is_file()
    with pytest.raises(InputError, match="pass --overwrite"):
        ev.main(["--model", str(tmp_path / "m" / "sft"), str(tmp_path / "m" / "rl"), "--data",
                 str(probe_dir / "test.jsonl"), "--out", str(tmp_path / "ev")])
    with pytest.raises(InputError, match="--samples 2 with greedy decoding"):
        ev.parse_args(["--samples", "2"])


def test_report_text_is_escaped_and_free_of_control_characters():
    from minio3 import report
    assert report.esc("<b>\x00\x1b & 'x'") == "&lt;b&gt;\ufffd\ufffd &amp; &#x27;x&#x27;"
