"""Drills: short synthetic pieces of a search that train one skill of it with many more examples than
the trajectories hold (sft.py --verdict-drills / --ledger-drills / --look-drills, base.py's `compare`
and `ledger` tasks). The verdict and ledger drills are text only; the look drill is one crop of a
probe picture. Each returns its texts (and picture) and what of them is learned from;
`drill_batch` turns them into tokens and labels, `drill_accuracy` scores a model on fresh ones."""
from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

from minio3.conversation import (PLAIN_SYSTEM_PROMPT, QUESTION, SYSTEM_PROMPT, WORDS, encode_chunk, fmt_box, look_verdict,
                                 observation_text, prompt_text, render, tool_turn_text, verdict, zoom_text)
from minio3.model import collate, token_logprobs
from minio3.world import GRID, LEVELS, ask, cell_box, probe_sample


def verdict_drill(rng: np.random.Generator, style: str = "ledger") -> tuple[str, str, str]:
    """A text-only drill of the search's verdict (sft.py --verdict-drills): (question, the thought
    so far, the verdict). The thought names the asked object, passes 0-3 look-alikes, then describes
    one more object, which is the asked one half the time; the verdict must compare the two shapes.
    There is no picture: the description is given, and only the decision and what follows it is
    learned from: in the ledger style all after the character, in the compare and goal styles all
    after the copied shapes' "is" (the copies are easy; labelled, they would dilute the decision's
    share)."""
    colour, shape = str(rng.choice(WORDS["colours"])), str(rng.choice(WORDS["shapes"]))
    others = [s for s in WORDS["shapes"] if s != shape]
    thought = f"<think>I am looking for the {colour} {shape}. "
    for _ in range(int(rng.integers(0, 4))):
        thought += verdict(colour, shape, str(rng.choice(others)), str(rng.choice(WORDS["glyphs"])), style) + " "
    seen = shape if rng.random() < 0.5 else str(rng.choice(others))
    said = verdict(colour, shape, seen, str(rng.choice(WORDS["glyphs"])), style)
    cut = (said.rindex(f": {seen} is ") + len(f": {seen} is") if style != "ledger"
           else said.index(" with the character ") + len(" with the character ") + 1)
    return QUESTION.format(colour=colour, shape=shape), thought + said[:cut], said[cut:]


