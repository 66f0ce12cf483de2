"""--prompts, --preset mini-o3, the official parser and answer rule, ShareGPT in and out, the judge's texts.

The "official" files here are fixtures the tests write: this project's own sentences under the
official repository's constant names and layout, each file with a side effect that would show if
it were ever run."""
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minio3 import protocol as P
from minio3 import sharegpt
from minio3.conversation import IM_END, IM_START, Budget, encode_chunk, grade, render
from minio3.data import InputError
from minio3.engine import Engine, Sample, Settings
from minio3 import world
import minio3.judge

SYS = "Fixture system prompt: search, zoom with <grounding>{\"bbox_2d\": [..], \"source\": ..}</grounding>."
OBS = ("Fixture: after Action {action_turn} comes Observation {observation_turn}:\n"
       "<|vision_start|><|image_pad|><|vision_end|>.\nGo on.")
ERR = "Fixture: fix the call and go on."
ERR_LINE = "Fixture tool failure: {error_info}.\n"   # the engine's f-string (formatted with the exception)


def official_repo(root: Path) -> Path:
    """A folder laid out like the official repository, whose files raise and write a marker if run."""
    marker = root / "RAN"
    const = root / P.OFFICIAL_CONSTANTS
    const.parent.mkdir(parents=True)
    const.write_text(f"open({str(marker)!r}, 'w').write('constants ran')\nraise SystemExit(1)\n"
                     f"TOOL_CROP_SYSTEM_PROMPT = {SYS!r}\nSYSTEM_PROMPT_MAP = {{'tool_crop': TOOL_CROP_SYSTEM_PROMPT}}\n"
                     f"TOOL_CALL_CROP_MULTI_TRUN_PROMPT = {OBS!r}\nERROR_INFO_MULTI_TURN_PROMPT = {ERR!r}\n")
    engine = root / P.OFFICIAL_ENGINE
    engine.parent.mkdir(parents=True)
    engine.write_text(f"open({str(marker)!r}, 'w').write('engine ran')\n"
                      "def process(error_info, other):\n"
                      "    x = f'unrelated {other}'\n"
                      f"    return f{ERR_LINE!r}\n")
    return root


def test_official_constants_are_read_never_run(tmp_path):
    repo = official_repo(tmp_path / "Mini-o3")
    by_folder = P.load_prompts(repo)
    by_file = P.load_prompts(repo / P.OFFICIAL_CONSTANTS)
    assert by_folder == by_file
    assert by_folder["system"] == SYS
    assert by_folder["observation"] == OBS.replace("{action_turn}", "{action}").replace("{observation_turn}",
                                                                                           "{observation}")
    assert by_folder["error"] == "Fixture tool failure: {reason}.\n" + ERR
    assert not (repo / "RAN").exists()          # neither file was executed


def test_prompt_files_are_checked(tmp_path):
    repo = official_repo(tmp_path / "r")
    (repo / P.OFFICIAL_ENGINE).unlink()
    with pytest.raises(InputError, match="vllm_async_engine.py"):
        P.load_prompts(repo)
    (repo / P.OFFICIAL_CONSTANTS).write_text("TOOL_CROP_SYSTEM_PROMPT = 'x'\n")
    with pytest.raises(InputError, match="TOOL_CALL_CROP_MULTI_TRUN_PROMPT"):
        P.load_prompts(repo / P.OFFICIAL_CONSTANTS)
    bad = tmp_path / "p.json"
    for texts, msg in [({"system": "s", "colour": "x"}, "unknown field"),
                       ({"observation": "no image here"}, "image block"),
                       ({"system": "s <|im_end|> t"}, "special token"),
                       ({"error": ""}, "non-empty")]:
        bad.write_text(json.dumps(texts))
        with pytest.raises(InputError, match=msg):
            P.load_prompts(bad)
    bad.write_text("{not json")
    with pytest.raises(InputError, match="p.json"):
        P.load_prompts(bad)
    ok = tmp_path / "ok.json"
    ok.write_text(json.dumps({"system": "Mine."}))
    texts = P.load_prompts(ok)
    assert texts["system"] == "Mine." and texts["observation"] == P.OBSERVATION   # the rest: our defaults


def _scene(seed=1, level="medium"):
    img, fields, _ = world.probe_sample(np.random.default_rng(seed), level)
    return img, fields["problem"]


