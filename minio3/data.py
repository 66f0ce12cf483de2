"""Files and input checking, shared by every stage: nothing is lost, bad input fails first.

  * `InputError` and `main_cli`: what the user can fix ends a script with one line naming it,
  * argparse types with ranges (`POSITIVE`, `RATE`, `PROBABILITY`, ...),
  * `read_records`: every record of a JSONL file checked before any work (fields, types, lengths,
    images inside their folder, present and decodable), errors naming the file, line and field,
  * `select_levels` and `Questions`: the records of some difficulties, and rl.py's endless seeded
    stream of them (its cursor saved with the checkpoint),
  * `load_image` (scaled down past MAX_IMAGE_PIXELS), JSONL reading and writing,
  * `atomic_path` and `recover`: files and checkpoint folders replaced so that a kill at any
    instant leaves one complete copy.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SPECIAL_TOKEN = re.compile(r"<\|([A-Za-z_]{1,30})\|>")   # <|im_start|>, <|image_pad|>, ...

# ----------------------------------------------------------------------------------------------
# Bad input: one exception for what the user can fix, errors that name the file, line and field.
# ----------------------------------------------------------------------------------------------
class InputError(ValueError):
    """Input the user can fix (a record, a file, a flag, a folder). `main_cli` prints it in one line."""


def main_cli(main):
    """Run a script's main(): an InputError ends it with one line on stderr and exit status 1
    (argparse's own errors about flags exit with 2)."""
    try:
        main()
    except InputError as e:
        raise SystemExit(f"error: {e}") from None


def flag(kind: type, low=None, high=None, low_open: bool = False):
    """An argparse type: a number of `kind` within [low, high] ((low, high] with low_open)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n' if kind is int else ''} "
                                             f"{kind.__name__}") from None
        if not math.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
                or (high is not None and value > high):
            lo = "any" if low is None else f"{'>' if low_open else '>='} {low}"
            raise argparse.ArgumentTypeError(f"{text} is out of range (must be {lo}"
                                             f"{'' if high is None else f' and <= {high}'})")
        return value
    return parse


POSITIVE = flag(int, 1)                       # steps, batch sizes, turns, counts
NONNEGATIVE = flag(int, 0)
RATE = flag(float, 0.0, low_open=True)        # learning rates: > 0
NONNEGATIVE_FLOAT = flag(float, 0.0)          # temperature, weights of extra losses
PROBABILITY = flag(float, 0.0, 1.0, low_open=True)   # top-p: (0, 1]
SHARE = flag(float, 0.0, 1.0)


def names(text: str) -> list[str] | None:
    """--levels "medium,hard", --train-modules "layers.3.mlp": the comma-separated names, empty ones
    dropped; "all" (or nothing) is None: no selection."""
    kept = [w for w in text.split(",") if w]
    return None if kept in ([], ["all"]) else kept


def turn_caps(text: str) -> list[int]:
    """--turn-caps "1,2,4": positive integers."""
    try:
        caps = sorted({int(c) for c in text.split(",")})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not caps or caps[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every turn cap must be at least 1")
    return caps


# ----------------------------------------------------------------------------------------------
# Records: read and validated once, before any work, by every stage.
# ----------------------------------------------------------------------------------------------
MAX_QUESTION_CHARS = 4000              # a longer question is refused (a token cap also applies in render)
MAX_IMAGE_PIXELS = 64_000_000          # larger images are scaled down to this on loading (memory)
_TEXT = (str,)
_ID = (str, int)
RECORD_FIELDS = {   # field: (accepted JSON types, what it must be)
    "images": (list, "a non-empty list of image paths"),
    "problem": (_TEXT, "a string (the question)"),
    "solution": ((str, int, float), "the answer (a string or a number)"),
    "doc_id": (_ID, "a string or integer id"),
    "difficulty": (_TEXT, "a string"),
    "options": (list, "a list of strings"),
    "turns": (list, "a non-empty list of assistant turns (strings, or {\"text\": string, \"learn\": false})"),
    "task": (_TEXT, "a string (a base task)"),
}
QUESTION_FIELDS = ("images", "problem", "solution", "doc_id")


def _check_field(row: dict, key: str, need: bool) -> str | None:
    if key not in row:
        return f"field {key!r} is missing" if need else None
    types, what = RECORD_FIELDS[key]
    value = row[key]
    ok = isinstance(value, types) and not isinstance(value, bool)
    if ok and key in ("images", "turns", "options"):
        items = [t["text"] if key == "turns" and isinstance(t, dict) and "text" in t else t for t in value]
        ok = (bool(value) or key == "options") and all(isinstance(t, str) and t for t in items)
        ok = ok and all(isinstance(t.get("learn", False), bool) for t in value if isinstance(t, dict))
    if not ok:
        return f"field {key!r} must be {what}, got {json.dumps(value)[:60]}"
    if key == "problem" and len(value) > MAX_QUESTION_CHARS:
        return f"field 'problem' has {len(value)} characters (at most {MAX_QUESTION_CHARS})"
    if key == "turns" and any(SPECIAL_TOKEN.search(turn_text(t)) for t in value):
        return "field 'turns' holds a special token such as <|image_pad|> (junk: drop the record)"
    return None


def turn_text(turn) -> str:
    """A trajectory turn's text: a turn is a string, or {"text": ..., "learn": false} for one that is
    replayed without a loss on it (collect.py's slips)."""
    return turn["text"] if isinstance(turn, dict) else turn


def image_path(row: dict, root: str | os.PathLike) -> Path:
    """The record's first image: absolute, or relative to `root` (the data file's folder) and then
    never outside it."""
    name = row["images"][0]
    path = Path(name)
    if path.is_absolute():
        return path
    full = (Path(root) / path).resolve()
    if not full.is_relative_to(Path(root).resolve()):
        raise InputError(f"image path {name!r} leaves the data folder {root}")
    return full


def check_image(path: Path) -> str | None:
    """None if the file is a readable image, else what is wrong with it."""
    if not path.is_file():
        return f"image {path} not found"
    try:
        with Image.open(path) as im:
            im.verify()      # the header and (for PNG) every chunk's checksum: a cut file fails
    except Exception as e:   # PIL raises many kinds
        return f"image {path} cannot be read ({type(e).__name__}: {e})"
    return None


def read_records(path: str | os.PathLike, need=QUESTION_FIELDS, images: bool = True) -> list[dict]:
    """The records of a JSONL file, every one checked before any work is done: the fields in `need`
    present (a tuple in `need`: one of them) and of the right type (optional known fields too), and
    with `images`, each first image inside the data folder (unless absolute), present and
    decodable. Any fault raises an InputError naming the file, the line and the field."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    rows = []
    required = {k for k in need if isinstance(k, str)}
    for lineno, row in _jsonl_lines(path):
        for key in RECORD_FIELDS:
            problem = _check_field(row, key, key in required)
            if problem:
                raise InputError(f"{path}:{lineno}: {problem}")
        for choice in (k for k in need if isinstance(k, tuple)):
            if not any(k in row for k in choice):
                raise InputError(f"{path}:{lineno}: needs one of the fields {', '.join(map(repr, choice))}")
        if images and "images" in row:
            try:
                problem = check_image(image_path(row, path.parent))
            except InputError as e:
                problem = str(e)
            if problem:
                raise InputError(f"{path}:{lineno}: {problem}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no records")
    return rows


def select_levels(rows: list[dict], levels: list[str] | None, path) -> list[dict]:
    """The records whose "difficulty" is one of `levels` (all of them when `levels` is None); an
    InputError names the file and the levels it has when none is left."""
    if not levels:
        return rows
    kept = [r for r in rows if r.get("difficulty") in levels]
    if not kept:
        have = sorted({str(r.get("difficulty")) for r in rows})
        raise InputError(f"{path}: no record has a difficulty in {', '.join(levels)} (it has: {', '.join(have)})")
    return kept


class Questions:
    """An endless stream of the data's questions, reshuffled every epoch (seeded); `cursor` is the
    position in it, saved with the checkpoint so that a resumed run asks the same questions."""

    def __init__(self, rows: list[dict], seed: int, cursor: int = 0):
        self.rows, self.seed, self.cursor = rows, seed, cursor

    def take(self, n: int) -> list[dict]:
        picked = []
        for _ in range(n):
            epoch, k = divmod(self.cursor, len(self.rows))
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
            picked.append(self.rows[int(order[k])])
            self.cursor += 1
        return picked


# ----------------------------------------------------------------------------------------------
# Files: JSONL with line-numbered errors; everything written to a temporary name, then renamed.
# ----------------------------------------------------------------------------------------------
MAX_LINE_BYTES = 64 << 20       # a longer JSONL line (one record) is refused
MAX_TEXT_BYTES = 256 << 20      # a longer JSON, TSV, prompts or config file is refused
_UTF16 = (b"\xff\xfe", b"\xfe\xff")
_BOM = b"\xef\xbb\xbf"
TO_RECORDS = ("the official VisualProbe files are JSON lists: convert one with "
              "python make_probe.py --from visualprobe FILE.json --images DIR --out DIR")


def decode_text(data: bytes, where: str, offset: int = 0, line: int = 1) -> str:
    """`data` (bytes of a user's file) as text: UTF-8, a leading BOM dropped; anything else is an
    InputError naming the file and line (`line`: that of data's first byte; `offset`: its place in
    the file) and saying what the bytes look like."""
    if data.startswith(_UTF16):
        raise InputError(f"{where}:{line}: UTF-16 text; save the file as UTF-8")
    if data.startswith(_BOM):
        data = data[len(_BOM):]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        at = line + data.count(b"\n", 0, e.start)
        raise InputError(f"{where}:{at}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {offset + e.start}): "
                         "is it the right file? A text file must be saved as UTF-8") from None
    if "\x00" in text:
        at = line + text.count("\n", 0, text.index("\x00"))
        raise InputError(f"{where}:{at}: a NUL byte: this is not a text file")
    return text


def read_text(path: str | os.PathLike, limit: int | None = None) -> str:
    """A user's whole text file (JSON, TSV, prompts, a config), checked as `decode_text` does and no
    larger than `limit` bytes (MAX_TEXT_BYTES)."""
    path, limit = Path(path), limit or MAX_TEXT_BYTES
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    size = path.stat().st_size
    if size > limit:
        raise InputError(f"{path}: {size:,} bytes, more than the {limit:,} this file may have: is it the right file?")
    return decode_text(path.read_bytes(), str(path))


def parse_json(text: str, where: str, line: int = 1):
    """JSON text to a value, or an InputError naming the place (line and column) of the fault."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"{where}:{line + e.lineno - 1}: not valid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise InputError(f"{where}:{line}: JSON nested too deeply") from None


def load_json(path: str | os.PathLike, expect: type | tuple[type, ...] = dict, hint: str = ""):
    """A user's JSON file whose top level must be `expect` (dict: an object, list: a list), or an
    InputError naming the file, what it holds instead and, with `hint`, what would fix it."""
    value = parse_json(read_text(path), str(path))
    if not isinstance(value, expect):
        want = " or ".join({"dict": "an object", "list": "a list"}.get(t.__name__, t.__name__)
                           for t in (expect if isinstance(expect, tuple) else (expect,)))
        raise InputError(f"{path}: expected JSON {want}, got {_json_kind(value)}" + (f" ({hint})" if hint else ""))
    return value


def _json_kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "true/false", type(None): "null"}.get(
        type(value), "a number")


def _jsonl_lines(path: str | os.PathLike):
    """(line number, record) for each non-blank line of a JSONL file; every fault is an InputError
    naming the file and line: bytes that are not UTF-8, a line over MAX_LINE_BYTES, JSON that does
    not parse, a line that is not an object (a JSON list: what to run instead)."""
    offset = 0
    with open(path, "rb") as f:
        for lineno in itertools.count(1):
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            if len(raw) > MAX_LINE_BYTES:
                raise InputError(f"{path}:{lineno}: a line of more than {MAX_LINE_BYTES:,} bytes: is it the right file?")
            line = decode_text(raw, str(path), offset, lineno).strip()
            offset += len(raw)
            if not line:
                continue
            if lineno == 1 and line.startswith("["):
                raise InputError(f"{path}:1: a JSON list, not one JSON object a line (JSONL): {TO_RECORDS}")
            row = parse_json(line, str(path), lineno)
            if not isinstance(row, dict):
                hint = f": {TO_RECORDS}" if lineno == 1 and isinstance(row, list) else ""
                raise InputError(f"{path}:{lineno}: expected a JSON object a line, got {_json_kind(row)}{hint}")
            yield lineno, row


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    return [row for _, row in _jsonl_lines(path)]


def load_image(row: dict, root: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The record's (first) image as RGB, scaled down if it has more than `max_pixels` pixels."""
    where = f"record {row.get('doc_id', '?')}"
    if not isinstance(row.get("images"), list) or not row["images"] or not isinstance(row["images"][0], str):
        raise InputError(f"{where}: field 'images' must be a non-empty list of paths")
    path = image_path(row, root)
    if not path.is_file():
        raise InputError(f"{where}: image {path} not found")
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                scale = math.sqrt(max_pixels / (im.width * im.height))
                im.draft("RGB", (int(im.width * scale), int(im.height * scale)))   # JPEG: decode smaller
                size = (max(1, int(im.width * scale)), max(1, int(im.height * scale)))
                small = im.resize(size, Image.BICUBIC)
                return small if small.mode == "RGB" else small.convert("RGB")
            return im.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"{where}: image {path} cannot be read ({type(e).__name__}: {e})") from None


def _leftovers(path: Path):
    """Temporary and old copies beside `path` that a killed process left: name.tmp<pid>, name.old<pid>."""
    for p in path.parent.glob(path.name + ".*"):
        m = re.fullmatch(re.escape(path.name) + r"\.(tmp|old)(\d+)", p.name)
        if m:
            yield p, m.group(1), int(m.group(2))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


COMPLETE = ".complete"   # written last into a folder being saved: the folder is whole


def recover(path: str | os.PathLike) -> None:
    """Finish or undo a folder swap that a kill interrupted, and clean what killed processes left.

    `atomic_path` swaps a folder in three steps (move the old one aside, move the new one in,
    delete the old one); at every instant one complete copy exists. If `path` is missing, the
    newest complete new copy (name.tmp<pid> holding the .complete mark) takes its place, else the
    old one (name.old<pid>). Leftovers of processes that are no longer running are removed."""
    path = Path(path)
    left = [(p, kind, pid) for p, kind, pid in _leftovers(path) if not _alive(pid)]
    if not path.exists():
        done = [p for p, kind, _ in left if kind == "tmp" and (p / COMPLETE).exists()]
        old = [p for p, kind, _ in left if kind == "old"]
        pick = max(done, key=lambda p: p.stat().st_mtime) if done else (old[0] if old else None)
        if pick is not None:
            os.replace(pick, path)
            print(f"recovered {path} from {pick.name} (a save was interrupted)")
    for p, _, _ in left:
        if p.exists():
            shutil.rmtree(p) if p.is_dir() else p.unlink()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; on success it replaces `path` (file or folder).
    A file is replaced by one atomic rename; a folder by the three steps `recover` can finish."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        raise
    if tmp.is_dir():
        (tmp / COMPLETE).touch()
    if tmp.is_dir() and path.exists():
        old = path.with_name(path.name + f".old{os.getpid()}")
        _rename(path, old)
        _rename(tmp, path)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        _rename(tmp, path)


def _rename(src: Path, dst: Path):
    os.replace(src, dst)     # (one place, so that a test can kill the process between two renames)


def write_jsonl(path: str | os.PathLike, rows) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def append_jsonl(path: str | os.PathLike, row: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
