"""Stage 0: synthetic Visual-Probe-style data, and converters of the real benchmarks' files.

    python make_probe.py                        # the tiny run's: 2400 train, 300 test -> runs/tiny/probe
    python make_probe.py --out runs/heldout --n-train 0 --n-test 300 --seed 2   # another test split
    python make_probe.py --from visualprobe FILE.json --images DIR --out data/vp_hard
    python make_probe.py --from vstar DIR --out data/vstar
    python make_probe.py --from hrbench FILE.tsv --out data/hr4k

The pictures and questions are drawn by minio3/world.py; this stage writes splits of
them (each sample a pure function of seed, split and index) and converts the real benchmarks.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import multiprocessing
import os
import re
import time
from pathlib import Path

import numpy as np
from PIL import Image

from minio3.data import MAX_QUESTION_CHARS, InputError, NONNEGATIVE, atomic_path, load_json, main_cli, write_jsonl
from minio3.world import LEVELS, SPLIT_IDS, level_stats, probe_sample


# ----------------------------------------------------------------------------------------------
# Writing splits.
# ----------------------------------------------------------------------------------------------

def write_probe(out: Path, n_train: int, n_test: int, seed: int, workers: int = 1) -> dict:
    """Both splits, each sample a pure function of (seed, split, index), so `workers` processes
    draw them in any order and the files are the same bytes."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    summary = {}
    for split, n in (("train", n_train), ("test", n_test)):
        jobs = [(out, split, i, seed) for i in range(n)]
        if workers > 1 and n > 1:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                rows = pool.map(_write_sample, jobs, chunksize=16)
        else:
            rows = [_write_sample(job) for job in jobs]
        write_jsonl(out / f"{split}.jsonl", rows)
        summary[split] = rows
    return summary


def _write_sample(job: tuple[Path, str, int, int]) -> dict:
    out, split, i, seed = job
    level = list(LEVELS)[i % 3]    # test is balanced; train cycles the levels too
    rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
    img, fields, placed = probe_sample(rng, level)
    name = f"images/{split}_{i:06d}.png"
    with atomic_path(out / name) as tmp:
        img.save(tmp, format="PNG")
    # hidden fields, for the failure analysis only (no searcher reads them): every object
    objects = [{k: o[k] for k in ("colour", "shape", "glyph", "box")} for o in placed]
    return {"images": [name], **{k: fields[k] for k in ("problem", "solution")},
            "data_source": "synthetic_probe", "doc_id": f"{split}-{seed}-{i:06d}", **fields, "objects": objects}


def print_table(summary: dict):
    print(f"{'split':6} {'level':7} {'n':>4} {'image':>6} {'object':>6} {'obj@overview':>12} "
          f"{'glyph@overview':>14} {'glyph@crop':>10} {'look-alikes':>11} {'distractors':>11}")
    for split, rows in summary.items():
        for level in LEVELS:
            sel = [r for r in rows if r["difficulty"] == level]
            if not sel:
                continue
            s = level_stats(level)
            print(f"{split:6} {level:7} {len(sel):4d} {s['image']:6d} {s['object']:6d} "
                  f"{s['object_overview']:10.1f}px {s['glyph_overview']:12.1f}px {s['glyph_crop']:8.1f}px "
                  f"{np.mean([r['n_lookalikes'] for r in sel]):11.1f} "
                  f"{np.mean([r['n_distractors'] for r in sel]):11.1f}")


# ----------------------------------------------------------------------------------------------
# Converters of real benchmark files into the same records.
# ----------------------------------------------------------------------------------------------
def from_visualprobe(path: Path, images: Path, difficulty: str | None) -> list[dict]:
    """VisualProbe's JSON list of {images, problem, solution, ...} as records, every one checked."""
    data = load_json(path, list, "VisualProbe's files are JSON lists; a .jsonl file of records needs no converting")
    rows = []
    for i, r in enumerate(data):
        for key in ("images", "problem", "solution"):
            if not isinstance(r, dict) or key not in r:
                raise InputError(f"{path}: record {i} has no field {key!r}")
        paths = r["images"]
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise InputError(f"{path}: record {i}: field 'images' must be a non-empty list of paths")
        if not isinstance(r["problem"], str) or not isinstance(r["solution"], (str, int, float)):
            raise InputError(f"{path}: record {i}: 'problem' must be text and 'solution' text or a number")
        if len(r["problem"]) > MAX_QUESTION_CHARS:
            raise InputError(f"{path}: record {i}: 'problem' has {len(r['problem'])} characters "
                             f"(at most {MAX_QUESTION_CHARS})")
        try:
            paths = [(images / p).resolve() for p in paths]
        except (ValueError, OSError) as e:     # a NUL byte in a path, say
            raise InputError(f"{path}: record {i}: an image path cannot be a file name ({e})") from None
        if not all(p.is_relative_to(images.resolve()) for p in paths):
            raise InputError(f"{path}: record {i}: an image path leaves the image folder {images}")
        rows.append({"images": [str(p) for p in paths], "problem": r["problem"],
                     "solution": str(r["solution"]), "data_source": str(r.get("data_source", "visualprobe")),
                     "doc_id": str(r.get("doc_id", i)),
                     "difficulty": str(r.get("difficulty", difficulty or "unknown"))})
    return rows


def _mc_problem(question: str, options: list[str]) -> str:
    letters = "ABCDEFGH"
    lines = "\n".join(f"({letters[i]}) {o}" for i, o in enumerate(options))
    return f"<image>\n{question}\n{lines}\nAnswer with the option's letter from the given choices directly."


