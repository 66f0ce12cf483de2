"""Cold start: the explorer, the filter, trajectory rendering, and the trainer's resume."""
import json
import random
import re
from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from research import base
import collect
import sft
from minio3.conversation import IM_END, TINY_BUDGET, encode_chunk, render
from minio3.data import load_image, read_jsonl
from minio3.engine import Engine, Sample
from conftest import write_explorer_run
from minio3 import explorer
from minio3 import drills as drill_lib

BUDGET = TINY_BUDGET


def boxes(text: str) -> list[list[float]]:
    """The boxes written in a text, in order."""
    return [json.loads(b) for b in re.findall(r"\[[\d., ]+\]", text)]


def test_explorer_sees_only_image_and_question(probe_dir):
    rows = read_jsonl(probe_dir / "train.jsonl") + read_jsonl(probe_dir / "test.jsonl")
    right = 0
    for row in rows:
        public = {"images": row["images"], "problem": row["problem"]}   # no target_bbox, no solution
        res = explorer.explore(load_image(public, probe_dir), public["problem"], BUDGET, random.Random(0), depth_first=0.5)
        assert res["turns"] and res["pattern"] in {"direct", "trial_and_error", "depth_first", "failed"}
        right += res["answer"] == row["solution"]
    assert right >= len(rows) - 1


def test_filter_drops_wrong_exceeded_and_duplicates():
    mk = lambda doc, ok, pat="trial_and_error", turns=("a",), **kw: {"doc_id": doc, "correct": ok, "pattern": pat, "turns": list(turns), **kw}
    found = [mk("1", True), mk("1", True), mk("2", False), mk("3", True, exceeded=True), mk("4", True, "direct", ("b",))]
    kept = collect.filter_trajectories(found, max_share=1.0, seed=0)
    assert sorted(f["doc_id"] for f in kept) == ["1", "4"]
    many = [mk(str(i), True, "direct", (str(i),)) for i in range(10)] + [mk(f"t{i}", True, "trial_and_error", (f"t{i}",)) for i in range(2)]
    kept = collect.filter_trajectories(many, max_share=0.6, seed=0)
    share = sum(f["pattern"] == "direct" for f in kept) / len(kept)
    assert share <= 0.6 + 1e-9 and sum(f["pattern"] == "trial_and_error" for f in kept) == 2


def test_collect_cli_writes_correct_trajectories(probe_dir, tmp_path, capsys):
    out = tmp_path / "cs.jsonl"
    collect.main(["--data", str(probe_dir / "train.jsonl"), "--out", str(out), "--depth-first", "0.5"])
    rows = read_jsonl(out)
    assert rows and all(r["correct"] and r["answer"] == r["solution"] for r in rows)
    assert "kept by number of turns" in capsys.readouterr().out


def test_rendered_trajectory_equals_engine_tokens_and_masks_only_assistant(tiny, probe_dir):
    model, proc = tiny
    row = read_jsonl(probe_dir / "train.jsonl")[1]   # a medium question: several turns
    image = load_image(row, probe_dir)
    res = explorer.explore(image, row["problem"], proc.budget, random.Random(0))
    s = render(image, row["problem"], res["turns"], proc)
    tok = proc.tokenizer
    forced = [encode_chunk(tok, t) for t in res["turns"]]
    forced[-1] = forced[-1] + [tok.convert_tokens_to_ids(IM_END)]
    t = Engine(model, proc).run([Sample(image, row["problem"], forced=forced)], max_turns=20, greedy=True, progress=False)[0]
    assert t.token_ids == s["ids"] and t.sampled_mask == s["mask"] and t.answer == res["answer"]
    ids = np.array(s["ids"])
    mask = np.array(s["mask"])
    assert not mask[ids == proc.image_token_id].any()          # no image token is labelled
    text = tok.decode(ids[mask].tolist())
    assert "<|im_start|>" not in text and "Observation" not in text and text.count("<grounding>") == len(res["turns"]) - 1


@pytest.fixture(scope="module")
def small_run(tiny, probe_dir, tmp_path_factory):
    return write_explorer_run(tmp_path_factory.mktemp("sftrun"), tiny, probe_dir)


