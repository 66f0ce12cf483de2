import json
import random

import pytest

from minio3.conversation import MAX_TURN_CHARS, Action, parse_action


def call(box, source="original_image", **extra):
    return "<think>x</think>\n<grounding>" + json.dumps({"bbox_2d": box, "source": source, **extra}) + "</grounding>"


def test_valid_zoom_and_answer():
    a = parse_action(call([0.1, 0.2, 0.5, 0.6]))
    assert a.kind == "zoom" and a.bbox == [0.1, 0.2, 0.5, 0.6] and a.source == "original_image"
    a = parse_action(call([0, 0, 1, 1], "observation_2"), image_sizes=[(100, 100)] * 3)
    assert a.kind == "zoom" and a.source_index == 2
    a = parse_action("<think>done</think>\n<answer> 7 </answer>")
    assert a.kind == "answer" and a.answer == "7"
    assert parse_action("<think>nothing to do</think>").kind == "none"


@pytest.mark.parametrize("text, reason", [
    ("<grounding>{\"bbox_2d\": [0.1, 0.1, 0.2, 0.2], \"source\": \"original_image\"}", "not closed"),
    ("<grounding>{bbox_2d: [0.1, 0.1, 0.2, 0.2]}</grounding>", "not valid JSON"),
    ("<grounding>{\"bbox_2d\": [NaN, 0.1, 0.2, 0.2], \"source\": \"original_image\"}</grounding>", "not valid JSON"),
    ("<grounding>{\"bbox_2d\": [0.1, 0.1, Infinity, 0.2], \"source\": \"original_image\"}</grounding>", "not valid JSON"),
    ("<grounding>[0.1, 0.1, 0.2, 0.2]</grounding>", "JSON object"),
    (call([0.1, 0.1, 0.2]), "four numbers"),
    (call("0.1,0.1,0.2,0.2"), "four numbers"),
    (call(["0.1", 0.1, 0.2, 0.2]), "numbers only"),
    (call([True, 0.1, 0.2, 0.2]), "numbers only"),
    (call([0.5, 0.1, 0.2, 0.2]), "x0 < x1"),
    (call([0.1, 0.3, 0.2, 0.3]), "x0 < x1"),
    (call([0.1, 0.1, 1.2, 0.2]), "between 0 and 1"),
    (call([-0.1, 0.1, 0.2, 0.2]), "between 0 and 1"),
    (call([0.1, 0.1, 0.2, 0.2], "image_2"), "unknown source"),
    (call([0.1, 0.1, 0.2, 0.2], 3), "must be a string"),
    (call([0.1, 0.1, 0.2, 0.2], "observation_0"), "unknown source"),
    (call([0.1, 0.1, 0.2, 0.2], "observation_01"), "unknown source"),
    (call([0.0, 0.0, 1.0, 0.001]), "aspect ratio"),
    (call([0.1, 0.1, 0.2, 0.2], extra=1), "exactly the keys"),
    ("<grounding>{\"bbox_2d\": [0.1, 0.1, 0.2, 0.2]}</grounding>", "exactly the keys"),
    ("<grounding>" + "[" * 5000 + "</grounding>", "longer than"),
    ("<answer>" + "x" * 1000 + "</answer>", "longer than"),
    ("a" * (MAX_TURN_CHARS + 1), "longer than"),
])
def test_invalid_calls_give_a_reason(text, reason):
    a = parse_action(text)
    assert a.kind == "invalid" and reason in a.error, a


def test_future_observation_and_pixel_aspect():
    assert "does not exist" in parse_action(call([0, 0, 1, 1], "observation_3"), [(10, 10)] * 3).error
    # relative box 1.0 x 0.5 on a 2000x10 image is 2000 x 5 pixels: refused; on a square image it is fine
    assert parse_action(call([0, 0, 1, 0.5]), [(2000, 10)]).kind == "invalid"
    assert parse_action(call([0, 0, 1, 0.5]), [(100, 100)]).kind == "zoom"


def test_grounding_wins_over_answer_and_last_call_counts():
    text = "<answer>3</answer>" + call([0.1, 0.1, 0.2, 0.2]) + call([0.3, 0.3, 0.4, 0.4])
    a = parse_action(text)
    assert a.kind == "zoom" and a.bbox == [0.3, 0.3, 0.4, 0.4]


def test_random_strings_never_crash():
    rnd = random.Random(0)
    alphabet = list("{}[]\",:.0123456789-eE ") + ["<grounding>", "</grounding>", "<answer>", "</answer>",
                                                   "NaN", "true", "\"bbox_2d\"", "\"source\"", "\"observation_1\""]
    kinds = set()
    for _ in range(400):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 60)))
        a = parse_action(text, image_sizes=[(64, 64), (32, 32)])
        assert isinstance(a, Action) and a.kind in {"zoom", "answer", "invalid", "none"}
        assert (a.kind == "invalid") == (a.error is not None)
        kinds.add(a.kind)
    assert {"invalid", "none"} <= kinds