def test_preset_conversation_has_the_official_structure(tiny, tmp_path):
    """Under the preset and the official texts, the engine's conversation for a question, a crop,
    a bad call and a second crop (into the first) is, turn for turn, the official rollout's:
    observation numbers by turn (so 3 after the error, not 2), the error turn = the engine's line
    + ERROR_INFO, every tool turn "<|im_end|>\\n<|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n"."""
    model, proc = tiny
    tok = proc.tokenizer
    texts = P.load_prompts(official_repo(tmp_path / "repo"))
    proto = P.Protocol(**texts, numbering="turns", parser="official", answer="first")
    turns = ['<think>a</think>\n<grounding>{"bbox_2d": [0.0, 0.0, 0.5, 0.5], "source": "original_image"}</grounding>',
             '<think>b</think>\n<grounding>{"bbox_2d": [0.2, 0.2, 0.1, 0.4], "source": "original_image"}</grounding>',
             "<think>c</think>\n<grounding>{\"bbox_2d\": [0.5, 0.5, 1.2, 1.0], \"source\": 'observation_1'}</grounding>",
             "<think>d</think> <answer>7</answer>"]
    img, question = _scene()
    pieces = []
    forced = [encode_chunk(tok, t) for t in turns]
    forced[-1] += [tok.convert_tokens_to_ids(IM_END)]
    out = Engine(model, proc, max_batch=1).run(
        [Sample(img, question, forced=forced)], Settings(max_turns=12, max_turn_tokens=64, protocol=proto),
        progress=False, on_text=lambda i, t: pieces.append(t))[0]
    reason = P.official_call(turns[1], [img.size])
    assert isinstance(reason, str)               # x0 > x1: an error turn
    tool = lambda user: f"{IM_END}\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n"
    expected = [f"{IM_START}system\n{SYS}{IM_END}\n{IM_START}user\n{question.replace('<image>', P.IMAGE)}{IM_END}\n"
                f"{IM_START}assistant\n",
                turns[0], tool(OBS.format(action_turn=0, observation_turn=1)),
                turns[1], tool(ERR_LINE.format(error_info=reason) + ERR),
                turns[2], tool(OBS.format(action_turn=2, observation_turn=3)),
                turns[3] + IM_END]
    assert pieces == expected
    assert out.answer == "7" and out.turns == 4 and out.tool_errors == 1
    # the out-of-range box was clamped (official), not refused; the crop came from observation_1
    w1, h1 = int(0.5 * img.width), int(0.5 * img.height)
    x0, y0 = int(0.5 * w1), int(0.5 * h1)
    assert out.crops[1]["pixel_box"] == [x0, y0, w1 - 1, h1 - 1]


def test_official_parser_reads_leniently_and_never_evaluates(tmp_path):
    sizes = [(400, 300), (200, 100)]
    call = lambda box, src='"original_image"': f'<think>x</think><grounding>{{"bbox_2d": {box}, "source": {src}}}</grounding>'
    assert P.official_call(call("[-0.2, 0.1, 1.5, 0.5]"), sizes) == ([-0.2, 0.1, 1.5, 0.5], "original_image",
                                                                     (0, 30, 399, 150))
    assert P.official_call(call("[0, 0, 1, 1]", "'observation_1'"), sizes)[2] == (0, 0, 199, 99)
    assert P.official_call(call("[0.1, 0.1, 0.5, 0.5]", '"observation_1x"'), sizes)[1] == "observation_1"
    marker = tmp_path / "pwned"
    for box in [f"__import__('os').system('touch {marker}')", "(0.1, 0.1, 0.5, 0.5)", "[0.1, 0.2, 0.3]",
                "[0.5, 0.1, 0.5, 0.9]", "[0.0, 0.0, 1.0, 0.001]", "[True, 0, 1, 1]"]:
        assert isinstance(P.official_call(call(box), sizes), str), box
    assert isinstance(P.official_call(call("[0, 0, 1, 1]", '"observation_2"'), sizes), str)
    assert isinstance(P.official_call("<grounding>[0, 0, 1, 1]</grounding>", sizes), str)
    assert not marker.exists()


