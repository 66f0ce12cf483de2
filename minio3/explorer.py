"""The explorer: the scripted teacher of the tiny world's cold start (collect.py).

It searches like a model would, seeing only what the protocol shows a model (the overview at the
pixel budget, then each crop it asks for) and never the record's hidden fields. It reads the
pictures with plain pixel rules (minio3/world.py: colour masks, shapes, the 5x7 glyphs):

  * `explore`: one whole search. Where the overview shows the asked shape plainly, one zoom
    ("direct"). Otherwise it lists the candidates of the asked colour and checks them one by one
    ("trial_and_error"), or zooms into the quarter that holds most of them first ("depth_first"),
    until a crop shows the target, and answers its character.
  * `guesses`: the hasty teacher's tries (collect.py --hasty) where the candidates are many: one
    named as the target at random, one zoom, and the character it shows as the answer, unchecked.

Each turn is written as a thought and an action, in one of the thought styles below.
"""
from __future__ import annotations

import random
from collections import Counter

import numpy as np
from PIL import Image

from minio3.conversation import Episode, fmt_box, look_verdict, verdict, zoom_text
from minio3.world import (COLOURS, GRID, SHAPES, biggest_object, blobs_by_cell, cell_box, describe_any, read_glyph,
                          shape_of)


def parse_question(problem: str) -> tuple[str, str] | None:
    words = problem.lower().replace("?", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((w for w in words if w in SHAPES), None)
    return (colour, shape) if colour and shape else None


def said(thought: str, action: str) -> str:
    """One assistant turn: a thought, then an action (a zoom or an answer)."""
    return f"<think>{thought}</think>\n{action}"


# Thought styles: how the explorer words a search that checks the candidates one by one. The tiny
# run uses "chain-compare"; the others stay for the experiments that compared them.
#   thought after a miss names the next box as         verdict after a crop (conversation.verdict)
#   ledger         "Left to check: [b], [c]."            "It is a green triangle with the character 8, not the green circle."
#   plain          "I check the next one."               as ledger
#   compare        as ledger                             "... with the character 8. I want the green circle: triangle is not circle."
#   backward       as ledger, checked from the list's end as ledger
#   chain          "Next in the list: [a], [b]." (the box just checked, then the next: a copy of the opening list's words)
#   chain-compare  as chain                              as compare
#   chain-goal     as chain                              "I want the green circle. It is a green triangle ...: triangle is not circle."
#   index-goal     "Next: (3) [c]." (the opening list is numbered)   as chain-goal
STYLES = ("ledger", "plain", "compare", "backward", "chain", "chain-compare", "chain-goal", "index-goal")


VERDICT_STYLE = {"ledger": "ledger", "plain": "ledger", "compare": "compare", "backward": "ledger", "chain": "ledger",
                 "chain-compare": "compare", "chain-goal": "goal", "index-goal": "goal"}


def found(colour: str, shape: str, glyph: str, style: str = "ledger") -> str:
    return said(verdict(colour, shape, shape, glyph, VERDICT_STYLE[style]), f"<answer>{glyph}</answer>")


def step_text(style: str, left: list[list[float]], checked: list[float] | None, number: int = 0) -> str:
    """How a thought after a miss names the next box (see STYLES); `number`: its place in the
    opening list, from 1 (the index style)."""
    nxt = left[-1] if style == "backward" else left[0]
    return ("I check the next one." if style == "plain"
            else f"Next: ({number}) {fmt_box(nxt)}." if style.startswith("index")
            else f"Next in the list: {fmt_box(checked)}, {fmt_box(nxt)}." if style.startswith("chain")
            else "Left to check: " + ", ".join(fmt_box(b) for b in left) + ".")


def missed(colour: str, shape: str, seen_shape: str | None, glyph: str | None, style: str, step: str,
           box: list[float]) -> str:
    """A turn after a crop that did not show the asked-for object: say so, name the next box (`step`,
    from step_text), then zoom on `box` (the next box, or where a slip lands: see `slip`)."""
    return said(f"{verdict(colour, shape, seen_shape, glyph, VERDICT_STYLE[style])} {step}", zoom_text(box))


# A slip (collect.py --slips P): after a miss, the call zooms a cell next to the box its own thought
# named, one row or column off, with no pixel of the asked colour in the overview (the tiny model's
# commonest copying error is such an off-by-one box);
# the next turn says what that crop shows (nothing, or an object of another colour: "... I want the
# red square: blue is not red.") and names the same box again. The slipped turn is stored as
# {"text", "learn": false}: SFT replays it but takes no loss on it, so only the recovery is taught.
def slip(cell: int, avoid: set[int], rng: random.Random) -> int | None:
    """A cell a row or a column away from `cell` and not in `avoid` (cells with any pixel of the asked
    colour in the overview), or None."""
    r, c = divmod(cell, GRID)
    near = [(r + dr) * GRID + c + dc for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))
            if 0 <= r + dr < GRID and 0 <= c + dc < GRID and (r + dr) * GRID + c + dc not in avoid]
    return rng.choice(near) if near else None


