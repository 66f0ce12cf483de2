"""The conversation's wording and rules as one swappable object: `Protocol`.

Mini-o3's tags, JSON keys and turn structure are fixed (common.py). What can change is:
  * the texts: the system prompt, the user turn that returns a crop, the user turn after an error;
  * the numbering in the observation turn: `images` (ours: Observation i is the i-th image, so it is
    the name `observation_i` refers to) or `turns` (the official rollout: Observation t+1 after
    Action t, also after an error turn, so after an error the two differ);
  * the parser: `strict` (common.parse_action: JSON only, refused when out of range) or `official`
    (the official rollout's reading: the first box-like list after "bbox_2d", coordinates cut to
    whole pixels and clamped to the image, a 200:1 aspect limit; parsed, never evaluated);
  * the answer: `last` (the final turn's last <answer>) or `first` (the first <answer> of the whole
    trajectory, as the official reward extracts it).

`load_prompts(path)` reads the texts from a JSON file of ours, or from the official repository's
constants file (or the repository folder) read as Python source with `ast`: string constants are
picked out by name, nothing in the file is imported or run. `PRESETS` holds the budgets of a whole
setup (`--preset mini-o3`); `add_protocol_args` / `protocol_from_args` put both on a script's CLI.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

from minio3.data import SPECIAL_TOKEN, InputError, load_json, read_text

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"  # one image; the pad is expanded per image

# ----------------------------------------------------------------------------------------------
# This project's own texts. {action}, {observation} and {reason} are filled in by plain replacement
# (a template may hold other braces, e.g. JSON), never by str.format.
# ----------------------------------------------------------------------------------------------
SYSTEM_PROMPT = (
    "You are a visual search assistant. Think step by step inside <think> and </think>. "
    "To look at a region of an image more closely, write "
    "<grounding>{\"bbox_2d\": [x0, y0, x1, y1], \"source\": \"original_image\"}</grounding>, "
    "where (x0, y0) is the top-left and (x1, y1) the bottom-right corner of the region in relative "
    "coordinates (the image is 1.0 wide and 1.0 high), and source is \"original_image\" or "
    "\"observation_i\" for the i-th zoom-in image. Once the final answer is confirmed, "
    "put it inside <answer> and </answer>."
)
OBSERVATION = ("After the above Action {action}, here is the zoom-in image (Observation {observation}):\n"
               + IMAGE + ".\nContinue your reasoning inside <think> and </think>. If needed, zoom in "
               "again on the original image or any observation with <grounding> and </grounding>; once "
               "the answer is confirmed, put it inside <answer> and </answer>.")
ERROR = ("The zoom-in request failed. Error: {reason}.\n"
         "Please look at the error and continue your reasoning inside <think> and </think>.")
TEXT_FIELDS = ("system", "observation", "error")

# The official repository: the constants' names, and where the error turn's first line is written
OFFICIAL_NAMES = {"system": "TOOL_CROP_SYSTEM_PROMPT", "observation": "TOOL_CALL_CROP_MULTI_TRUN_PROMPT",
                  "error": "ERROR_INFO_MULTI_TURN_PROMPT"}
OFFICIAL_FIELDS = {"{action_turn}": "{action}", "{observation_turn}": "{observation}"}
OFFICIAL_CONSTANTS = Path("verl/trainer/constants.py")
OFFICIAL_ENGINE = Path("verl/workers/rollout/vllm_rollout/vllm_async_engine.py")
OFFICIAL_ERROR_NAME = "error_info"   # the f-string in the engine that carries the exception's text


@dataclass(frozen=True)
class Protocol:
    system: str = SYSTEM_PROMPT
    observation: str = OBSERVATION
    error: str = ERROR
    numbering: str = "images"    # "images" | "turns"
    parser: str = "strict"       # "strict" | "official"
    answer: str = "last"         # "last" | "first"

    def observation_text(self, action_index: int, image_index: int) -> str:
        """The user turn that returns a crop: `action_index` counts the tool calls before this one
        (0-based), `image_index` is the new image's index (observation_i)."""
        number = image_index if self.numbering == "images" else action_index + 1
        return self.observation.replace("{action}", str(action_index)).replace("{observation}", str(number))

    def error_text(self, reason: str) -> str:
        """The user turn that answers an invalid tool call (the reason may quote the model's text)."""
        return self.error.replace("{reason}", neutralise(reason))