def ledger_drill(rng: np.random.Generator, grid: int = 8) -> tuple[str, str, list[tuple[int, int]]]:
    """A text-only drill of stepping through one's own list (sft.py --ledger-drills), in the backward
    ledger of collect.py: the opening list of 2-9 cells of the asked colour, its last box zoomed, then
    1-3 misses, each writing "Left to check:" the previous list minus its last box and zooming the new
    last one. The crops are left out (the observation turns keep their words, not their image
    tokens). Returns (question, the assistant side from the first turn on, the character spans to
    learn from): only the copies, each ledger and each call's box; the opening list and the
    descriptions are given (a picture would tell them)."""
    colour, shape = str(rng.choice(WORDS["colours"])), str(rng.choice(WORDS["shapes"]))
    others = [s for s in WORDS["shapes"] if s != shape]
    n = int(rng.integers(2, 10))
    cells = sorted(int(c) for c in rng.choice(grid * grid, size=n, replace=False))
    boxes = [[c % grid / grid, c // grid / grid, (c % grid + 1) / grid, (c // grid + 1) / grid] for c in cells]
    listing = lambda bs: ", ".join(fmt_box(b) for b in bs) + "."
    text, spans = "", []

    def say(piece: str, learn: bool = False):
        nonlocal text
        if learn:
            spans.append((len(text), len(text) + len(piece)))
        text += piece

    def zoom(box: list[float]):
        before, after = zoom_text(box).split(fmt_box(box))
        say("</think>\n" + before), say(fmt_box(box), True), say(after)

    say(f"<think>I am looking for the {colour} {shape}. The {colour} objects: {listing(boxes)}")
    zoom(boxes[-1])
    for k in range(min(n - 1, int(rng.integers(1, 4)))):
        seen = verdict(colour, shape, str(rng.choice(others)), str(rng.choice(WORDS["glyphs"])))
        say(tool_turn_text(observation_text(k, k + 1).replace("<|image_pad|>", "")))
        say(f"<think>{seen} Left to check: "), say(listing(boxes[: n - 1 - k]), True)
        zoom(boxes[n - 2 - k])
    return QUESTION.format(colour=colour, shape=shape), text, spans


def look_drills(rng: np.random.Generator, style: str = "ledger") -> list[tuple[Image.Image, str, str]]:
    """Drills of looking at a crop (sft.py --look-drills): one probe picture of a random level, and
    four one-cell crops of it, as a search's zooms show them: the target's cell, a look-alike's, the
    cell of an object of another colour, and a cell with no object (clutter only). Each is asked
    "Is this the <colour> <shape>?" about the picture's target and answered by `look_verdict`. The
    explorer never zooms a cell without a candidate, so from its trajectories alone the model learns
    that a crop always shows an object of the asked colour and describes one in an empty cell too.
    (Measured: alone, these drills taught the look-alikes but not the empty cells inside
    a search; with collect.py --slips 0.5 beside them, the empty crops were said to be empty.)
    Returns [(crop, problem, answer)] (the problem with its "<image>"; every answer token learned)."""
    level = str(rng.choice(list(LEVELS)))
    img, _, placed = probe_sample(rng, level)
    target, size = placed[0], LEVELS[level]["size"]
    colour, shape = target["colour"], target["shape"]
    pick = lambda objs: objs[int(rng.integers(len(objs)))]
    lookalikes = [o for o in placed[1:] if o["colour"] == colour]
    others = [o for o in placed if o["colour"] != colour]
    empty = sorted(set(range(GRID * GRID)) - {o["cell"] for o in placed})
    chosen = [(o["cell"], o) for o in (target, pick(lookalikes), pick(others))] + [(pick(empty), None)]
    out = []
    for cell, o in chosen:
        seen = None if o is None else (o["colour"], o["shape"], o["glyph"])
        crop = img.crop(tuple(int(v * size) for v in cell_box(cell)))
        out.append((crop, ask(f"Is this the {colour} {shape}?"), look_verdict(colour, shape, seen, style)))
    return out


# ----------------------------------------------------------------------------------------------
# Drills as training batches
# ----------------------------------------------------------------------------------------------
DRILL_SEARCH_SHARE = 0.5   # drills under the search's long system prompt, the rest under the plain one


DRILL_KINDS = ("verdict", "ledger", "look")   # sft.py --<kind>-drills N


DRILL_LOG = {"verdict": "drills", "ledger": "ledger_drills", "look": "look_drills"}   # their names in the log


def drill_batch(step: int, n: int, seed: int, processor, rank: int = 0, search_share: float = 0.0,
                style: str = "ledger", kind: str = "verdict") -> list[dict]:
    """n drills of one kind. `verdict` (drills.verdict_drill): the question, a thought that ends on a
    description, the loss on the verdict only; half of them describe the asked object, so only
    comparing the two shapes lowers the loss. `ledger` (drills.ledger_drill): a search without its
    crops, the loss on the copies only (each "Left to check:" list and each call's box). `look`
    (drills.look_drills): one crop, "Is this the <colour> <shape>?", the loss on the whole answer
    (what the crop shows, then the verdict). The short plain system prompt keeps them short; a share
    `search_share` carries the search's own (about 220 tokens)."""
    if kind not in DRILL_KINDS:
        raise ValueError(f"unknown drill kind {kind!r}; choose from {DRILL_KINDS}")
    rng, tok = np.random.default_rng([seed, step, rank, 7 + DRILL_KINDS.index(kind)]), processor.tokenizer
    out, looks = [], []
    for _ in range(n):
        if kind == "look":
            looks = looks or look_drills(rng, style)
            crop, problem, answer = looks.pop()
        elif kind == "ledger":
            question, said, spans = ledger_drill(rng)
        else:
            question, thought, said = verdict_drill(rng, style)
        system = SYSTEM_PROMPT if rng.random() < search_share else PLAIN_SYSTEM_PROMPT
        if kind == "look":
            out.append(render(crop, problem, [answer], processor, system=system))
            continue
        if kind == "ledger":
            head = encode_chunk(tok, prompt_text(question, system, image=False))
            enc = tok(said, return_offsets_mapping=True, add_special_tokens=False)
            tail, learn = enc["input_ids"], [any(a < e and b > s for s, e in spans) for a, b in enc["offset_mapping"]]
        else:
            head = encode_chunk(tok, prompt_text(question, system, image=False) + thought)
            tail = encode_chunk(tok, said)
            learn = [True] * len(tail)
        out.append({"ids": head + tail, "mask": [False] * len(head) + learn, "shown": []})
    return out


@torch.no_grad()
def drill_accuracy(model, processor, n: int = 256, seed: int = 10 ** 6, search_share: float = DRILL_SEARCH_SHARE,
                   style: str = "ledger", kind: str = "verdict") -> float:
    """Drills of one kind on n fresh drills (a seed no training run uses): the share whose every
    labelled token (the verdict's decision and the words after it; every copy of a ledger drill)
    gets a probability above one half under teacher forcing."""
    samples = drill_batch(0, n, seed, processor, search_share=search_share, style=style, kind=kind)
    batch = collate(samples, processor, model.device)
    right = (token_logprobs(model, batch) > math.log(0.5)) | ~batch["loss_mask"]
    return float(right.all(dim=1).float().mean())
