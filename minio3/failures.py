"""Why a search failed, read from a trajectory record and the probe's hidden fields (the target's
box, every object's box and character): which outcome it had, whether the target was ever seen
readable, whether the search opened with a list of candidates, and what it did with each crop.
Counted from positions and boxes only, never from what the thoughts say about them. eval.py prints
and draws these; the report page shows them per trajectory."""
from __future__ import annotations

import re

import numpy as np
from PIL import Image, ImageDraw

from minio3 import report
from minio3.conversation import normalise
from minio3.data import atomic_path
from minio3.plots import font


READABLE_PX = 24      # an object counts as seen when a crop shows it at least this many pixels high


OUTCOMES = ["right", "named another object in view", "saw the target, answered wrong",
            "answered without seeing the target", "no answer", "turn too long", "out of turns",
            "out of context", "wrong (no target box)"]


_NUM = r"\s*(\d+(?:\.\d*)?|\.\d+)\s*"     # 1, 0.5, .5, 1. (never a lone "." a model may write)


_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def seen(box: list[float], crop: dict) -> bool:
    """Was the object with this pixel box (in the original) inside the crop, shown large enough to read?"""
    x0, y0, x1, y1 = crop["pixel_box"]
    inside = box[0] >= x0 and box[1] >= y0 and box[2] <= x1 and box[3] <= y1
    return inside and (box[3] - box[1]) * crop["shown"][1] / (y1 - y0) >= READABLE_PX


def listed_boxes(text: str) -> list[list[float]]:
    """The relative boxes a turn's thought lists ("The red objects: [0.125, ...], [...]"), calls excluded."""
    thought = text.split("<grounding>")[0]
    return [[float(v) for v in m.groups()] for m in _BOX.finditer(thought)]


def list_steps(t: dict) -> tuple[int, int]:
    """(turns whose thought lists boxes and then zooms, those that zoom on the list's first or last
    box): whether the search steps through the list it has just written (the opening list of
    candidates, a ledger of the boxes still to check), from its front or from its end (collect.py's
    `ledger` and `backward` thoughts). A chain step ("Next in the list: [checked], [next].") follows
    only when it zooms on its last box: its first is the box already checked."""
    listed = followed = 0
    for text in t["turn_texts"]:
        boxes, call = listed_boxes(text), text.split("<grounding>", 1)[1:]
        zoom = _BOX.search(call[0]) if call else None
        if boxes and zoom:
            listed += 1
            ends = (boxes[-1],) if "Next in the list:" in text.split("<grounding>")[0] else (boxes[0], boxes[-1])
            followed += [float(v) for v in zoom.groups()] in ends
    return listed, followed


def diagnose(t: dict) -> dict:
    """Why one trajectory ended as it did: `outcome`, one of OUTCOMES (the first that applies), and
    flags: was the target ever seen readable, did the search open with a list of candidates (two
    boxes or more in its first thought; else a direct guess, one box) and did that list hold the
    target, how many zooms repeated an earlier box, how many calls were invalid."""
    target, crops = t.get("target_bbox"), t["crops"]
    saw = target is not None and any(seen(target, c) for c in crops)
    objects = t.get("objects") or []
    in_view = [o for o in objects if o["box"] != target and any(seen(o["box"], c) for c in crops)]
    answer = normalise(t["answer"]) if t["answer"] is not None else None
    named_other = any(answer == normalise(o["glyph"]) for o in in_view)
    listed = listed_boxes(t["turn_texts"][0]) if t["turn_texts"] else []
    has_target = None
    if listed and target is not None and t.get("image_size"):
        w, h = t["image_size"]
        cx, cy = (target[0] + target[2]) / 2 / w, (target[1] + target[3]) / 2 / h
        has_target = any(b[0] <= cx <= b[2] and b[1] <= cy <= b[3] for b in listed)
    boxes = [tuple(c["pixel_box"]) for c in crops]
    verdicts = crop_verdicts(t)
    if t["correct"]:
        outcome = "right"
    elif t["exceeded"]:
        outcome = "out of context" if t.get("over_length") else "out of turns"
    elif t["truncated"]:
        outcome = "turn too long"
    elif not t["answered"]:
        outcome = "no answer"
    elif target is None:
        outcome = "wrong (no target box)"
    else:
        outcome = ("named another object in view" if named_other else "saw the target, answered wrong" if saw
                   else "answered without seeing the target")
    listed_turns, followed = list_steps(t)
    return {"outcome": outcome, "saw_target": saw, "opens_with_list": len(listed) >= 2,
            "answered_unseen": bool(t["answered"] and target is not None and not saw),
            "list_has_target": has_target,
            "repeated_zooms": len(boxes) - len(set(boxes)), "invalid_calls": t["tool_errors"],
            "listed_turns": listed_turns, "followed": followed, **verdicts}