DEFAULT = Protocol()


def neutralise(text: str) -> str:
    """User text (a question, an error that quotes the model) with every special-token string such
    as <|im_start|> or <|image_pad|> broken up ("< |im_start|>"), so it is read as plain text: it
    can never open a turn or claim an image."""
    return SPECIAL_TOKEN.sub(lambda m: "< |" + m.group(1) + "|>", text)


# ----------------------------------------------------------------------------------------------
# Reading prompt texts: our JSON, or the official constants read with ast
# ----------------------------------------------------------------------------------------------
def check_texts(texts: dict, where: str) -> dict:
    """Each text a non-empty string; no special token except the one image of the observation turn
    (an <|im_end|> in a prompt would end the turn early; a stray image tag would claim no image)."""
    for key in TEXT_FIELDS:
        value = texts.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{where}: '{key}' must be a non-empty string")
        plain = value.replace(IMAGE, "", 1) if key == "observation" else value
        if key == "observation" and plain == value:
            raise InputError(f"{where}: 'observation' must hold the image block {IMAGE} once")
        if SPECIAL_TOKEN.search(plain):
            raise InputError(f"{where}: '{key}' holds a special token "
                             f"({SPECIAL_TOKEN.search(plain).group(0)}) other than its image")
    return texts


def _string_constants(path: Path) -> dict[str, str]:
    """Module-level `NAME = "..."` string assignments of a Python file, read from its syntax tree.
    Nothing is imported or executed: side effects in the file never happen."""
    try:
        tree = ast.parse(read_text(path), filename=str(path))
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"{path}: not readable Python source ({type(e).__name__}: {str(e)[:120]})") from None
    found = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return found


def _error_line(engine: Path) -> str | None:
    """The official engine's first line of the error turn: the f-string that formats the tool's
    exception (`error_info`), as a template with {reason} in its place. None if it is not there."""
    try:
        tree = ast.parse(read_text(engine), filename=str(engine))
    except (OSError, SyntaxError, ValueError, RecursionError, MemoryError):   # InputError is a ValueError
        return None
    for node in ast.walk(tree):
        if not isinstance(node, ast.JoinedStr):
            continue
        parts = []
        for v in node.values:
            if isinstance(v, ast.Constant) and isinstance(v.value, str):
                parts.append(v.value)
            elif isinstance(v, ast.FormattedValue) and isinstance(v.value, ast.Name) \
                    and v.value.id == OFFICIAL_ERROR_NAME and v.conversion == -1 and v.format_spec is None:
                parts.append("{reason}")
            else:
                break
        else:
            if "{reason}" in parts:
                return "".join(parts)
    return None


def _official_texts(constants: Path, root: Path | None) -> dict:
    found = _string_constants(constants)
    missing = [name for name in OFFICIAL_NAMES.values() if name not in found]
    if missing:
        raise InputError(f"{constants}: no string constant named {', '.join(missing)}")
    texts = {key: found[name] for key, name in OFFICIAL_NAMES.items()}
    for old, new in OFFICIAL_FIELDS.items():
        texts["observation"] = texts["observation"].replace(old, new)
    engine = (root / OFFICIAL_ENGINE) if root else None
    line = _error_line(engine) if engine and engine.is_file() else None
    if line is None:
        raise InputError(f"{constants}: the error turn's first line is written in the official engine "
                         f"({OFFICIAL_ENGINE}); give the repository folder, or a checkout in which "
                         f"{OFFICIAL_ENGINE} sits beside verl/trainer/, or a JSON prompts file")
    texts["error"] = line + texts["error"]
    return texts


def load_prompts(path: str | Path) -> dict:
    """{"system", "observation", "error"} from a JSON file, an official constants.py, or the
    official repository's folder (its constants and engine files are read, never run)."""
    p = Path(path)
    if p.is_dir():
        if not (p / OFFICIAL_CONSTANTS).is_file():
            raise InputError(f"{p}: a folder given as --prompts must be the official repository "
                             f"(no {OFFICIAL_CONSTANTS} in it)")
        return check_texts(_official_texts(p / OFFICIAL_CONSTANTS, p), str(p))
    if not p.is_file():
        raise InputError(f"{p}: prompts file not found")
    if p.suffix == ".py":
        root = p.resolve().parents[2] if len(p.resolve().parents) > 2 else None
        return check_texts(_official_texts(p, root), str(p))
    texts = load_json(p, dict, f"a prompts file holds {', '.join(TEXT_FIELDS)}")
    unknown = sorted(set(texts) - set(TEXT_FIELDS))
    if unknown:
        raise InputError(f"{p}: unknown field(s) {', '.join(unknown)} (known: {', '.join(TEXT_FIELDS)})")
    return check_texts({**{k: getattr(DEFAULT, k) for k in TEXT_FIELDS}, **texts}, str(p))