def test_first_answer_and_official_grading_forms():
    assert P.first_answer(["<answer> B </answer> <grounding>..</grounding>", "<answer>C</answer>"]) == "B"
    assert P.first_answer(["no answer"]) is None
    row = {"options": ["red", "blue", "green", "white"], "solution": "A"}
    for text, right in [("A", 1.0), ("(A) red", 1.0), ("A. red", 1.0), ("red", 1.0), ("(B) blue", 0.0),
                        ("B. red", 0.0)]:
        assert grade(text, row) == right, text
    assert [P.read_score(t) for t in ["Score: 1", "score:0", "I think... Score: 1\nbecause", "nothing",
                                      "Score: 0 (not 1)"]] == [1.0, 0.0, 1.0, 0.0, 0.0]


def test_judge_prompt_from_the_official_reward_file(tmp_path):
    import eval as ev
    f = tmp_path / "general_qa_tool.py"
    f.write_text("raise SystemExit('never run')\nSYSTEM_PROMPT = 'Fixture grader.'\n"
                 "QUERY_PROMPT = 'Q: {question} | truth: {ground_truth} | said: {prediction} | Score: 0 or 1'\n")
    texts = P.load_judge_prompt(f)
    assert texts == {"system": "Fixture grader.", "query": "Q: {question} | truth: {reference} | said: {answer} | "
                                                           "Score: 0 or 1"}
    seen = []

    class FakeJudge:
        def run(self, samples, settings, progress=False):
            seen.extend(samples)
            return [type("T", (), {"turn_texts": ["Score: 1"]})() for _ in samples]

    rows = [{"problem": "<image>\nWhat colour?", "solution": "dark red"}, {"problem": "x", "solution": "7"}]
    assert minio3.judge.judge(FakeJudge(), rows, ["crimson", "7"], texts) == [1.0, 1.0]
    assert len(seen) == 1 and seen[0].question == "Q: What colour? | truth: dark red | said: crimson | Score: 0 or 1"
    assert seen[0].system == "Fixture grader."
    f.write_text("QUERY_PROMPT = 'no fields'\nSYSTEM_PROMPT = ''\n")
    with pytest.raises(InputError, match="question"):
        P.load_judge_prompt(f)


def test_mini_o3_pixel_rule():
    b = Budget(40_000, 2_000_000, rule="mini-o3")
    assert b.size(100, 100) == (196, 196)          # nearest up to 200x200 (40,000), then multiples of 28
    assert b.size(4000, 3000) == (1624, 1232)       # down to 1632x1224 (int), then rounded to 28s
    # 10x2500: up to 12x3162 (min pixels), 29x7379 (28 a side), aspect 254 so 39x7379, then 28s
    assert b.size(10, 2500) == (28, 7392)
    im = b.resize(Image.new("RGB", (100, 100), "red"))
    assert im.size == (196, 196)
    assert Budget(40_000, 2_000_000).size(100, 100) == (224, 224)   # Qwen's rule alone differs


def test_preset_sets_every_budget_and_flags_still_win():
    import eval as ev
    import rl
    a = ev.parse_args(["--preset", "mini-o3"])
    assert (a.max_turn_tokens, a.max_total_tokens, a.max_images, a.min_pixels, a.max_pixels) == \
        (8192, 30_768, 12, 40_000, 2_000_000)
    assert (a.turn_caps[-1], a.numbering, a.parser, a.answer, a.pixel_rule) == (12, "turns", "official", "first",
                                                                               "mini-o3")
    assert ev.parse_args(["--preset", "mini-o3", "--max-turn-tokens", "100"]).max_turn_tokens == 100
    assert ev.parse_args([]).max_turn_tokens == 256 and ev.parse_args([]).parser == "strict"
    r = rl.parse_args(["--preset", "mini-o3"])
    assert r.max_turns == 6 and r.max_turn_tokens == 8192   # training keeps 6 turns


def _trajectory_row(probe_dir):
    row = json.loads((probe_dir / "train.jsonl").read_text().splitlines()[0])
    turns = ['<think>look</think>\n<grounding>{"bbox_2d": [0.0, 0.0, 0.5, 0.5], "source": "original_image"}</grounding>',
             '<think>bad</think>\n<grounding>{"bbox_2d": [0.6, 0.0, 0.5, 0.5], "source": "original_image"}</grounding>',
             '<think>in</think>\n<grounding>{"bbox_2d": [0.25, 0.25, 0.75, 0.75], "source": "observation_1"}</grounding>',
             "<think>found</think>\n<answer>7</answer>"]
    return {**row, "turns": turns, "_root": str(probe_dir)}


