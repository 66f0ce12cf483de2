"""What every stage must agree on: Mini-o3's protocol, the crop tool, tokens and positions, grading.

  * the conversation format (system prompt, first user turn, observation and error turns),
  * `parse_action`, the strict parser of what the model wrote in one assistant turn,
  * `Episode`, the state of one search: the images seen so far and the crop tool that adds one,
  * chunks and M-RoPE positions (`encode_chunk`, `rope_positions`) and `render`, which replays a
    trajectory into exactly the tokens the engine would have produced,
  * `grade`, the verifiable reward.
Files and input checking are in data.py; the model (loading, the tiny model, checkpoints) in model.py.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from minio3.data import SPECIAL_TOKEN, InputError
from minio3.protocol import DEFAULT, IMAGE, SYSTEM_PROMPT, Protocol, neutralise, official_call

ROOT = Path(__file__).resolve().parents[1]   # the project folder (checkpoints/, exemplars/)

# ----------------------------------------------------------------------------------------------
# The protocol. Texts are our own words (protocol.py; swappable with --prompts); tags, JSON keys,
# coordinates and turn structure are Mini-o3's, so its data and checkpoints work here unchanged.
# ----------------------------------------------------------------------------------------------
PLAIN_SYSTEM_PROMPT = "You are a helpful assistant."   # the base model's (Qwen's default) prompt

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
STOP_STRINGS = ("</grounding>", IM_END)              # a turn ends at either
# The tiny world's vocabulary (synthetic probe questions; the tiny tokenizer is trained on it)
WORDS = {"colours": ["red", "green", "blue", "yellow"],
         "shapes": ["circle", "square", "triangle", "diamond"],
         "glyphs": list("0123456789AEHKPX")}

QUESTION = "What is the character printed on the {colour} {shape}?"   # the tiny world's question


VERDICT_STYLES = ("ledger", "compare", "goal")


def _sentence(colour: str, shape: str, said: str, decision: str, style: str, same: bool = False) -> str:
    """What a crop shows (`said`) and whether it is the asked-for object, in one of VERDICT_STYLES:
    `decision` is the compare and goal styles' words after the colon; the ledger style says "This is
    the <colour> <shape>." when `same`, else ", not the <colour> <shape>."."""
    if style not in VERDICT_STYLES:
        raise ValueError(f"unknown verdict style {style!r}; choose from {VERDICT_STYLES}")
    want = f"I want the {colour} {shape}"
    if style == "goal":
        return f"{want}. {said}: {decision}"
    if style == "compare":
        return f"{said}. {want}: {decision}"
    return f"{said}. This is the {colour} {shape}." if same else f"{said}, not the {colour} {shape}."


def verdict(colour: str, shape: str, seen_shape: str | None, glyph: str | None, style: str = "ledger") -> str:
    """The sentence after a crop in a search (collect.py) and in base.py's `verify` task: what the crop
    shows, and whether that is the asked-for object. "ledger": the decision follows the description
    ("It is a green triangle with the character 8, not the green circle."), so it must look up the
    asked shape in the question far above. "compare": the thought first copies the two shapes side
    by side ("... 8. I want the green circle: triangle is not circle."), so the decision compares
    two words a fixed distance apart. "goal": the asked object first, then the description and the
    same comparison ("I want the green circle. It is a green triangle with the character 8: triangle
    is not circle."): the goal is copied from the previous turn's own first words before anything
    of the crop is written, so the object just described cannot take its place."""
    if not (seen_shape and glyph):
        return _sentence(colour, shape, "I cannot make it out here", "not it.", style)
    same = seen_shape == shape
    return _sentence(colour, shape, f"It is a {colour} {seen_shape} with the character {glyph}",
                     f"{seen_shape} is the same." if same else f"{seen_shape} is not {shape}.", style, same)


