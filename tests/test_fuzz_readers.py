"""Every reader of a user's file, fuzzed: random bytes, valid files with bytes flipped, cut short, in
UTF-16 or Latin-1, with a BOM, with NUL bytes, with an overlong line, nested too deeply. Each case
must end in the project's one-line InputError (naming the file) or in a clean read, never in another
exception, and a refused file must leave nothing written. Seeded: FUZZ_SEED=n picks other cases
(the seed is in every failure's message)."""
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch

import eval as ev
import make_probe
from minio3 import data, model, protocol, sharegpt
from minio3.data import InputError

SEED = int(os.environ.get("FUZZ_SEED", "0"))
CASES = 14          # fuzzed versions of each valid file (the fixed kinds below come on top)


def mutations(valid: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """(name, bytes): the fixed kinds of damage, then random ones, all from one valid file."""
    text = valid.decode("utf-8")
    out = [("random bytes", bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))),
           ("empty", b""),
           ("utf-16", text.encode("utf-16")),
           ("utf-16 without BOM", text.encode("utf-16-le")),
           ("latin-1", (text + "é ÿ").encode("latin-1", errors="replace")),
           ("BOM", b"\xef\xbb\xbf" + valid),
           ("NUL bytes", valid[: len(valid) // 2] + b"\x00\x00" + valid[len(valid) // 2:]),
           ("overlong line", b'{"problem": "' + b"x" * (3 << 20) + b'"}\n'),
           ("nested", b"[" * 200_000 + b"]" * 200_000),
           ("nested object", b'{"a": ' * 50_000 + b"1" + b"}" * 50_000),
           ("a JSON list", json.dumps([text[:40], 1, 2]).encode()),
           ("a number", b"42\n")]
    for k in range(CASES):
        b = bytearray(valid)
        kind = rng.choice(["flip", "cut", "insert", "delete"])
        if kind == "flip":
            for _ in range(rng.randrange(1, 9)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif kind == "cut":
            b = b[: rng.randrange(len(b))]
        elif kind == "insert":
            at = rng.randrange(len(b) + 1)
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            at = rng.randrange(len(b))
            del b[at:at + rng.randrange(1, 32)]
        out.append((f"{kind} {k}", bytes(b)))
    return out


def listing(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


def fuzz(reader, target: Path, valid: bytes, watch: Path, tag: str, may_write: bool = False):
    """Write each mutation of `valid` to `target`, call reader(); only InputError (naming `target`'s
    folder or file) or success may come out, and a refused file may not leave anything in `watch`."""
    rng = random.Random(f"{SEED} {tag}")
    clean = 0
    for name, damaged in mutations(valid, rng):
        target.write_bytes(damaged)
        before = listing(watch)
        try:
            reader()
            clean += 1
        except InputError as e:
            message = str(e)
            assert "\n" not in message, (SEED, tag, name, message)
            assert target.name in message or target.parent.name in message, (SEED, tag, name, message)
            after = listing(watch)
            assert after == before, (SEED, tag, name, "a refused file left something written")
        except Exception as e:   # noqa: BLE001 - the point of the test
            pytest.fail(f"FUZZ_SEED={SEED} {tag}, {name}: {type(e).__name__}: {str(e)[:300]}")
        if not may_write:
            assert listing(watch) == before, (SEED, tag, name, "a reader wrote something")
    return clean


@pytest.fixture(autouse=True)
def small_caps(monkeypatch):
    """Caps of a few MB instead of hundreds, so that overlong lines and files stay cheap to make."""
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 2 << 20)
    monkeypatch.setattr(data, "MAX_TEXT_BYTES", 2 << 20)


def _folder_with_images(probe_dir: Path, tmp: Path) -> Path:
    (tmp / "d").mkdir()
    os.symlink(probe_dir / "images", tmp / "d" / "images")
    return tmp / "d"


def test_records_jsonl(probe_dir, tmp_path):
    folder = _folder_with_images(probe_dir, tmp_path)
    valid = (probe_dir / "test.jsonl").read_bytes()
    target = folder / "test.jsonl"
    fuzz(lambda: data.read_records(target), target, valid, tmp_path, "records")
    fuzz(lambda: data.read_records(target, ("images", "problem", "turns")), target, valid, tmp_path, "trajectories")


def test_a_json_list_given_as_records_names_the_converter(tmp_path):
    f = tmp_path / "VisualProbe_Hard.json"
    f.write_text(json.dumps([{"images": ["a.png"], "problem": "q", "solution": "a"}], indent=1))
    with pytest.raises(InputError, match=r"VisualProbe_Hard.json:1: a JSON list.*make_probe.py --from visualprobe"):
        data.read_records(f)
    f.write_text(json.dumps([{"images": ["a.png"], "problem": "q", "solution": "a"}]))
    with pytest.raises(InputError, match=r"make_probe.py --from visualprobe"):
        data.read_records(f)


def test_bad_bytes_are_named_by_line(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_bytes(b'{"a": 1}\n{"b": "\xff"}\n')
    with pytest.raises(InputError, match=r"r.jsonl:2: not UTF-8 text \(byte 0xff at offset 16\)"):
        data.read_jsonl(f)
    f.write_bytes('{"a": 1}\n'.encode("utf-16"))
    with pytest.raises(InputError, match=r"r.jsonl:1: UTF-16 text; save the file as UTF-8"):
        data.read_jsonl(f)
    f.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n')          # a BOM is dropped: a clean read
    assert data.read_jsonl(f) == [{"a": 1}]


def test_sharegpt(probe_dir, tmp_path):
    folder = _folder_with_images(probe_dir, tmp_path)
    image = sorted((probe_dir / "images").iterdir())[0].name
    rec = {"conversations": [{"from": "human", "value": "<image>What is on the red circle?"},
                             {"from": "gpt", "value": "<think>It is a 7.</think>\n<answer>7</answer>"}],
           "images": [f"images/{image}"]}
    target = folder / "cs.json"
    assert fuzz(lambda: sharegpt.read(target), target, json.dumps([rec, rec]).encode(), tmp_path, "sharegpt") >= 0


def test_prompts_and_judge_files(tmp_path):
    prompts = {"system": "You search pictures.", "error": "The crop failed: try again.",
               "observation": "Observation {observation} after action {action}:\n"
                              "<|vision_start|><|image_pad|><|vision_end|>"}
    target = tmp_path / "prompts.json"
    fuzz(lambda: protocol.load_prompts(target), target, json.dumps(prompts).encode(), tmp_path, "prompts")
    target = tmp_path / "judge.json"
    judge = {"system": "You grade.", "query": "Q {question} R {reference} A {answer}"}
    fuzz(lambda: protocol.load_judge_prompt(target), target, json.dumps(judge).encode(), tmp_path, "judge")
    target = tmp_path / "general_qa_tool.py"
    py = 'SYSTEM_PROMPT = "You grade."\nQUERY_PROMPT = "Q {question} R {ground_truth} A {prediction}"\n'
    fuzz(lambda: protocol.load_judge_prompt(target), target, py.encode(), tmp_path, "judge.py")


def test_benchmark_converters(probe_dir, tmp_path):
    image = sorted((probe_dir / "images").iterdir())[0]
    vp = [{"images": [image.name], "problem": "<image>\nWhat is it?", "solution": "7", "doc_id": 3}]
    target = tmp_path / "VisualProbe_Hard.json"
    fuzz(lambda: make_probe.from_visualprobe(target, probe_dir / "images", "hard"), target,
         json.dumps(vp).encode(), tmp_path, "visualprobe")
    vstar = tmp_path / "vstar" / "direct_attributes"
    vstar.mkdir(parents=True)
    shutil.copy(image, vstar / "sa_1.png")
    target = vstar / "sa_1.json"
    fuzz(lambda: make_probe.from_vstar(tmp_path / "vstar", 0), target,
         json.dumps({"question": "What colour is the cup?", "options": ["red", "blue"]}).encode(), tmp_path, "vstar")
    import base64
    b64 = base64.b64encode(image.read_bytes()).decode()
    tsv = ("index\tquestion\tanswer\tA\tB\tC\tD\tcategory\timage\n"
           f"1\tWhat is it?\tA\tred\tblue\tgreen\tyellow\tsingle\t{b64}\n")
    target = tmp_path / "hr.tsv"
    fuzz(lambda: make_probe.from_hrbench(target, tmp_path / "hr_out"), target, tsv.encode(), tmp_path, "hrbench",
         may_write=True)


def test_checkpoint_config_and_tokenizer_files(tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(model.TINY_BASE, ck, ignore=shutil.ignore_patterns("model.safetensors"))
    os.symlink(model.TINY_BASE / "model.safetensors", ck / "model.safetensors")
    for name in ("config.json", "tokenizer_config.json", "preprocessor_config.json", "tokenizer.json"):
        valid = (model.TINY_BASE / name).read_bytes()
        target = ck / name
        fuzz(lambda: model.resolve_checkpoint(str(ck)), target, valid, tmp_path, f"checkpoint {name}")
        target.write_bytes(valid)
    # a few damaged configs all the way through loading: transformers' own errors become one line
    rng = random.Random(f"{SEED} load")
    valid = (model.TINY_BASE / "config.json").read_bytes()
    for name, damaged in mutations(valid, rng)[-4:]:
        (ck / "config.json").write_bytes(damaged)
        try:
            model.load(str(ck))
        except InputError as e:
            assert "ck" in str(e), (SEED, name, str(e))
        except Exception as e:   # noqa: BLE001
            pytest.fail(f"FUZZ_SEED={SEED} load, {name}: {type(e).__name__}: {str(e)[:300]}")


def test_trainer_state(tmp_path):
    target = tmp_path / "trainer_state.pt"
    torch.save({"step": 3, "torch_rng": torch.get_rng_state(), "args": {"lr": 1e-3, "data": ["a.jsonl"]}}, target)
    valid = target.read_bytes()
    rng = random.Random(f"{SEED} state")
    for name, damaged in [("random", bytes(rng.randrange(256) for _ in range(300))), ("cut", valid[: len(valid) // 2]),
                          ("flipped", valid[:40] + bytes([valid[40] ^ 0xFF]) + valid[41:]), ("empty", b"")]:
        target.write_bytes(damaged)
        try:
            model.read_state(target)
        except InputError as e:
            assert "trainer_state.pt" in str(e) and "--overwrite" in str(e)
        except Exception as e:   # noqa: BLE001
            pytest.fail(f"FUZZ_SEED={SEED} trainer state, {name}: {type(e).__name__}: {e}")
    torch.save([1, 2], target)
    with pytest.raises(InputError, match="not a trainer state"):
        model.read_state(target)


def test_results_json_of_a_comparison(tmp_path):
    (tmp_path / "a").mkdir()
    target = tmp_path / "a" / "results.json"
    valid = json.dumps({"model": "m", "turn_caps": [1], "by_turn_cap": {"1": 0.5}, "n_trajectories": 2,
                        "by_turn_cap_difficulty": {"hard": {"1": 0.5}}, "mean_turns": 1.0, "zoom_rate": 0.5}).encode()
    fuzz(lambda: ev.compare([str(tmp_path / "a")], tmp_path / "a" / "cmp.png"), target, valid, tmp_path / "a",
         "results", may_write=True)