def test_sharegpt_round_trip_gives_the_same_tokens_and_mask(tiny, probe_dir, tmp_path):
    _, proc = tiny
    row = _trajectory_row(probe_dir)
    row["turns"][1] = {"text": row["turns"][1], "learn": False}     # a slip: replayed, not trained
    out = tmp_path / "cs" / "coldstart.json"
    out.parent.mkdir()
    assert sharegpt.export([row], out, proc.budget) == 1
    rec = sharegpt.read(out)[0]
    roles = [m["from"] for m in rec["conversations"]]
    assert roles == ["system", "human", "gpt", "human", "gpt", "human", "gpt", "human", "gpt"]
    assert [m.get("loss") for m in rec["conversations"][2::2]] == [None, False, None, None]
    assert len(rec["images"]) == 3 and rec["conversations"][1]["value"].count("<image>") == 1
    got = sharegpt.tokens(rec, proc)
    from minio3.data import load_image, turn_text
    ref = render(load_image(row, probe_dir), row["problem"], [turn_text(t) for t in row["turns"]], proc,
                 unlearned={1})
    assert got["ids"] == ref["ids"] and got["mask"] == ref["mask"]
    assert sum(ref["mask"]) < sum(render(load_image(row, probe_dir), row["problem"],
                                         [turn_text(t) for t in row["turns"]], proc)["mask"])
    assert [im.size for im in got["shown"]] == [im.size for im in ref["shown"]]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(got["shown"], ref["shown"]))


def test_a_written_sharegpt_file_with_two_images_trains_and_bad_ones_are_named(tiny, tmp_path):
    _, proc = tiny
    tok = proc.tokenizer
    for name in ("a.png", "b.png"):
        Image.new("RGB", (300, 200), "blue").save(tmp_path / name)
    rec = {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                             {"from": "gpt", "value": '<grounding>{"bbox_2d": [0, 0, 1, 1], "source": "original_image"}</grounding>'},
                             {"from": "human", "value": "Here it is:\n<image>."},
                             {"from": "gpt", "value": "<answer>blue</answer>"}],
           "images": ["a.png", str(tmp_path / "b.png")]}
    f = tmp_path / "sg.json"
    f.write_text(json.dumps([rec]))
    got = sharegpt.tokens(sharegpt.read(f)[0], proc)
    pad = tok.convert_tokens_to_ids("<|image_pad|>")
    w, h = proc.budget.size(300, 200)
    assert got["ids"].count(pad) == 2 * (w // 28) * (h // 28)     # one token per 28x28 pixels, two images
    trained = tok.decode([i for i, m in zip(got["ids"], got["mask"]) if m])
    assert trained == rec["conversations"][1]["value"] + rec["conversations"][3]["value"] + IM_END
    assert tok.decode(got["ids"]).startswith(f"{IM_START}system\nYou are a helpful assistant.{IM_END}")
    marker = tmp_path / "pwned"
    as_text = {**rec, "conversations": repr(rec["conversations"])}        # the raw dataset's form
    f.write_text(json.dumps([as_text]))
    assert sharegpt.tokens(sharegpt.read(f)[0], proc)["ids"] == got["ids"]
    for broken, msg in [({**rec, "images": ["a.png"]}, "2 images but 'images' lists 1"),
                        ({**rec, "conversations": f"__import__('os').system('touch {marker}')"}, "neither JSON"),
                        ({**rec, "conversations": rec["conversations"][:3]}, "roles must be"),
                        ({**rec, "images": ["a.png", "missing.png"]}, "missing.png"),
                        ({**rec, "conversations": rec["conversations"][:3] +
                          [{"from": "gpt", "value": "x<|im_end|>"}]}, "special token"),
                        ({**rec, "conversations": rec["conversations"][:3] +
                          [{"from": "gpt", "value": "x", "loss": "no"}]}, "'loss' must be true or false")]:
        f.write_text(json.dumps([rec, broken]))
        with pytest.raises(InputError, match=f"sg.json: record 1: .*{msg}"):
            sharegpt.read(f)
    assert not marker.exists()


def test_collect_writes_sharegpt_and_sft_reads_it(probe_dir, tmp_path):
    import collect
    import sft
    out = tmp_path / "cs.jsonl"
    collect.main(["--data", str(probe_dir / "train.jsonl"), "--out", str(out), "--sharegpt",
                  str(tmp_path / "cs.json"), "--limit", "3"])
    rows = sft.read_trajectories([str(tmp_path / "cs.json")])
    assert len(rows) == len(out.read_text().splitlines()) > 0
    assert all("conversations" in r for r in rows)