def look_verdict(colour: str, shape: str, seen: tuple[str, str, str] | None, style: str = "ledger") -> str:
    """`verdict` for any crop: `seen` is (colour, shape, character) of the object it shows, or None when
    it shows no object. One of another colour, or none at all, is named as such ("There is no red
    object here. I want the red square: not it." / "It is a blue diamond with the character 3. I want
    the red square: blue is not red."); one of the asked colour gets `verdict`."""
    if seen is not None and seen[0] == colour:
        return verdict(colour, shape, seen[1], seen[2], style)
    if seen is None:
        none = f"There is no {colour} object here"
        return f"{none}." if style == "ledger" else _sentence(colour, shape, none, "not it.", style)
    return _sentence(colour, shape, f"It is a {seen[0]} {seen[1]} with the character {seen[2]}",
                     f"{seen[0]} is not {colour}.", style)


def fmt_box(box: list[float]) -> str:
    """A relative box as the protocol writes it: "[0.125, 0.250, 0.250, 0.375]"."""
    return "[" + ", ".join(f"{v:.3f}" for v in box) + "]"


def zoom_text(box: list[float]) -> str:
    """The tool call that crops `box` (relative) out of the original image."""
    return '<grounding>{"bbox_2d": ' + fmt_box(box) + ', "source": "original_image"}</grounding>'


def observation_text(action_index: int, observation_index: int) -> str:
    """The user turn that returns a crop, in this project's wording."""
    return DEFAULT.observation_text(action_index, observation_index)


def has_special(text: str) -> bool:
    return bool(SPECIAL_TOKEN.search(text))


def error_text(reason: str) -> str:
    """The user turn that answers an invalid tool call, in this project's wording."""
    return DEFAULT.error_text(reason)


def prompt_text(question: str, system: str | None = SYSTEM_PROMPT, context: str = "", image: bool = True) -> str:
    """System turn + first user turn (image + question) + the opening of the assistant turn.

    VisualProbe writes the image as "<image>" inside the problem; it is replaced by the image
    block there, or put first when the problem has none. `context` (earlier turns, e.g. few-shot
    exemplars) goes between the system turn and the question. Special tokens typed into the
    question are neutralised.
    """
    question, system = neutralise(question), SYSTEM_PROMPT if system is None else system
    if not image:
        user = question.replace("<image>\n", "").replace("<image>", "")
    else:
        user = question.replace("<image>", IMAGE, 1) if "<image>" in question else IMAGE + "\n" + question
    return (f"{IM_START}system\n{system}{IM_END}\n{context}"
            f"{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n")


def tool_turn_text(user_text: str) -> str:
    """What follows an assistant turn that stopped at </grounding>: close it, add the user turn."""
    return f"{IM_END}\n{IM_START}user\n{user_text}{IM_END}\n{IM_START}assistant\n"


# ----------------------------------------------------------------------------------------------
# parse_action: strict, bounded, never eval.
# ----------------------------------------------------------------------------------------------
MAX_TURN_CHARS = 16_000      # a longer turn is refused outright
MAX_CALL_CHARS = 400         # the JSON inside <grounding> ... </grounding>
MAX_ANSWER_CHARS = 400
MAX_ASPECT = 100.0           # width/height (in pixels of the source image) above this is refused
_GROUNDING = re.compile(r"<grounding>(.*?)</grounding>", re.S)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.S)
_SOURCE = re.compile(r"observation_([1-9][0-9]{0,3})")


@dataclass
class Action:
    kind: str                             # "zoom" | "answer" | "invalid" | "none"
    bbox: list[float] | None = None       # relative [x0, y0, x1, y1] of the source image
    source: str | None = None             # "original_image" or "observation_i"
    answer: str | None = None
    error: str | None = None
    pixel_box: tuple[int, int, int, int] | None = None   # set by the official parser (its own rounding)

    @property
    def source_index(self) -> int:
        """0 for the original image, i for observation_i."""
        return 0 if self.source == "original_image" else int(self.source.split("_")[1])


def _reject_constant(name):
    raise ValueError(f"{name} is not a number")


