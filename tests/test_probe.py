import base64
import hashlib
import io
import json

import numpy as np
import pytest
from PIL import Image

from research import base
import make_probe
from minio3 import world
from minio3.data import read_jsonl


def _digest(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_and_disjoint_splits(tmp_path, probe_dir):
    again = tmp_path / "again"
    make_probe.write_probe(again, n_train=6, n_test=6, seed=3)
    assert _digest(again) == _digest(probe_dir)
    two = tmp_path / "two_workers"     # drawn by two processes: the same files, byte for byte
    make_probe.write_probe(two, n_train=6, n_test=6, seed=3, workers=2)
    assert _digest(two) == _digest(probe_dir)
    train, test = read_jsonl(probe_dir / "train.jsonl"), read_jsonl(probe_dir / "test.jsonl")
    assert not {r["doc_id"] for r in train} & {r["doc_id"] for r in test}
    hashes = _digest(probe_dir / "images")
    train_h = {hashes[r["images"][0][len("images/"):]] for r in train}
    test_h = {hashes[r["images"][0][len("images/"):]] for r in test}
    assert not train_h & test_h
    assert sorted(r["difficulty"] for r in test) == ["easy"] * 2 + ["hard"] * 2 + ["medium"] * 2
    other = tmp_path / "other"
    make_probe.write_probe(other, n_train=0, n_test=2, seed=4)
    assert _digest(other)["images/test_000000.png"] != hashes["test_000000.png"]


def test_records_have_visualprobe_fields_and_the_target_is_where_it_says(probe_dir):
    for r in read_jsonl(probe_dir / "test.jsonl"):
        assert {"images", "problem", "solution", "data_source", "doc_id", "difficulty", "target_bbox"} <= set(r)
        assert r["problem"].endswith("?\n<image>") and r["solution"] in world.GLYPHS
        img = Image.open(probe_dir / r["images"][0]).convert("RGB")
        assert img.size[0] == world.LEVELS[r["difficulty"]]["size"]
        x0, y0, x1, y1 = r["target_bbox"]
        colour = r["problem"].split("on the ")[1].split()[0]
        patch = np.asarray(img.crop((x0, y0, x1, y1))).reshape(-1, 3)
        close = (np.abs(patch.astype(int) - world.COLOURS[colour]).sum(1) < 30).mean()
        assert close > 0.3, close   # the target's colour fills its box


def test_difficulty_knobs_and_readability():
    hard = world.level_stats("hard")
    easy = world.level_stats("easy")
    assert world.LEVELS["hard"]["lookalikes"][0] >= 6
    for s in (easy, world.level_stats("medium"), hard):
        # a glyph's dot is under one pixel in the overview (unreadable), three or more in a crop
        assert s["dot_overview"] < 1.0 and s["dot_crop"] >= 3.0 and s["glyph_crop"] >= 21
    assert hard["object_overview"] < easy["object_overview"]


def test_print_table(probe_dir, capsys):
    make_probe.print_table({"test": read_jsonl(probe_dir / "test.jsonl")})
    out = capsys.readouterr().out
    assert "hard" in out and "glyph@crop" in out


def test_base_samples_answer_what_is_drawn():
    rng = np.random.default_rng(0)
    for task in base.BASE_TASKS:
        img, q, a, meta = base.base_sample(rng, task)
        assert img.width % 28 == 0 and img.height % 28 == 0 and q and a
    img, q, a, meta = base.base_sample(np.random.default_rng(5), "locate")
    box = json.loads(a.split(" at ")[1].rstrip("."))
    w = img.width
    patch = np.asarray(img.crop([int(v * w) for v in box])).reshape(-1, 3).astype(int)
    colour = q.split("the ")[1].split()[0]
    assert (np.abs(patch - world.COLOURS[colour]).sum(1) < 40).any()


# --- converters ------------------------------------------------------------------------------
def _png(colour=(10, 20, 30)):
    b = io.BytesIO()
    Image.new("RGB", (40, 30), colour).save(b, format="PNG")
    return b.getvalue()


def test_visualprobe_converter(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(_png())
    src = tmp_path / "vp.json"
    src.write_text(json.dumps([{"images": ["a.png"], "problem": "<image>\nWhat colour?", "solution": "red",
                                "data_source": "vp", "doc_id": 7}]))
    rows = make_probe.from_visualprobe(src, tmp_path / "imgs", "hard")
    assert rows[0]["solution"] == "red" and rows[0]["difficulty"] == "hard" and rows[0]["doc_id"] == "7"
    assert Image.open(rows[0]["images"][0]).size == (40, 30)
    src.write_text(json.dumps([{"images": ["a.png"], "problem": "x"}]))
    with pytest.raises(ValueError, match="record 0 has no field 'solution'"):
        make_probe.from_visualprobe(src, tmp_path / "imgs", None)


def test_vstar_converter_shuffles_options(tmp_path):
    for cat in ("direct_attributes", "relative_position"):
        (tmp_path / cat).mkdir()
        for i in range(8):
            (tmp_path / cat / f"sa_{i}.jpg").write_bytes(_png())
            opts = ["right one", "wrong a", "wrong b", "wrong c"][: 4 if cat == "direct_attributes" else 2]
            (tmp_path / cat / f"sa_{i}.json").write_text(json.dumps(
                {"target_object": ["x"], "bbox": [[1, 2, 3, 4]], "question": "Q?", "options": opts}))
    rows = make_probe.from_vstar(tmp_path, seed=0)
    assert len(rows) == 16
    letters = [r["solution"] for r in rows]
    assert len(set(letters)) > 1   # not always "A"
    for r in rows:
        assert r["options"]["ABCD".index(r["solution"])] == "right one"
        assert f"({r['solution']}) right one" in r["problem"]
    assert make_probe.from_vstar(tmp_path, seed=0) == rows   # seeded


def test_hrbench_converter(tmp_path):
    b64 = base64.b64encode(_png((1, 2, 3))).decode()
    tsv = tmp_path / "hr.tsv"
    tsv.write_text("index\tquestion\tanswer\tA\tB\tC\tD\tcategory\tcycle_category\timage\n"
                   f"0\tWhat?\tC\ta\tb\tc\td\tsingle\tx\t{b64}\n1\tWhere?\tA\ta\tb\tc\td\tcross\tx\t{b64}\n")
    rows = make_probe.from_hrbench(tsv, tmp_path / "out")
    assert [r["solution"] for r in rows] == ["C", "A"] and rows[1]["difficulty"] == "cross"
    assert Image.open(tmp_path / "out" / rows[0]["images"][0]).getpixel((0, 0)) == (1, 2, 3)
    tsv.write_text("index\tquestion\tanswer\tA\tB\tC\tD\tcategory\timage\n0\tWhat?\tC\ta\tb\tc\td\tsingle\tnot-base64!\n")
    with pytest.raises(ValueError, match=r"hr.tsv:2: column 'image'"):
        make_probe.from_hrbench(tsv, tmp_path / "out2")