def _sft(root, out, *extra):
    sft.main(["--data", str(root / "cs.jsonl"), "--init", str(root / "init"), "--out", str(out), "--steps", "4",
              "--batch", "2", "--save-every", "2", "--lr", "1e-3", "--verdict-drills", "0", "--precision", "fp32", *extra])
    return {r["step"]: r["loss"] for r in read_jsonl(out.parent / (out.name + "_log.jsonl"))}


def test_resume_after_kill_reproduces_the_next_loss(small_run, monkeypatch):
    one = ("--length-split", "1")   # one forward a step: the third call is step 3's
    full = _sft(small_run, small_run / "full", *one)
    calls = {"n": 0}
    real = sft.token_logprobs

    def dies_on_third_step(model, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt   # the process is killed during step 3
        return real(model, batch)
    monkeypatch.setattr(sft, "token_logprobs", dies_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        _sft(small_run, small_run / "killed", *one)
    monkeypatch.setattr(sft, "token_logprobs", real)
    resumed = _sft(small_run, small_run / "killed", "--resume", *one)
    assert resumed[3] == pytest.approx(full[3], rel=1e-5) and resumed[4] == pytest.approx(full[4], rel=1e-5)
    assert full[4] < full[1]


def test_nan_loss_stops_and_keeps_the_last_checkpoint(small_run, monkeypatch):
    real = sft.token_logprobs
    calls = {"n": 0}

    def nan_on_third(model, batch):
        calls["n"] += 1
        lp = real(model, batch)
        return lp * float("nan") if calls["n"] == 3 else lp
    monkeypatch.setattr(sft, "token_logprobs", nan_on_third)
    with pytest.raises(SystemExit, match=r"step 3: the loss is nan.*\(step 2\)"):
        _sft(small_run, small_run / "nan", "--length-split", "1")   # one forward a step
    assert torch.load(small_run / "nan" / "trainer_state.pt", weights_only=False)["step"] == 2


def test_worker_processes_give_the_same_batches(small_run):
    """--workers builds micro-batches in other processes: same data, same order, same losses."""
    here = _sft(small_run, small_run / "w0")
    there = _sft(small_run, small_run / "w1", "--workers", "1")
    assert [there[k] for k in sorted(there)] == pytest.approx([here[k] for k in sorted(here)], rel=1e-6)


def test_runs_of_similar_length_give_the_same_losses_and_weights(small_run):
    """--length-split: a step's trajectories forwarded in runs sorted by length (less padding), each
    run's loss divided by the whole step's token count, is the same step as one padded batch."""
    from minio3.model import by_length
    runs = by_length([{"ids": [0] * n} for n in (5, 1, 4, 2, 3)], 2)
    assert [[len(s["ids"]) for s in r] for r in runs] == [[1, 2], [3, 4, 5]]
    assert len(by_length([{"ids": [0]}], 4)) == 1
    rows = read_jsonl(small_run / "cs.jsonl")
    assert len({len(json.dumps(r["turns"])) for r in rows}) > 1     # trajectories of several lengths
    whole = _sft(small_run, small_run / "whole", "--length-split", "1", "--batch", "4")
    split = _sft(small_run, small_run / "split", "--length-split", "4", "--batch", "4")   # one trajectory a run
    assert [split[k] for k in sorted(split)] == pytest.approx([whole[k] for k in sorted(whole)], rel=1e-5)
    a = load_file(small_run / "whole" / "model.safetensors")
    b = load_file(small_run / "split" / "model.safetensors")
    # (AdamW moves each weight by about the rate whatever its gradient's size, so the float
    # rounding of a near-zero gradient shows: differences of ~2e-6 after 4 steps of 1e-3)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 2e-5


def test_epoch_order_is_a_permutation_grouped_by_length():
    rows = [{"turns": ["x" * n]} for n in np.random.default_rng(0).integers(10, 3000, 64)]
    order = sft.epoch_order(rows, 8, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(64))
    length = np.array([len(r["turns"][0]) for r in rows])
    spread = lambda o: np.mean([np.ptp(length[o[i:i + 8]]) for i in range(0, 64, 8)])
    assert spread(order) < 0.5 * spread(np.random.default_rng(1).permutation(64))


def test_base_records_mix_into_trajectory_training(small_run, tmp_path):
    folder = tmp_path / "base"
    base.write_base(folder, 4, 0, seed=5)
    sft.main(["--data", str(small_run / "cs.jsonl"), str(folder / "base_train.jsonl"), "--init", str(small_run / "init"),
              "--out", str(tmp_path / "mix"), "--steps", "2", "--batch", "4", "--save-every", "2"])
    assert (tmp_path / "mix" / "model.safetensors").exists()


def test_ledger_thoughts_make_each_zoom_a_copy(probe_dir):
    """The ledger style: the first zoom is the first box of the opening list; after a miss the
    thought gives the verdict ("..., not the <target>.") and the boxes left to check, the first
    being the next zoom and the list one shorter each time; only the last turn says "This is the"."""
    rows = read_jsonl(probe_dir / "train.jsonl") + read_jsonl(probe_dir / "test.jsonl")
    searched = 0
    for row in rows:
        res = explorer.explore(load_image(row, probe_dir), row["problem"], BUDGET, random.Random(0))
        if res["pattern"] != "trial_and_error":
            continue
        searched += 1
        colour, shape = explorer.parse_question(row["problem"])
        lists = []
        for k, turn in enumerate(res["turns"][:-1]):
            thought, call = turn.split("</think>")
            zoom = json.loads(call.split("</grounding>")[0].split("<grounding>")[1])["bbox_2d"]
            if k == 0:
                lists.append(boxes(thought.split(f"The {colour} objects: ")[1]))
            else:
                assert re.match(rf"<think>It is a {colour} \w+ with the character \w, not the {colour} {shape}\. "
                                r"Left to check: ", thought)
                lists.append(boxes(thought.split("Left to check: ")[1]))
            assert lists[-1][0] == zoom and "This is the" not in thought
        assert all(a[1:] == b for a, b in zip(lists, lists[1:]))
        assert res["turns"][-1].endswith(f"This is the {colour} {shape}.</think>\n<answer>{row['solution']}</answer>")
    assert searched >= 2


def _hard_searches(probe_dir, style: str):
    """(record, the ledger style's search, the `style` search) of each hard training question the
    explorer searches one by one."""
    for row in [r for r in read_jsonl(probe_dir / "train.jsonl") if r["difficulty"] == "hard"]:
        image = load_image(row, probe_dir)
        ledger = explorer.explore(image, row["problem"], BUDGET, random.Random(0))
        res = explorer.explore(image, row["problem"], BUDGET, random.Random(0), style=style)
        if res["pattern"] == "trial_and_error":
            yield row, ledger, res


def test_backward_thoughts_end_each_list_on_the_box_zoomed_next(probe_dir):
    """The backward style: the same opening list as the ledger (reading order), checked from its
    end; every thought ends on the box its call zooms into, each ledger is the previous list minus
    its last box, and the search finds the same answer as the ledger style's."""
    searched = 0
    for row, ledger, res in _hard_searches(probe_dir, "backward"):
        searched += 1
        assert res["answer"] == ledger["answer"] == row["solution"]
        colour, _ = explorer.parse_question(row["problem"])
        opening = res["turns"][0].split("</think>")[0]
        assert boxes(opening) == boxes(ledger["turns"][0].split("</think>")[0])
        lists, zooms = [], []
        for turn in res["turns"][:-1]:
            thought, call = turn.split("</think>")
            zooms.append(json.loads(call.split("</grounding>")[0].split("<grounding>")[1])["bbox_2d"])
            lists.append(boxes(thought.split(": ", 1)[1] if not lists else thought.split("Left to check: ")[1]))
            assert lists[-1][-1] == zooms[-1] and thought.endswith(explorer.fmt_box(zooms[-1]) + ".")
        assert all(a[:-1] == b for a, b in zip(lists, lists[1:]))
        assert zooms == lists[0][::-1][: len(zooms)]
    assert searched >= 2


@pytest.mark.parametrize("style", ["chain", "chain-compare", "chain-goal"])
def test_chain_thoughts_name_the_checked_box_then_the_next_in_the_opening_words(probe_dir, style):
    """The chain styles: the same searches as the ledger; the opening thought ends on "the <colour>
    objects: [first]" (the list's own words) and zooms it; after a miss the thought writes "Next in
    the list: [checked], [next]." where "[checked], [next]" is a piece of the opening list's text,
    and zooms the next box. chain-compare gives its verdicts in the compare style's words; chain-goal
    opens every turn after a crop with "I want the <colour> <shape>." before describing the crop."""
    searched = 0
    for row, ledger, res in _hard_searches(probe_dir, style):
        searched += 1
        assert res["answer"] == ledger["answer"] and len(res["turns"]) == len(ledger["turns"])
        colour, shape = explorer.parse_question(row["problem"])
        opening = res["turns"][0].split("</think>")[0]
        listing = opening.split(f"The {colour} objects: ")[1].split(". They look alike")[0]
        assert boxes(listing) == boxes(ledger["turns"][0].split("</think>")[0])
        zooms = [boxes(t.split("<grounding>")[1])[0] for t in res["turns"][:-1]]
        assert opening.endswith(f"the {colour} objects: {explorer.fmt_box(zooms[0])}.")
        for k, turn in enumerate(res["turns"][1:-1], start=1):
            pair = turn.split("Next in the list: ")[1].split(".</think>")[0]
            assert pair in listing and boxes(pair) == [zooms[k - 1], zooms[k]]
            assert (f"I want the {colour} " in turn) == (style != "chain")
            assert turn.startswith(f"<think>I want the {colour} {shape}. It is a ") == (style == "chain-goal")
        assert res["turns"][-1].split("</think>")[0].endswith(
            f"{shape} is the same." if style != "chain" else f"This is the {colour} {shape}.")
        assert zooms == boxes(listing)[: len(zooms)]
    assert searched >= 2



def test_index_thoughts_number_the_list_and_name_the_next_number_and_its_box(probe_dir):
    """index-goal: the same searches as the ledger; the opening list numbers its boxes "(1) [a], (2)
    [b], ..." in reading order and ends on "(1) [first]"; after a miss the thought names "Next: (k)
    [box]." where k is one more than the number zoomed before and the box is the one numbered k in
    the opening list; every turn after a crop opens with the goal; with slips, the turn after a slip
    names the same number and box again."""
    searched = slipped = 0
    for row, ledger, res in _hard_searches(probe_dir, "index-goal"):
        searched += 1
        assert res["answer"] == ledger["answer"] and len(res["turns"]) == len(ledger["turns"])
        colour, shape = explorer.parse_question(row["problem"])
        opening = res["turns"][0].split("</think>")[0]
        listing = opening.split(f"The {colour} objects: ")[1].split(". They look alike")[0]
        numbered = dict(re.findall(r"\((\d+)\) (\[[^\]]*\])", listing))
        assert list(numbered) == [str(k) for k in range(1, len(numbered) + 1)]
        assert [boxes(b)[0] for b in numbered.values()] == boxes(ledger["turns"][0].split("</think>")[0])
        assert opening.endswith(f"so I check them in order: (1) {numbered['1']}.")
        zooms = [boxes(t.split("<grounding>")[1])[0] for t in res["turns"][:-1]]
        for k, turn in enumerate(res["turns"][1:-1], start=2):
            number, box = re.search(r"Next: \((\d+)\) (\[[^\]]*\])\.</think>", turn).groups()
            assert int(number) == k and box == numbered[number] and boxes(box)[0] == zooms[k - 1]
            assert turn.startswith(f"<think>I want the {colour} {shape}. It is a ")
        assert res["turns"][-1].split("</think>")[0].endswith(f"{shape} is the same.")
        out = explorer.explore(load_image(row, probe_dir), row["problem"], BUDGET, random.Random(0),
                              style="index-goal", slips=1.0)
        for k, turn in enumerate(out["turns"]):
            if isinstance(turn, dict):
                slipped += 1
                step = "Next: " + turn["text"].split("Next: ")[1].split("</think>")[0]
                assert step in out["turns"][k + 1]
    assert searched >= 2 and slipped >= 1

def test_slips_zoom_a_neighbour_without_a_loss_then_name_the_meant_box_again(probe_dir):
    """--slips: a slipped turn is {"text", "learn": false} whose call zooms a cell one row or column
    from the box its thought names; the next turn says what that crop shows and zooms the meant box,
    with the same step text; the search still finds the answer, and without slips nothing changes."""
    slipped = 0
    for row, ledger, res in _hard_searches(probe_dir, "chain-compare"):
        image = load_image(row, probe_dir)
        assert explorer.explore(image, row["problem"], BUDGET, random.Random(0), style="chain-compare", slips=0.0) == res
        out = explorer.explore(image, row["problem"], BUDGET, random.Random(0), style="chain-compare", slips=1.0)
        assert out["answer"] == row["solution"]
        colour, _ = explorer.parse_question(row["problem"])
        for k, turn in enumerate(out["turns"]):
            if not isinstance(turn, dict):
                continue
            slipped += 1
            assert turn["learn"] is False and not isinstance(out["turns"][k + 1], dict)
            thought, call = turn["text"].split("</think>")
            meant, went = boxes(thought)[-1], boxes(call)[0]
            assert sorted(round(abs(a - b), 3) for a, b in zip(meant, went)) == [0, 0, 0.125, 0.125]
            step = "Next in the list: " + thought.split("Next in the list: ")[1]
            after = out["turns"][k + 1]
            assert step in after and boxes(after.split("</think>")[1])[0] == meant
            assert after.startswith(f"<think>There is no {colour} object here.") or f"is not {colour}." in after
    assert slipped >= 2
    row, _, res = next(_hard_searches(probe_dir, "chain-goal"))   # the goal style: the goal, then what the crop shows
    out = explorer.explore(load_image(row, probe_dir), row["problem"], BUDGET, random.Random(0), style="chain-goal", slips=1.0)
    colour, shape = explorer.parse_question(row["problem"])
    after = [out["turns"][k + 1] for k, t in enumerate(out["turns"]) if isinstance(t, dict)]
    assert after and all(re.match(rf"<think>I want the {colour} {shape}\. (There is no {colour} object here: not it"
                                  rf"|It is a \w+ \w+ with the character \w: \w+ is not {colour})\. Next", a) for a in after)


def test_slipped_turns_carry_no_loss(tiny, probe_dir):
    """The tokens of a turn stored with "learn": false are exactly the ones that leave the loss mask."""
    _, proc = tiny
    row, _, res = next(_hard_searches(probe_dir, "chain-compare"))
    image = load_image(row, probe_dir)
    full = render(image, row["problem"], res["turns"], proc)
    part = render(image, row["problem"], res["turns"], proc, unlearned={1})
    assert full["ids"] == part["ids"]
    dropped = [a and not b for a, b in zip(full["mask"], part["mask"])]
    assert not any(b and not a for a, b in zip(full["mask"], part["mask"]))
    runs = np.flatnonzero(np.diff(np.r_[0, np.array(full["mask"], int), 0]))   # starts and ends of labelled runs
    assert np.flatnonzero(dropped).tolist() == list(range(runs[2], runs[3]))    # the second turn, whole


def test_plain_thoughts_are_the_earlier_wording(probe_dir):
    row = next(r for r in read_jsonl(probe_dir / "train.jsonl") if r["difficulty"] == "hard")
    res = explorer.explore(load_image(row, probe_dir), row["problem"], BUDGET, random.Random(0), style="plain")
    assert all("Left to check" not in t for t in res["turns"])
    assert any(t.startswith("<think>It is a") and "I check the next one." in t for t in res["turns"])


def test_compare_thoughts_put_both_shapes_side_by_side(probe_dir):
    """The compare style: "It is a <colour> <seen> with the character c. I want the <colour> <shape>:
    <seen> is not <shape>." after a miss (the list of boxes follows), "...: <shape> is the same." at
    the end; the seen shape is the one the crop showed (the ledger style's words, same search)."""
    for row in [r for r in read_jsonl(probe_dir / "train.jsonl") if r["difficulty"] == "hard"]:
        image = load_image(row, probe_dir)
        ledger = explorer.explore(image, row["problem"], BUDGET, random.Random(0))
        res = explorer.explore(image, row["problem"], BUDGET, random.Random(0), style="compare")
        colour, shape = explorer.parse_question(row["problem"])
        assert len(res["turns"]) == len(ledger["turns"]) and res["answer"] == ledger["answer"]
        for old, new in zip(ledger["turns"][1:-1], res["turns"][1:-1]):
            seen = re.match(rf"<think>It is a {colour} (\w+) with", old).group(1)
            assert new.startswith(f"<think>It is a {colour} {seen} with") and \
                f". I want the {colour} {shape}: {seen} is not {shape}. Left to check: " in new
            assert new.split("Left to check: ")[1] == old.split("Left to check: ")[1]
        if res["answer"] != "none":
            assert f"I want the {colour} {shape}: {shape} is the same.</think>\n<answer>" in res["turns"][-1]


def test_verdict_drills_label_only_the_verdict_and_half_say_yes(tiny):
    """A drill ends its thought on a description; the label is the verdict that follows, which
    says "This is" exactly when the described shape is the asked one."""
    from minio3.drills import verdict_drill
    rng = np.random.default_rng(3)
    yes = 0
    for _ in range(400):
        question, thought, said = verdict_drill(rng)
        colour, shape = question.rsplit(" ", 2)[-2], question.rsplit(" ", 1)[-1].rstrip("?")
        seen = thought.rsplit("It is a ", 1)[1].split()[1]
        assert thought.startswith(f"<think>I am looking for the {colour} {shape}. ")
        assert said == (f". This is the {colour} {shape}." if seen == shape else f", not the {colour} {shape}.")
        yes += seen == shape
    assert 160 < yes < 240
    _, proc = tiny
    drills = drill_lib.drill_batch(5, 6, seed=0, processor=proc)
    assert drills == drill_lib.drill_batch(5, 6, seed=0, processor=proc) != drill_lib.drill_batch(6, 6, seed=0, processor=proc)
    for d in drills:
        labelled = proc.tokenizer.decode([i for i, m in zip(d["ids"], d["mask"]) if m])
        assert labelled.startswith((". This is the ", ", not the ")) and labelled.endswith(".")
        assert not any(d["mask"][:d["mask"].index(True)]) and all(d["mask"][d["mask"].index(True):])
        assert d["shown"] == [] and proc.image_token_id not in d["ids"]


def test_compare_drills_label_the_decision(tiny):
    """In the compare style the thought ends on the copies of the asked and the seen shape and "is";
    the label is the decision (" the same." exactly when the shapes are equal); an unknown style is refused."""
    from minio3.conversation import verdict
    from minio3.drills import verdict_drill
    rng = np.random.default_rng(4)
    for _ in range(200):
        question, thought, said = verdict_drill(rng, "compare")
        colour, shape = question.split()[-2], question.rsplit(" ", 1)[-1].rstrip("?")
        seen = re.search(r"It is a \w+ (\w+) with the character \w\. I want the \w+ \w+: (\w+) is$", thought)
        assert thought.endswith(f"I want the {colour} {shape}: {seen.group(1)} is") and seen.group(2) == seen.group(1)
        assert said == (" the same." if seen.group(1) == shape else f" not {shape}.")
    for _ in range(100):   # the goal style: the goal first, the same decision labelled
        question, thought, said = verdict_drill(rng, "goal")
        colour, shape = question.split()[-2], question.rsplit(" ", 1)[-1].rstrip("?")
        seen = re.search(rf"I want the {colour} {shape}\. It is a {colour} (\w+) with the character \w: (\w+) is$", thought)
        assert seen and seen.group(2) == seen.group(1)
        assert said == (" the same." if seen.group(1) == shape else f" not {shape}.")
    with pytest.raises(ValueError, match="verdict style"):
        verdict("red", "circle", "square", "8", "shouty")
    _, proc = tiny
    for d in drill_lib.drill_batch(0, 8, seed=0, processor=proc, style="compare", search_share=0.5):
        labelled = proc.tokenizer.decode([i for i, m in zip(d["ids"], d["mask"]) if m])
        assert re.fullmatch(r"(the same|not \w+) ?\.", labelled.strip()), labelled


def test_look_drills_show_what_the_cell_holds(tiny):
    """A look drill's four crops are the target's cell, a look-alike's, another colour's and an empty
    cell of one probe picture, by their pixels (the asked colour's fill is in the first two and
    nowhere in the last two; the empty one holds no object colour at all), each answered with what it
    shows; drill_batch labels exactly the answer (and the end of the message) after one picture."""
    from minio3.conversation import look_verdict
    from minio3.drills import look_drills
    from minio3.world import COLOURS
    fill = lambda crop, c: int((np.asarray(crop.convert("RGB")) == COLOURS[c]).all(-1).sum())
    rng = np.random.default_rng(5)
    for _ in range(30):
        (t, q, a0), (l, _, a1), (o, _, a2), (e, _, a3) = look_drills(rng, "compare")
        colour, shape = re.fullmatch(r"Is this the (\w+) (\w+)\?\n<image>", q).groups()
        assert fill(t, colour) > 300 and fill(l, colour) > 300 and fill(o, colour) == 0
        assert sum(fill(e, c) for c in COLOURS) == 0 and t.size == e.size and t.size[0] in (128, 192)
        assert a0.endswith(f"I want the {colour} {shape}: {shape} is the same.")
        assert re.fullmatch(rf"It is a {colour} (\w+) with the character \w\. I want the {colour} {shape}: \1 is not {shape}\.", a1)
        other = re.fullmatch(rf"It is a (\w+) \w+ with the character \w\. I want the {colour} {shape}: \1 is not {colour}\.", a2)
        assert other and other.group(1) != colour and fill(o, other.group(1)) > 300
        assert a3 == f"There is no {colour} object here. I want the {colour} {shape}: not it."
    assert look_verdict("red", "circle", None) == "There is no red object here."
    assert look_verdict("red", "circle", ("blue", "circle", "4")) == "It is a blue circle with the character 4, not the red circle."
    _, proc = tiny
    drills = drill_lib.drill_batch(3, 6, seed=0, processor=proc, kind="look", style="compare")
    assert drills[0]["ids"] == drill_lib.drill_batch(3, 6, seed=0, processor=proc, kind="look", style="compare")[0]["ids"]
    for d in drills:
        labelled = proc.tokenizer.decode([i for i, m in zip(d["ids"], d["mask"]) if m])
        assert re.fullmatch(r"(It is a|There is no) .*: .*\.<\|im_end\|>", labelled), labelled
        assert len(d["shown"]) == 1 and d["ids"].count(proc.image_token_id) > 0
        assert not any(d["mask"][:d["mask"].index(True)]) and all(d["mask"][d["mask"].index(True):])


def test_ledger_drills_label_only_the_copies_and_each_copy_is_right(tiny):
    """A ledger drill is a search without crops in the backward ledger: every call zooms the last box
    of the list just written, each "Left to check:" is the previous list minus its last box, the
    opening list is in reading order; the labelled characters are exactly the ledgers and the calls'
    boxes, and the labelled tokens of drill_batch are those covering them in the whole text's tokens."""
    from minio3.conversation import parse_action
    from minio3.drills import ledger_drill
    rng = np.random.default_rng(6)
    misses = Counter()
    for _ in range(200):
        question, said, spans = ledger_drill(rng)
        colour, shape = question.split()[-2], question.rsplit(" ", 1)[-1].rstrip("?")
        turns = said.split("<|im_start|>assistant\n")
        misses[len(turns) - 1] += 1
        lists = [boxes(turns[0].split(f"The {colour} objects: ")[1].split("</think>")[0])]
        assert lists[0] == sorted(lists[0], key=lambda b: (b[1], b[0])) and 2 <= len(lists[0]) <= 9
        labelled = [said[a:b] for a, b in spans]
        for k, turn in enumerate(turns):
            if k:
                assert re.match(rf"<think>It is a {colour} \w+ with the character \w, not the {colour} {shape}\. "
                                r"Left to check: ", turn)
                lists.append(boxes(turn.split("Left to check: ")[1].split("</think>")[0]))
                assert lists[-1] == lists[-2][:-1]
                assert turn.split("Left to check: ")[1].split("</think>")[0] == labelled.pop(0)
            action = parse_action(turn.split("<|im_end|>")[0])
            assert action.kind == "zoom" and action.bbox == lists[-1][-1]
            assert labelled.pop(0) == "[" + ", ".join(f"{v:.3f}" for v in lists[-1][-1]) + "]"
        assert labelled == []
    assert set(misses) == {1, 2, 3}
    _, proc = tiny
    drills = drill_lib.drill_batch(2, 6, seed=0, processor=proc, kind="ledger")
    assert drills == drill_lib.drill_batch(2, 6, seed=0, processor=proc, kind="ledger")
    same = np.random.default_rng([0, 2, 0, 8])   # drill_batch's stream: a drill, then its prompt's draw
    for d in drills:
        tail = proc.tokenizer.encode(ledger_drill(same)[1], add_special_tokens=False)
        same.random()
        assert d["ids"][-len(tail):] == tail and d["shown"] == [] and proc.image_token_id not in d["ids"]
    for d in drills:
        text = proc.tokenizer.decode([i for i, m in zip(d["ids"], d["mask"]) if m])
        assert re.fullmatch(r"( ?\[[\d., ]+\][.,]?)+", text), text
    with pytest.raises(ValueError, match="drill kind"):
        drill_lib.drill_batch(0, 1, seed=0, processor=proc, kind="shouty")


def test_drill_accuracy_matches_a_one_by_one_reference(tiny):
    """drill_accuracy (one padded batch) equals the share of drills, each run alone and unpadded,
    whose every labelled token gets probability > 1/2; it is 1 for a model that always knows."""
    model, proc = tiny
    for style in ("ledger", "compare"):
        drills = drill_lib.drill_batch(0, 12, seed=5, processor=proc, search_share=0.5, style=style)
        right = []
        with torch.no_grad():
            for d in drills:
                p = torch.softmax(model(input_ids=torch.tensor([d["ids"]])).logits[0].float(), -1)
                right.append(all(p[t - 1, d["ids"][t]].item() > 0.5 for t in range(1, len(d["ids"])) if d["mask"][t]))
        assert drill_lib.drill_accuracy(model, proc, n=12, seed=5, style=style) == pytest.approx(np.mean(right))
    vocab = model.config.text_config.vocab_size
    lengths = [len(d["ids"]) for d in drill_lib.drill_batch(0, 12, seed=5, processor=proc, style="compare",
                                                      search_share=drill_lib.DRILL_SEARCH_SHARE)]

    class Oracle(torch.nn.Module):   # all its mass on the drill's next token, except at the last
        device = torch.device("cpu")  # token of rows 0, 3, 6, 9, where a wrong token gets most

        def forward(self, input_ids, attention_mask, **kw):   # (right-padded: attention_mask None)
            logits = torch.full((*input_ids.shape, vocab), -1e4)
            logits[:, :-1].scatter_(2, input_ids[:, 1:, None], 0.0)
            for b in range(0, len(input_ids), 3):
                last = lengths[b] - 2          # predicts the final labelled token
                logits[b, last, (input_ids[b, last + 1] + 1) % vocab] = 1.0
            return type("Out", (), {"logits": logits})()
    assert drill_lib.drill_accuracy(Oracle(), proc, n=12, seed=5, style="compare") == pytest.approx(8 / 12)


def test_a_drill_batch_is_a_loss_of_its_own(tiny):
    """Text-only batches collate without pixels; a drill batch's loss is the mean over its own
    labelled tokens (computed here token by token), whatever the step's trajectory token count,
    times the drills' weight."""
    from minio3.model import collate
    model, proc = tiny
    drills = drill_lib.drill_batch(0, 3, seed=1, processor=proc)
    batch = collate(drills, proc, "cpu")
    assert "pixel_values" not in batch
    with torch.no_grad():
        loss = sft.sft_loss(model, {**batch, "drill": torch.ones(())}, n_tokens=10_000, n_micro=2)
        nll = []
        for d in drills:
            logp = torch.log_softmax(model(input_ids=torch.tensor([d["ids"]])).logits[0].float(), -1)
            nll += [-logp[t - 1, d["ids"][t]].item() for t in range(1, len(d["ids"])) if d["mask"][t]]
        light = sft.sft_loss(model, {**batch, "drill": torch.tensor(0.25)}, n_tokens=10_000, n_micro=2)
    assert loss.item() == pytest.approx(np.mean(nll), rel=1e-4)
    assert light.item() == pytest.approx(0.25 * np.mean(nll), rel=1e-4)


def test_sft_with_verdict_drills_trains_and_logs(small_run):
    losses = _sft(small_run, small_run / "drills", "--verdict-drills", "4")
    plain = _sft(small_run, small_run / "nodrills")
    assert set(losses) == {1, 2, 3, 4} and all(np.isfinite(list(losses.values())))
    assert losses[1] > plain[1]          # the drills' own mean is added to the trajectories' loss
    _sft(small_run, small_run / "compare", "--verdict-drills", "4", "--verdict-style", "compare", "--eval-every", "4")
    evals = [r["eval"] for r in read_jsonl(small_run / "compare_log.jsonl") if "eval" in r]
    assert len(evals) == 1 and 0.0 <= evals[0]["drills"] <= 1.0   # the verdict on fresh drills, logged
    _sft(small_run, small_run / "both", "--verdict-drills", "2", "--ledger-drills", "2", "--look-drills", "2",
         "--verdict-style", "goal", "--eval-every", "4")
    evals = [r["eval"] for r in read_jsonl(small_run / "both_log.jsonl") if "eval" in r]
    assert len(evals) == 1 and {"drills", "ledger_drills", "look_drills"} <= set(evals[0])   # each kind on fresh drills