def parse_action(text: str, image_sizes: list[tuple[int, int]] | None = None) -> Action:
    """Read the action of one assistant turn.

    A complete <grounding> call wins (generation stops right after it); then <answer>; a turn with
    neither is "none" (it ends the episode). `image_sizes` lists (width, height) of the original
    image and of each observation so far: it bounds `observation_i` and the aspect-ratio check.
    """
    if len(text) > MAX_TURN_CHARS:
        return Action("invalid", error=f"the turn is longer than {MAX_TURN_CHARS} characters")
    calls = _GROUNDING.findall(text)
    if calls:
        return _parse_call(calls[-1], image_sizes)
    if "<grounding>" in text:
        return Action("invalid", error="<grounding> is not closed by </grounding>")
    answers = _ANSWER.findall(text)
    if answers:
        answer = answers[-1].strip()
        if len(answer) > MAX_ANSWER_CHARS:
            return Action("invalid", error=f"the answer is longer than {MAX_ANSWER_CHARS} characters")
        return Action("answer", answer=answer)
    return Action("none")


def parse_official(text: str, image_sizes: list[tuple[int, int]]) -> Action:
    """The official rollout's reading of a turn (protocol.official_call): a turn with a complete
    <grounding>...</grounding> is a tool call, read leniently (boxes clamped into the image); else
    its last <answer>; else nothing (an unclosed <grounding> ends the episode, as there)."""
    if len(text) > MAX_TURN_CHARS:
        return Action("invalid", error=f"the turn is longer than {MAX_TURN_CHARS} characters")
    if _GROUNDING.search(text):
        read = official_call(text, image_sizes)
        if isinstance(read, str):
            return Action("invalid", error=read)
        box, source, pixels = read
        return Action("zoom", bbox=box, source=source, pixel_box=pixels)
    answers = _ANSWER.findall(text)
    if answers and len(answers[-1].strip()) <= MAX_ANSWER_CHARS:
        return Action("answer", answer=answers[-1].strip())
    if answers:
        return Action("invalid", error=f"the answer is longer than {MAX_ANSWER_CHARS} characters")
    return Action("none")


def _parse_call(body: str, image_sizes) -> Action:
    def bad(reason):
        return Action("invalid", error=reason)

    if len(body) > MAX_CALL_CHARS:
        return bad(f"the grounding call is longer than {MAX_CALL_CHARS} characters")
    try:
        call = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        return bad(f"the grounding call is not valid JSON ({e})")
    if not isinstance(call, dict):
        return bad("the grounding call must be a JSON object")
    if set(call) != {"bbox_2d", "source"}:
        return bad(f"the grounding call must have exactly the keys bbox_2d and source, got {sorted(call)}")
    box, source = call["bbox_2d"], call["source"]
    if not isinstance(box, list) or len(box) != 4:
        return bad("bbox_2d must be a list of four numbers")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        return bad("bbox_2d must hold numbers only")
    box = [float(v) for v in box]
    if not all(math.isfinite(v) for v in box):
        return bad("bbox_2d holds a non-finite number")
    if not all(0.0 <= v <= 1.0 for v in box):
        return bad("bbox_2d must be relative coordinates between 0 and 1")
    x0, y0, x1, y1 = box
    if x0 >= x1 or y0 >= y1:
        return bad("bbox_2d needs x0 < x1 and y0 < y1")
    if not isinstance(source, str):
        return bad("source must be a string")
    if source != "original_image":
        m = _SOURCE.fullmatch(source)
        if not m:
            return bad(f"unknown source {source[:40]!r}: use original_image or observation_i")
        if image_sizes is not None and int(m.group(1)) >= len(image_sizes):
            return bad(f"{source} does not exist yet ({len(image_sizes) - 1} observations so far)")
    w, h = (1.0, 1.0)
    if image_sizes is not None and not image_sizes:
        return bad("there is no image to zoom into")
    if image_sizes is not None:
        w, h = image_sizes[0 if source == "original_image" else int(source.split("_")[1])]
    bw, bh = (x1 - x0) * w, (y1 - y0) * h
    if max(bw / bh, bh / bw) > MAX_ASPECT:
        return bad(f"the box's aspect ratio is above {MAX_ASPECT:g}")
    return Action("zoom", bbox=box, source=source)