def crop_verdicts(t: dict) -> dict:
    """The search's verdict on each crop that shows one candidate readable: the target alone, or
    look-alikes (objects of the target's colour) without it. A crop is *accepted* when the search
    answers right after it (it is the last crop of an answered search), else passed by. Counted
    from positions and boxes only, whatever the thoughts say."""
    target, objects = t.get("target_bbox"), t.get("objects") or []
    out = {"target_crops": 0, "target_accepted": 0, "lookalike_crops": 0, "lookalike_accepted": 0}
    asked = next((o for o in objects if o["box"] == target), None)
    if asked is None:
        return out
    lookalikes = [o for o in objects if o["colour"] == asked["colour"] and o["box"] != target]
    for i, c in enumerate(t["crops"]):
        accepted = int(t["answered"] and i == len(t["crops"]) - 1)
        shows_target, shows_other = seen(target, c), any(seen(o["box"], c) for o in lookalikes)
        if shows_target and not shows_other:
            out["target_crops"] += 1
            out["target_accepted"] += accepted
        elif shows_other and not shows_target:
            out["lookalike_crops"] += 1
            out["lookalike_accepted"] += accepted
    return out


def failure_table(trajs: list[dict]) -> dict:
    """Per difficulty (and "all"): the share of each outcome, and the flags' rates."""
    every = [diagnose(t) for t in trajs]
    groups = {d: [x for x, t in zip(every, trajs) if t["difficulty"] == d]
              for d in sorted({t["difficulty"] for t in trajs})}
    out = {}
    for d, ds in {**groups, "all": every}.items():
        listed = [x["list_has_target"] for x in ds if x["list_has_target"] is not None]
        shares = {o: sum(x["outcome"] == o for x in ds) / len(ds) for o in OUTCOMES}
        out[d] = {"n": len(ds), "outcomes": shares,
                  "saw_target": float(np.mean([x["saw_target"] for x in ds])),
                  # the premature answer: answered (right or wrong) with no crop having shown the target
                  "answered_unseen": float(np.mean([x["answered_unseen"] for x in ds])),
                  "opens_with_list": float(np.mean([x["opens_with_list"] for x in ds])),
                  "list_has_target": float(np.mean(listed)) if listed else None,
                  "repeated_zooms": float(np.mean([x["repeated_zooms"] for x in ds])),
                  "invalid_calls": float(np.mean([x["invalid_calls"] > 0 for x in ds]))}
        n = sum(x["listed_turns"] for x in ds)   # zooms, per listing turn: the share on an end of its list
        out[d]["listed_turns"], out[d]["zoom_follows_list"] = n, sum(x["followed"] for x in ds) / n if n else None
        for kind in ("target", "lookalike"):   # verdicts, per crop: the share accepted
            n = sum(x[f"{kind}_crops"] for x in ds)
            out[d][f"{kind}_crops"] = n
            out[d][f"{kind}_accepted"] = sum(x[f"{kind}_accepted"] for x in ds) / n if n else None
    return out


def print_failures(table: dict):
    used = [o for o in OUTCOMES if any(r["outcomes"][o] for r in table.values())]
    print(f"\n{'why':36}" + "".join(f"{d:>9}" for d in table))
    for o in used:
        print(f"{o:36}" + "".join(f"{r['outcomes'][o]:9.2f}" for r in table.values()))
    for flag in report.FLAGS:
        cells = ["      -  " if r.get(flag) is None else f"{r[flag]:9.2f}" for r in table.values()]
        print(f"{flag.replace('_', ' '):36}" + "".join(cells))
    print("(answered unseen: answered, right or wrong, with no crop having shown the target readably;\n"
          " opens with list: the first thought lists two boxes or more, not one direct guess;\n"
          " zoom follows list: of the turns whose thought lists boxes, the share that zoom on its first\n"
          " or last box (the ledger steps from the front, the backward ledger from the end);\n"
          " target / lookalike accepted: of the crops showing the target alone / look-alikes alone, the share\n"
          " after which the search answered; crops: " + ", ".join(
              f"{d} {r['target_crops']}/{r['lookalike_crops']}" for d, r in table.items()) + ")")


def bar_chart(table: dict, path: Path, title: str):
    """One stacked bar per difficulty: the share of each outcome (drawn with PIL)."""
    used = [o for o in OUTCOMES if any(r["outcomes"][o] for r in table.values())]
    colours = [(44, 160, 44), (214, 39, 40), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194),
               (31, 119, 180), (23, 190, 207), (127, 127, 127)]
    W, H, L, T, bar = 760, 60 + 34 * len(table) + 20 * len(used), 110, 40, 22
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.font = font()
    d.text((L, 12), title, fill="black")
    span = W - L - 30
    for i, (name, r) in enumerate(table.items()):
        y, x = T + 34 * i, L
        d.text((8, y + 5), f"{name} ({r['n']})", fill="black")
        for o in used:
            w = r["outcomes"][o] * span
            d.rectangle([x, y, x + w, y + bar], fill=colours[OUTCOMES.index(o)])
            x += w
    for j, o in enumerate(used):
        y = T + 34 * len(table) + 20 * j
        d.rectangle([L, y + 2, L + 14, y + 14], fill=colours[OUTCOMES.index(o)])
        d.text((L + 22, y + 2), o, fill="black")
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