def recovered(colour: str, shape: str, seen: tuple[str, str, str] | None, style: str, step: str,
              box: list[float]) -> str:
    """The turn after a slip's crop: what it shows, then the box that was meant, again."""
    what = look_verdict(colour, shape, seen, VERDICT_STYLE[style])
    return said(f"{what} {step}", zoom_text(box))


NO_ANSWER = "<answer>none</answer>"


def explore(image: Image.Image, problem: str, budget, rng: random.Random, max_turns: int = 16,
            depth_first: float = 0.0, style: str = "ledger", slips: float = 0.0) -> dict | None:
    """Search like a model would: returns {"turns": [...], "answer", "pattern"} or None when the
    question is not one the explorer understands."""
    goal = parse_question(problem)
    if goal is None:
        return None
    colour, shape = goal
    ep = Episode(image, budget)
    overview = np.asarray(ep.shown[0])
    cells = sorted(blobs_by_cell(overview, colour))

    def look(box: list[float]) -> np.ndarray:
        _, shown = ep.apply(ep.parse(zoom_text(box)))
        return np.asarray(shown)

    def check(arr: np.ndarray) -> tuple[str | None, str | None]:
        obj = biggest_object(arr, colour)
        return (None, None) if obj is None else (shape_of(obj), read_glyph(arr, obj, colour))

    if not cells:
        turns = [said(f"I see no {colour} object at this size. I look at the whole image more closely.",
                      zoom_text([0.0, 0.0, 0.5, 0.5])),
                 said(f"I cannot find the {colour} {shape}.", NO_ANSWER)]
        return {"turns": turns, "answer": "none", "pattern": "failed"}
    # in a large overview blob the shape can be told apart: then one zoom is enough
    blob_h = lambda m: np.ptp(np.nonzero(m)[0]) + 1
    seen = {c: shape_of(m) if blob_h(m) >= 12 else None for c, m in blobs_by_cell(overview, colour).items()}
    direct = [c for c in cells if seen[c] == shape]
    if len(direct) == 1 and all(seen[c] not in (None, shape) for c in cells if c != direct[0]):
        box = cell_box(direct[0])
        got_shape, glyph = check(look(box))
        if got_shape == shape and glyph:
            thought = f"I am looking for the {colour} {shape}. The {colour} {shape} is at {fmt_box(box)}."
            turns = [said(thought, zoom_text(box)), found(colour, shape, glyph, style)]
            return {"turns": turns, "answer": glyph, "pattern": "direct"}
        ep = Episode(image, budget)   # fall back to checking every candidate
    number = (lambda k: f"({k + 1}) ") if style.startswith("index") else (lambda k: "")
    listing = ", ".join(number(k) + fmt_box(cell_box(c)) for k, c in enumerate(cells))
    intro = f"I am looking for the {colour} {shape}. The {colour} objects: {listing}."
    if depth_first and len(cells) >= 4 and rng.random() < depth_first:
        return _depth_first(cells, colour, shape, intro, max_turns, check, look, style)
    avoid = set(blobs_by_cell(overview, colour, min_pixels=1))

    def slip_to(cell: int) -> list[float] | None:   # where a slip before `cell` lands, if one happens
        wrong = slip(cell, avoid, rng) if slips and rng.random() < slips else None
        return None if wrong is None else cell_box(wrong)
    return _one_by_one(cells, colour, shape, intro, max_turns, check, look, style, slip_to)


def _one_by_one(cells, colour, shape, intro, max_turns, check, look, style: str = "ledger", slip_to=None) -> dict:
    """Zoom into each candidate cell in reading order (backward: from the last) until one shows the
    asked-for shape. The lists stay in reading order; the backward one ends on its next box."""
    backward = style == "backward"
    first = fmt_box(cell_box(cells[0]))
    how = (f"the {colour} objects: {first}" if style.startswith("chain")       # the list's own words again
           else f"them in order: (1) {first}" if style.startswith("index") else "them one by one")
    more = "" if len(cells) == 1 or backward else f" They look alike from here, so I check {how}."
    order = cells[::-1] if backward else cells
    turns = [said(intro + more, zoom_text(cell_box(order[0])))]
    for i, cell in enumerate(order):
        if len(turns) > max_turns:
            return {"turns": turns[:max_turns], "answer": None, "pattern": "trial_and_error",
                    "exceeded": True}
        got_shape, glyph = check(look(cell_box(cell)))
        if got_shape == shape and glyph:
            turns.append(found(colour, shape, glyph, style))
            return {"turns": turns, "answer": glyph, "pattern": "trial_and_error"}
        if i + 1 < len(cells):
            left = cells[: len(cells) - 1 - i] if backward else cells[i + 1:]
            step = step_text(style, [cell_box(c) for c in left], cell_box(cell), i + 2)
            nxt = cell_box(order[i + 1])
            wrong = slip_to(order[i + 1]) if slip_to else None
            turns.append(missed(colour, shape, got_shape, glyph, style, step, wrong or nxt))
            if wrong:   # a slip: no loss on the turn that made it, then the recovery (see `slip`)
                turns[-1] = {"text": turns[-1], "learn": False}
                turns.append(recovered(colour, shape, describe_any(look(wrong)), style, step, nxt))
    turns.append(said(f"None of the {colour} objects is the {colour} {shape}.", NO_ANSWER))
    return {"turns": turns, "answer": "none", "pattern": "failed"}