# ----------------------------------------------------------------------------------------------
# Pixel budget and the crop tool.
# ----------------------------------------------------------------------------------------------
QWEN_PROCESSOR_PIXELS = (3136, 12_845_056)   # Qwen2.5-VL's image processor's own min and max


def smart_size(width: int, height: int, min_pixels: int, max_pixels: int, f: int = 28) -> tuple[int, int]:
    """Qwen2.5-VL's rule: sides are multiples of 28, total pixels within [min_pixels, max_pixels]."""
    if max(width, height) / min(width, height) > 200:
        raise ValueError(f"aspect ratio of {width}x{height} is above 200")
    h, w = max(f, round(height / f) * f), max(f, round(width / f) * f)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(f, math.floor(height / beta / f) * f)
        w = max(f, math.floor(width / beta / f) * f)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
    return w, h


def official_size(width: int, height: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The official rollout's first resize (nearest neighbour) of an image or crop: scaled into
    [min_pixels, max_pixels] with whole-pixel sides, at least 28 a side, aspect below 200."""
    w, h = width, height
    if w * h > max_pixels:
        k = math.sqrt(max_pixels / (w * h))
        w, h = int(w * k), int(h * k)
    if w * h < min_pixels:
        k = math.sqrt(min_pixels / (w * h))
        w, h = int(w * k), int(h * k)
    if w < 28 or h < 28:
        k = 28 / min(w, h)
        w, h = int(w * k + 1), int(h * k + 1)
    if w / h >= 200:
        h = int(w / 190 + 1)
    if h / w >= 200:
        w = int(h / 190 + 1)
    return w, h


@dataclass
class Budget:
    """How an image is resized before the vision tower. rule "qwen": Qwen2.5-VL's processor with
    this budget (sides multiples of 28, pixels within [min_pixels, max_pixels]); rule "mini-o3":
    the official rollout, a nearest-neighbour resize into the budget first, then the processor
    with its own wide limits."""
    min_pixels: int
    max_pixels: int
    factor: int = 28
    min_side: int = 28   # a crop box is grown to at least this many source pixels a side
    rule: str = "qwen"

    def first_size(self, width: int, height: int) -> tuple[int, int]:
        if self.rule == "mini-o3":
            return official_size(width, height, self.min_pixels, self.max_pixels)
        return width, height

    def limits(self) -> tuple[int, int]:
        return QWEN_PROCESSOR_PIXELS if self.rule == "mini-o3" else (self.min_pixels, self.max_pixels)

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an image of this size is resized to before the vision tower."""
        return smart_size(*self.first_size(width, height), *self.limits(), self.factor)

    def resize(self, image: Image.Image) -> Image.Image:
        first = self.first_size(*image.size)
        if first != image.size:
            image = image.resize(first, Image.NEAREST)
        size = smart_size(*image.size, *self.limits(), self.factor)
        return image if size == image.size else image.resize(size, Image.BICUBIC)


# max 230² (not 224²): Qwen's rule floors side/beta, so exactly 224² can give 196 px for a large square
TINY_MIN_PIXELS, TINY_MAX_PIXELS = 112 * 112, 230 * 230
TINY_BUDGET = Budget(TINY_MIN_PIXELS, TINY_MAX_PIXELS)   # the tiny world's pixel budget


def pixel_box(bbox: list[float], width: int, height: int, min_side: int = 28) -> tuple[int, int, int, int]:
    """Relative box -> integer pixel box of a width x height image, grown to min_side if smaller."""
    x0, x1 = math.floor(bbox[0] * width), math.ceil(bbox[2] * width)
    y0, y1 = math.floor(bbox[1] * height), math.ceil(bbox[3] * height)

    def grow(a, b, size):
        need = min(min_side, size) - (b - a)
        if need > 0:
            a -= need // 2
            b += need - need // 2
            a, b = (0, b - a) if a < 0 else (a, b)
            a, b = (a - (b - size), size) if b > size else (a, b)
        return max(0, a), min(size, b)

    x0, x1 = grow(x0, x1, width)
    y0, y1 = grow(y0, y1, height)
    return x0, y0, x1, y1


class Episode:
    """One search: the original image, every crop taken so far, and the turn count.

    `images[0]` is the original at full resolution and `images[i]` is observation_i, the
    full-resolution region cut from its source; `boxes[i]` is where it lies in the original (pixels).
    `shown[i]` is what the model sees: the same image resized to the pixel budget.
    """

    def __init__(self, image: Image.Image | None, budget: Budget, protocol: Protocol = DEFAULT):
        self.budget, self.protocol = budget, protocol   # (image None: a text-only conversation)
        if image is not None and image.mode != "RGB":
            image = image.convert("RGB")       # (an RGB image is used as it is: no copy of a big picture)
        self.images = [image] if image is not None else []
        self.boxes = [(0, 0, image.width, image.height)] if image is not None else []
        self.shown = [budget.resize(im) for im in self.images]
        self.crops: list[dict] = []   # one per zoom: source, relative bbox, pixel box in the original
        self.actions = 0              # assistant turns that asked for a tool call
        self.errors = 0

    def sizes(self) -> list[tuple[int, int]]:
        return [im.size for im in self.images]

    def parse(self, text: str) -> Action:
        if self.protocol.parser == "official":
            return parse_official(text, self.sizes())
        return parse_action(text, self.sizes())

    def apply(self, action: Action) -> tuple[str, Image.Image | None]:
        """Carry out a zoom (or report an invalid call): returns (user turn text, new image or None)."""
        index = self.actions
        self.actions += 1
        if action.kind == "zoom":
            src = action.source_index
            image = self.images[src]
            x0, y0, x1, y1 = action.pixel_box or pixel_box(action.bbox, *image.size, self.budget.min_side)
            crop = image.crop((x0, y0, x1, y1))
            ox, oy = self.boxes[src][:2]     # crops keep full resolution: offsets just add
            self.images.append(crop)
            self.boxes.append((ox + x0, oy + y0, ox + x1, oy + y1))
            self.shown.append(self.budget.resize(crop))
            self.crops.append({"source": action.source, "bbox": action.bbox,
                               "pixel_box": list(self.boxes[-1]), "shown": list(self.shown[-1].size)})
            return self.protocol.observation_text(index, len(self.images) - 1), self.shown[-1]
        self.errors += 1
        return self.protocol.error_text(action.error or "invalid call"), None


# ----------------------------------------------------------------------------------------------
# Tokens. A conversation is a list of chunks; each chunk is text with one <|image_pad|> per image,
# expanded here to the number of tokens the image takes. Training and the engine both go
# through `encode_chunk`, so they see the same ids for the same text.
# ----------------------------------------------------------------------------------------------
def image_token_count(shown: Image.Image, merge: int = 2, patch: int = 14) -> int:
    return (shown.width // patch) * (shown.height // patch) // (merge * merge)


def encode_chunk(tokenizer, text: str, image_tokens: list[int] = ()) -> list[int]:
    parts = text.split("<|image_pad|>")
    if len(parts) - 1 != len(image_tokens):
        raise ValueError(f"chunk has {len(parts) - 1} image placeholders but {len(image_tokens)} images")
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ids: list[int] = []
    for i, part in enumerate(parts):
        if part:
            ids += tokenizer.encode(part, add_special_tokens=False)
        if i < len(image_tokens):
            ids += [pad] * image_tokens[i]
    return ids


def rope_positions(ids: list[int], grids: list[tuple[int, int, int]], start: int,
                   image_token_id: int, merge: int = 2) -> tuple[torch.Tensor, int]:
    """M-RoPE positions (3, len(ids)) of a chunk that begins at position `start`.

    Text advances all three axes by one. An image's tokens get (t, h, w) = start + its grid
    coordinates, and text after it resumes at start + max(grid_h, grid_w): the rule of
    Qwen2.5-VL's get_rope_index, applied chunk by chunk so a cached row can be continued.
    Returns the positions and the start of whatever follows.
    """
    pos = torch.empty(3, len(ids), dtype=torch.long)
    i, p, g = 0, start, 0
    n = len(ids)
    while i < n:
        if ids[i] != image_token_id:
            pos[:, i] = p
            i, p = i + 1, p + 1
            continue
        t, h, w = grids[g]
        g += 1
        h, w = h // merge, w // merge
        count = t * h * w
        tt = torch.arange(t).view(-1, 1, 1).expand(t, h, w).reshape(-1)
        hh = torch.arange(h).view(1, -1, 1).expand(t, h, w).reshape(-1)
        ww = torch.arange(w).view(1, 1, -1).expand(t, h, w).reshape(-1)
        pos[:, i:i + count] = torch.stack([tt, hh, ww]) + p
        i, p = i + count, p + max(h, w)
    if g != len(grids):
        raise ValueError(f"{len(grids)} images given but {g} found in the tokens")
    return pos, p


def render(image: Image.Image, problem: str, turns: list[str], processor, system: str | None = None,
           max_tokens: int | None = None, protocol: Protocol = DEFAULT, unlearned: set[int] = frozenset()) -> dict:
    """Tokens of a whole conversation: `turns` are the assistant texts, in order.

    After every turn but the last, the turn's action is carried out exactly as the engine does it
    (a zoom adds an observation turn with the crop, an invalid call an error turn). The last turn
    ends with <|im_end|> (the model's own end of message). A conversation longer than `max_tokens`
    is an InputError, as it would be out of the engine's context.
    Returns ids, a boolean mask of assistant tokens (but those of the turns in `unlearned`), and the
    images as shown to the model.
    """
    tok = processor.tokenizer
    episode = Episode(image, processor.budget, protocol)
    ids = encode_chunk(tok, prompt_text(problem, system or protocol.system), [image_token_count(episode.shown[0])])
    mask = [False] * len(ids)
    for i, text in enumerate(turns):
        piece = encode_chunk(tok, text)
        last = i == len(turns) - 1
        if last:
            piece += [tok.convert_tokens_to_ids(IM_END)]
        ids += piece
        mask += [i not in unlearned] * len(piece)
        if last:
            break
        action = episode.parse(text)
        if action.kind not in ("zoom", "invalid"):
            raise InputError(f"turn {i} of {len(turns)} has no tool call, so the episode would end there")
        user, new = episode.apply(action)
        piece = encode_chunk(tok, tool_turn_text(user), [image_token_count(new)] if new else [])
        ids += piece
        mask += [False] * len(piece)
    if max_tokens is not None and len(ids) > max_tokens:
        raise InputError(f"the conversation of {problem[:40]!r} has {len(ids)} tokens (at most {max_tokens})")
    return {"ids": ids, "mask": mask, "shown": episode.shown, "crops": episode.crops}


# ----------------------------------------------------------------------------------------------
# Grading (the verifiable reward): exact / normalised match, or the option letter.
# ----------------------------------------------------------------------------------------------
def normalise(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.strip(" .!?\"'`")


def option_letter(text: str, n_options: int) -> str | None:
    """The option letter an answer picks: "B", "(B)", "B. red", or the option's text itself."""
    m = re.match(r"^\(?([A-H])\)?(?:[.:)\s]|$)", text.strip())
    if m and "ABCDEFGH".index(m.group(1)) < n_options:
        return m.group(1)
    return None


def grade(answer: str | None, row: dict) -> float:
    """1.0 if the answer matches the record's solution, else 0.0 (no answer is wrong)."""
    if answer is None:
        return 0.0
    options = row.get("options")
    if options:
        letter = option_letter(answer, len(options))
        if letter is None:   # the option written out instead of its letter
            texts = [normalise(o) for o in options]
            letter = "ABCDEFGH"[texts.index(normalise(answer))] if normalise(answer) in texts else None
        return float(letter == str(row["solution"]).strip().upper())
    return float(normalise(answer) == normalise(str(row["solution"])))
