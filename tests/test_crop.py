import random

from PIL import Image

from minio3.conversation import Budget, Episode, parse_action, pixel_box, image_token_count


def test_pixel_box_and_min_side():
    assert pixel_box([0.25, 0.5, 0.5, 0.75], 400, 200) == (100, 100, 200, 150)
    x0, y0, x1, y1 = pixel_box([0.5, 0.5, 0.501, 0.501], 1000, 1000, min_side=28)
    assert (x1 - x0, y1 - y0) == (28, 28) and x0 <= 500 <= x1
    assert pixel_box([0.999, 0.0, 1.0, 0.001], 1000, 1000, min_side=28) == (972, 0, 1000, 28)   # kept inside


def test_budget_matches_qwen_smart_resize():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    rnd = random.Random(0)
    for budget in (Budget(112 * 112, 230 * 230), Budget(40_000, 2_000_000)):
        for _ in range(300):
            w, h = rnd.randint(28, 4000), rnd.randint(28, 4000)
            if max(w, h) / min(w, h) > 200:
                continue
            rh, rw = smart_resize(h, w, factor=28, min_pixels=budget.min_pixels, max_pixels=budget.max_pixels)
            assert budget.size(w, h) == (rw, rh)
            assert rw % 28 == 0 and rh % 28 == 0
            if max(w, h) / min(w, h) < 20:   # (Qwen's rule may pass max_pixels when a side is clamped to 28)
                assert budget.min_pixels <= rw * rh <= budget.max_pixels


def test_observation_of_observation_is_cut_from_full_resolution():
    img = Image.new("RGB", (1000, 800))
    for x in range(0, 1000, 10):   # a pattern so crops can be compared
        img.paste((x % 256, (3 * x) % 256, 7), (x, 0, x + 10, 800))
    ep = Episode(img, Budget(112 * 112, 230 * 230))
    text, shown = ep.apply(parse_action('<grounding>{"bbox_2d": [0.5, 0.5, 1.0, 1.0], "source": "original_image"}</grounding>'))
    assert "Observation 1" in text and "Action 0" in text and shown.size == ep.budget.size(500, 400)
    a = ep.parse('<grounding>{"bbox_2d": [0.0, 0.0, 0.5, 0.5], "source": "observation_1"}</grounding>')
    text, shown = ep.apply(a)
    assert "Observation 2" in text and "Action 1" in text
    assert ep.boxes[2] == (500, 400, 750, 600)
    assert ep.images[2].tobytes() == img.crop((500, 400, 750, 600)).tobytes()   # full resolution
    assert ep.crops[1]["pixel_box"] == [500, 400, 750, 600] and ep.crops[1]["source"] == "observation_1"
    assert image_token_count(shown) == (shown.width // 28) * (shown.height // 28)


def test_invalid_call_gives_error_turn_and_counts():
    ep = Episode(Image.new("RGB", (300, 300)), Budget(112 * 112, 230 * 230))
    text, image = ep.apply(ep.parse('<grounding>{"bbox_2d": [0.5, 0.1, 0.2, 0.3], "source": "original_image"}</grounding>'))
    assert image is None and "x0 < x1" in text and ep.errors == 1 and len(ep.images) == 1