# The hasty teacher (collect.py --hasty N): where the explorer would check many candidates one by
# one (HASTY_CANDIDATES or more), a hasty searcher instead names one of them at random as the
# target, zooms on it, reads the character it shows and answers it, without checking the shape
# ("The character on it is 8."). It tries N times a question, each time in one of GUESSES'
# wordings, as a sampling VLM teacher would; the correctness filter keeps the lucky tries (the guess
# was the target, or a look-alike that carries the same character), beside the explorer's full
# search of the question. So the cold start holds the failure Mini-o3's RL corrects: answering
# before the search has found the target.
HASTY_CANDIDATES = 7
GUESSES = ("The {colour} {shape} is at {box}.", "The {colour} {shape} must be the one at {box}.",
           "I think the {colour} {shape} is at {box}.", "The {colour} {shape} looks like the one at {box}.")


def guesses(image: Image.Image, problem: str, budget, rng: random.Random, tries: int,
            style: str = "ledger") -> list[dict]:
    """`tries` hasty tries at one question, each a random candidate named as the target in one of
    GUESSES' wordings, one zoom on it, then the character it shows as the answer, unchecked. None for
    a question that is not understood or has fewer than HASTY_CANDIDATES candidates; a try whose crop
    shows no character is dropped. The overview is read once and each candidate's crop once."""
    goal = parse_question(problem)
    if goal is None or tries == 0:
        return []
    colour, shape = goal
    ep = Episode(image, budget)
    cells = sorted(blobs_by_cell(np.asarray(ep.shown[0]), colour))
    if len(cells) < HASTY_CANDIDATES:
        return []
    read: dict[int, str | None] = {}    # cell -> the character its crop shows (None: none readable)

    def glyph_in(cell: int) -> str | None:
        if cell not in read:
            _, shown = ep.apply(ep.parse(zoom_text(cell_box(cell))))
            arr = np.asarray(shown)
            obj = biggest_object(arr, colour)
            read[cell] = None if obj is None else read_glyph(arr, obj, colour)
        return read[cell]
    out = []
    for _ in range(tries):
        cell, wording = rng.choice(cells), rng.choice(GUESSES)
        box = cell_box(cell)
        claim = wording.format(colour=colour, shape=shape, box=fmt_box(box))
        glyph = glyph_in(cell)
        if glyph is not None:
            turns = [said(f"I am looking for the {colour} {shape}. {claim}", zoom_text(box)),
                     said(f"The character on it is {glyph}.", f"<answer>{glyph}</answer>")]
            out.append({"turns": turns, "answer": glyph, "pattern": "guess"})
    return out


QUARTERS = {"top-left": [0.0, 0.0, 0.5, 0.5], "top-right": [0.5, 0.0, 1.0, 0.5],
            "bottom-left": [0.0, 0.5, 0.5, 1.0], "bottom-right": [0.5, 0.5, 1.0, 1.0]}


def _depth_first(cells, colour, shape, intro, max_turns, check, look, style: str = "ledger") -> dict:
    """Zoom into the quarters that hold candidates (most first); in a quarter the shapes can be
    told apart, so zoom again only onto the one that matches, then read it."""
    def quarter(cell):
        r, c = divmod(cell, GRID)
        return ("top" if r < GRID // 2 else "bottom") + "-" + ("left" if c < GRID // 2 else "right")
    counts = Counter(quarter(c) for c in cells)
    order = [q for q, _ in counts.most_common()]
    turns = [said(intro + f" Most of them are in the {order[0]} quarter, so I look there first.",
                  zoom_text(QUARTERS[order[0]]))]
    for k, q in enumerate(order):
        x0, y0, _, _ = QUARTERS[q]
        arr = look(QUARTERS[q])
        hit = None
        half = GRID // 2   # a quarter holds half x half cells of the original grid
        for cell, mask in sorted(blobs_by_cell(arr, colour, 20, grid=half).items()):
            if shape_of(mask) == shape:
                r, c = divmod(cell, half)
                hit = int((y0 * GRID + r) * GRID + x0 * GRID + c)
                break
        if hit is not None and hit in cells:
            box = cell_box(hit)
            turns.append(said(f"Here the {colour} {shape} is at {fmt_box(box)}.", zoom_text(box)))
            got_shape, glyph = check(look(box))
            if got_shape == shape and glyph:
                turns.append(found(colour, shape, glyph, style))
                return {"turns": turns, "answer": glyph, "pattern": "depth_first"}
            break
        if k + 1 < len(order) and len(turns) < max_turns:
            thought = f"There is no {colour} {shape} in this quarter. I look at the {order[k + 1]} quarter."
            turns.append(said(thought, zoom_text(QUARTERS[order[k + 1]])))
    turns.append(said(f"I could not find the {colour} {shape}.", NO_ANSWER))
    return {"turns": turns, "answer": "none", "pattern": "failed"}