def from_vstar(root: Path, seed: int) -> list[dict]:
    rows = []
    for category in ("direct_attributes", "relative_position"):
        folder = root / category
        if not folder.is_dir():
            continue
        for meta in sorted(folder.glob("*.json")):
            m = load_json(meta, dict, "a V* annotation is a JSON object with question and options")
            question, options = m.get("question"), m.get("options")
            if not isinstance(question, str) or not isinstance(options, list) or not 2 <= len(options) <= 8 \
                    or not all(isinstance(o, str) for o in options):
                raise InputError(f"{meta}: not a V* annotation (a 'question' text and 2-8 'options' texts)")
            image = next((p for p in folder.glob(meta.stem + ".*") if p.suffix.lower() != ".json"), None)
            if image is None:
                raise InputError(f"{meta}: no image beside it")
            # the raw files always list the right option first: shuffle with a fixed seed
            order = np.random.default_rng([seed, len(rows)]).permutation(len(options))
            shuffled = [options[j] for j in order]
            rows.append({"images": [str(image.resolve())], "problem": _mc_problem(question, shuffled),
                         "solution": "ABCDEFGH"[int(np.where(order == 0)[0][0])], "options": shuffled,
                         "data_source": "vstar", "doc_id": f"{category}/{meta.stem}", "difficulty": category})
    if not rows:
        raise InputError(f"{root}: no direct_attributes/ or relative_position/ annotations found")
    return rows


HR_COLUMNS = {"index", "question", "answer", "A", "B", "C", "D", "category", "image"}


def _hrbench_rows(path: Path):
    """(line, row) of HR-Bench's TSV, each row checked: UTF-8 text, the columns, a base64 image.
    Yields the decoded image bytes and their format too."""
    import csv
    csv.field_size_limit(1 << 30)
    with open(path, "rb") as f:
        if f.read(2) in (b"\xff\xfe", b"\xfe\xff"):
            raise InputError(f"{path}:1: UTF-16 text; save the file as UTF-8")
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        try:
            if not HR_COLUMNS <= set(reader.fieldnames or []):
                raise InputError(f"{path}:1: missing columns {sorted(HR_COLUMNS - set(reader.fieldnames or []))} "
                                 "(HR-Bench's TSV: index, question, A-D, answer, category, image)")
            for r in reader:
                line = reader.line_num
                if any(v is None for v in r.values()) or None in r:
                    raise InputError(f"{path}:{line}: a row with {'too few' if None in r.values() else 'too many'} "
                                     "columns")
                try:
                    data = base64.b64decode(r["image"], validate=True)
                    with Image.open(io.BytesIO(data)) as img:
                        img.load()
                        kind = (img.format or "png").lower()
                except Exception as e:   # PIL and base64 raise many kinds
                    raise InputError(f"{path}:{line}: column 'image' is not a base64 image ({e})") from None
                yield line, r, data, kind
        except UnicodeDecodeError as e:
            raise InputError(f"{path}:{reader.line_num + 1}: not UTF-8 text ({e.reason}): save the file as UTF-8") from None
        except csv.Error as e:
            raise InputError(f"{path}:{reader.line_num}: not a readable TSV row ({e})") from None


def from_hrbench(path: Path, out: Path) -> list[dict]:
    """HR-Bench's TSV (base64 images inside) as records and image files in out/images/. Every row is
    checked before the first file is written; then the images are decoded again and written."""
    n = sum(1 for _ in _hrbench_rows(path))
    if not n:
        raise InputError(f"{path}: no rows")
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for _, r, data, kind in _hrbench_rows(path):
        # the index names a file: only letters, digits, - and _ (a row cannot write outside --out)
        safe = re.sub(r"[^A-Za-z0-9_-]", "_", str(r["index"]))[:80]
        name = f"images/hr_{safe}.{kind}"
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(data)
        options = [r[k] for k in "ABCD"]
        rows.append({"images": [name], "problem": _mc_problem(r["question"], options),
                     "solution": r["answer"].strip(), "options": options, "data_source": "hrbench",
                     "doc_id": str(r["index"]), "difficulty": r["category"],
                     "cycle_category": r.get("cycle_category") or ""})
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny/probe", help="folder for *.jsonl and images/")
    syn = ap.add_argument_group("synthetic probe (default)")
    syn.add_argument("--n-train", type=NONNEGATIVE, default=2400, help="training questions (a third a level)")
    syn.add_argument("--n-test", type=NONNEGATIVE, default=300, help="test questions (a third a level)")
    syn.add_argument("--seed", type=int, default=1, help="also shuffles V* options")
    syn.add_argument("--workers", type=NONNEGATIVE, default=os.cpu_count() or 1,
                     help="processes drawing the pictures (the files do not depend on it)")
    conv = ap.add_argument_group("converting a benchmark (writes <out>/test.jsonl)")
    conv.add_argument("--from", dest="source", choices=["visualprobe", "vstar", "hrbench"])
    conv.add_argument("input", nargs="?", help="the benchmark file or folder to convert (with --from)")
    conv.add_argument("--images", help="VisualProbe's image folder")
    conv.add_argument("--difficulty", help="VisualProbe split name to record (easy/medium/hard)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    out = Path(args.out)
    t0 = time.time()
    if not args.source:
        print_table(write_probe(out, args.n_train, args.n_test, args.seed, args.workers))
        print(f"wrote {out} in {time.time() - t0:.1f}s")
        return
    if not args.input:
        raise InputError(f"--from {args.source} needs the input file or folder")
    src = Path(args.input)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if args.source == "visualprobe":
        rows = from_visualprobe(src, Path(args.images or src.parent), args.difficulty)
    elif args.source == "vstar":
        rows = from_vstar(src, args.seed)
    else:
        rows = from_hrbench(src, out)
    write_jsonl(out / "test.jsonl", rows)
    print(f"wrote {len(rows)} records to {out / 'test.jsonl'} in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main_cli(main)