# The judge's texts: {question}, {reference}, {answer} (the official reward file's names are mapped)
JUDGE_OFFICIAL = {"system": "SYSTEM_PROMPT", "query": "QUERY_PROMPT"}
JUDGE_FIELDS = {"{ground_truth}": "{reference}", "{prediction}": "{answer}"}


def load_judge_prompt(path: str | Path) -> dict:
    """{"system", "query"} for the LLM judge, from a JSON file or the official reward file (its
    SYSTEM_PROMPT and QUERY_PROMPT constants, read with ast, never run). The query must hold
    {question}, {reference} and {answer}."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: judge prompt file not found")
    if p.suffix == ".py":
        found = _string_constants(p)
        missing = [n for n in JUDGE_OFFICIAL.values() if n not in found]
        if missing:
            raise InputError(f"{p}: no string constant named {', '.join(missing)}")
        texts = {k: found[n] for k, n in JUDGE_OFFICIAL.items()}
    else:
        texts = load_json(p, dict, "a judge prompt holds 'query' and optionally 'system'")
        if not isinstance(texts.get("query"), str):
            raise InputError(f"{p}: must hold a JSON object with a 'query' string (and optionally 'system')")
    for old, new in JUDGE_FIELDS.items():
        texts["query"] = texts["query"].replace(old, new)
    lost = [f for f in ("{question}", "{reference}", "{answer}") if f not in texts["query"]]
    if lost:
        raise InputError(f"{p}: the judge's query must hold {', '.join(lost)}")
    if not isinstance(texts.get("system", ""), str):
        raise InputError(f"{p}: 'system' must be a string")
    return {"system": texts.get("system") or None, "query": texts["query"]}


def read_score(text: str) -> float:
    """A judge's verdict, read as the official reward does: the first word after the last
    "score:" (any case); 1.0 if it holds a 1."""
    low = text.lower()
    if "score:" not in low:
        return 0.0
    word = (low.split("score:")[-1].strip().split("\n")[0].strip().split(" ") or [""])[0]
    return 1.0 if "1" in word else 0.0


# ----------------------------------------------------------------------------------------------
# The official parser's reading of a tool call (a safe parse of what it evaluates)
# ----------------------------------------------------------------------------------------------
# the last "<grounding>{"bbox_2d": LIST, ... "source": 'NAME'}</grounding>" of the turn (greedy, as there)
# (the quote around the source may be ', " or, as the official pattern reads, a comma)
_OFFICIAL_CALL = re.compile(r'.*<grounding>\{"bbox_2d": (.*),.*"source": [\',"](.*)[\',"]\}</grounding>', re.S)
_OFFICIAL_SOURCE = re.compile(r"observation_([0-9]*)")
MAX_BOX_CHARS = 400


def official_call(text: str, sizes: list[tuple[int, int]]):
    """(relative box, source, pixel box in the source image) of the turn's tool call, or an error
    string. Relative coordinates are scaled by the source's size, cut to whole pixels, clamped to
    [0, size - 1]; the box must then be at least one pixel wide and high, with an aspect below 200."""
    m = _OFFICIAL_CALL.match(text)
    if not m:
        return "the grounding call does not match the expected form"
    box_text, source = m.group(1).strip(), m.group(2)
    if len(box_text) > MAX_BOX_CHARS:
        return f"bbox_2d is longer than {MAX_BOX_CHARS} characters"
    try:
        box = ast.literal_eval(box_text)   # a literal only: never code
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return f"bbox_2d {box_text[:60]!r} is not a list literal"
    if not isinstance(box, list) or len(box) != 4 \
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return "bbox_2d must be a list of four numbers"
    if not all(math.isfinite(v) for v in box):
        return "bbox_2d holds a non-finite number"
    if source == "original_image":
        index = 0
    else:
        s = _OFFICIAL_SOURCE.match(source)
        if not s or not s.group(1):
            return f"the source {source[:40]!r} is neither original_image nor observation_i"
        index = int(s.group(1))
    if index >= len(sizes):
        return f"the source {source[:40]!r} does not exist yet"
    w, h = sizes[index]
    x0, y0, x1, y1 = int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w - 1), min(y1, h - 1)
    if x0 > x1 - 1 or y0 > y1 - 1:
        return f"the box {[x0, y0, x1, y1]} is less than one pixel wide or high"
    if (x1 - x0) / (y1 - y0) >= 200 or (y1 - y0) / (x1 - x0) >= 200:
        return "the box's aspect ratio is 200 or more"
    name = "original_image" if index == 0 else f"observation_{index}"
    return [float(v) for v in box], name, (x0, y0, x1, y1)


_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)


def first_answer(turn_texts: list[str]) -> str | None:
    """The official extraction: the first <answer>...</answer> of the turns joined by spaces."""
    m = _ANSWER.search(" ".join(turn_texts))
    return m.group(1).strip() if m else None


# ----------------------------------------------------------------------------------------------
# Presets: every budget of a setup under one switch. Values are argparse defaults, so a flag given
# on the command line still wins.
# ----------------------------------------------------------------------------------------------
PRESETS = {
    "tiny": {},   # the scripts' own defaults
    "mini-o3": {  # the official rollout (README's RL command and verl/trainer/config)
        "min_pixels": 40_000, "max_pixels": 2_000_000, "pixel_rule": "mini-o3",
        "max_turn_tokens": 8192, "max_total_tokens": 32_768 - 2_000, "max_images": 12,
        "turn_caps": "1,2,4,6,8,12",   # evaluation at 12 turns (rl.py keeps its --max-turns 6)
        "numbering": "turns", "parser": "official", "answer": "first",
        "temperature": 1.0,                      # rollouts and Avg@K sampled at temperature 1, as the paper
        "levels": None, "train_modules": None,   # rl.py: every question (not only hard), the whole model
        "verdict_drills": 0,                     # sft.py: no tiny-world drills
    },
}
PIXEL_RULES = ("qwen", "mini-o3")


def add_protocol_args(ap: argparse.ArgumentParser, pixels: bool = True):
    g = ap.add_argument_group("protocol (prompts, parser, budgets)")
    g.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="mini-o3: every official budget, numbering, parser and answer rule")
    g.add_argument("--prompts", help="texts: a JSON file {system, observation, error}, the official "
                   "verl/trainer/constants.py, or the official repository's folder (read, never run)")
    g.add_argument("--numbering", choices=["images", "turns"], default="images")
    g.add_argument("--parser", choices=["strict", "official"], default="strict")
    g.add_argument("--answer", choices=["last", "first"], default="last")
    if pixels:
        g.add_argument("--min-pixels", type=int, help="override the checkpoint's pixel budget (min)")
        g.add_argument("--max-pixels", type=int, help="override the checkpoint's pixel budget (max)")
        g.add_argument("--pixel-rule", choices=PIXEL_RULES, default="qwen",
                       help="qwen: one resize to multiples of 28 within the budget; mini-o3: the official "
                            "nearest-neighbour resize into the budget first")


def parse_with_preset(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse twice: the first pass reads --preset, whose values become defaults for the second."""
    known, _ = ap.parse_known_args(argv)
    preset = PRESETS.get(getattr(known, "preset", "tiny"), {})
    dests = {a.dest for a in ap._actions}
    ap.set_defaults(**{k: v for k, v in preset.items() if k in dests})
    return ap.parse_args(argv)


def protocol_from_args(args) -> Protocol:
    texts = load_prompts(args.prompts) if getattr(args, "prompts", None) else {}
    return replace(DEFAULT, **texts, numbering=args.numbering, parser=args.parser, answer=args.answer)


def apply_pixels(processor, args):
    """--min-pixels / --max-pixels / --pixel-rule onto the processor's budget (checked)."""
    b = processor.budget
    lo = args.min_pixels if getattr(args, "min_pixels", None) else b.min_pixels
    hi = args.max_pixels if getattr(args, "max_pixels", None) else b.max_pixels
    if lo < 28 * 28 or hi < lo:
        raise InputError(f"pixel budget: need 784 <= --min-pixels <= --max-pixels, got {lo} and {hi}")
    b.min_pixels, b.max_pixels, b.rule = lo, hi, getattr(args, "pixel_rule", "qwen")
