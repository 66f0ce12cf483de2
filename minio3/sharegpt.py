"""Trajectories in the ShareGPT format that LLaMA-Factory trains on and the official cold-start data
uses: a JSON list of {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...],
"images": [path, ...]}, each "<image>" in a human turn taking the next image of the list.

  * `export(rows, out, budget, protocol)`: this project's trajectory records (collect.py's output)
    replayed through the crop tool; every crop saved as a PNG beside the JSON (lossless, full
    resolution), so a trainer sees exactly the images our engine would show.
  * `read(path)` checks a ShareGPT file (structure, roles, image count, image files) before any
    work (a `conversations` field kept as text, as in the raw dataset, is parsed, never evaluated); `tokens(record, processor)` renders one into ids and a loss mask exactly as
    common.render renders the same trajectory: the assistant's text is trained, and the
    <|im_end|> that closes a turn stopped at </grounding> is not (the environment writes it).
  * A turn replayed without a loss (collect.py's slips, {"text", "learn": false} in our records)
    is written as a gpt message with "loss": false, which `tokens` honours. LLaMA-Factory as
    released ignores that key and trains every gpt message (per-message loss is an open proposal
    there), so `export` says how many such turns a file holds.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path

from tqdm import tqdm

from minio3.conversation import (Episode, IM_END, IM_START, PLAIN_SYSTEM_PROMPT, encode_chunk, has_special, image_token_count,
                    tool_turn_text)
from minio3.data import InputError, atomic_path, check_image, image_path, load_image, load_json, turn_text
from minio3.protocol import DEFAULT, IMAGE, Protocol, neutralise

TAG = "<image>"   # LLaMA-Factory's image placeholder in a message


def _unlearned(turn) -> bool:
    return isinstance(turn, dict) and not turn.get("learn", True)


def _conversation(image, problem: str, turns: list, budget, protocol: Protocol):
    """The messages of one trajectory and its images at full resolution (the original first)."""
    ep = Episode(image, budget, protocol)
    question = problem if TAG in problem else TAG + "\n" + problem
    msgs = [{"from": "system", "value": protocol.system}, {"from": "human", "value": question}]
    for i, turn in enumerate(turns):
        text = turn_text(turn)
        msgs.append({"from": "gpt", "value": text, **({"loss": False} if _unlearned(turn) else {})})
        if i == len(turns) - 1:
            break
        action = ep.parse(text)
        if action.kind not in ("zoom", "invalid"):
            raise InputError(f"turn {i} of {len(turns)} has no tool call, so the episode would end there")
        user, _ = ep.apply(action)
        msgs.append({"from": "human", "value": user.replace(IMAGE, TAG)})
    return msgs, ep.images


def export(rows: list[dict], out: str | os.PathLike, budget, protocol: Protocol = DEFAULT) -> int:
    """Write `rows` (records with images, problem, turns; image paths absolute or relative to
    `row['_root']`) as a ShareGPT JSON file; crops go to <out stem>_images/. Returns the count."""
    out = Path(out)
    folder = out.parent / (out.stem + "_images")
    folder.mkdir(parents=True, exist_ok=True)
    records, unlearned = [], 0
    for k, row in enumerate(tqdm(rows, desc="sharegpt", dynamic_ncols=True, leave=False)):
        unlearned += sum(_unlearned(t) for t in row["turns"])
        try:
            msgs, images = _conversation(load_image(row, row.get("_root", ".")), row["problem"], row["turns"],
                                         budget, protocol)
        except InputError as e:
            raise InputError(f"record {row.get('doc_id', k)}: {e}") from None
        original = image_path(row, row.get("_root", "."))     # absolute unless beside the JSON
        paths = [original.relative_to(out.parent.resolve()).as_posix()
                 if original.is_relative_to(out.parent.resolve()) else str(original)]
        for j, crop in enumerate(images[1:], 1):
            name = folder / f"{k:05d}_observation_{j}.png"
            crop.save(name)
            paths.append(f"{folder.name}/{name.name}")
        records.append({"conversations": msgs, "images": paths,
                        **{key: row[key] for key in ("doc_id", "solution") if key in row}})
    with atomic_path(out) as tmp:       # the JSON last: it never names an image not yet written
        tmp.write_text(json.dumps(records, indent=1))
    if unlearned:
        print(f"{out}: {unlearned} turns written with \"loss\": false (replayed without a loss here; "
              "LLaMA-Factory as released trains on them)")
    return len(records)


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
MAX_FIELD_CHARS = 2_000_000


def _parse_field(text: str):
    """A field stored as text (the raw cold-start dataset keeps `conversations` as the repr of a
    Python list, which the official script evaluates): parsed as JSON or as a Python literal,
    never run. None if it is neither."""
    if len(text) > MAX_FIELD_CHARS:
        return None
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _check_record(rec, root: Path) -> str | None:
    if not isinstance(rec, dict):
        return "a record must be a JSON object"
    if isinstance(rec.get("conversations"), str):
        rec["conversations"] = _parse_field(rec["conversations"])
        if rec["conversations"] is None:
            return "field 'conversations' is text that is neither JSON nor a Python literal"
    msgs, images = rec.get("conversations"), rec.get("images")
    if not isinstance(msgs, list) or not msgs:
        return "field 'conversations' must be a non-empty list"
    if not isinstance(images, list) or not images or not all(isinstance(p, str) and p for p in images):
        return "field 'images' must be a non-empty list of paths"
    roles = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("from") not in ("system", "human", "gpt") \
                or not isinstance(m.get("value"), str):
            return f"conversations[{j}] must be {{'from': system|human|gpt, 'value': text}}"
        if not isinstance(m.get("loss", True), bool):
            return f"conversations[{j}]: 'loss' must be true or false"
        roles.append(m["from"])
    body = roles[1:] if roles[0] == "system" else roles
    if not body or body[-1] != "gpt" or any(r != ("human" if i % 2 == 0 else "gpt") for i, r in enumerate(body)):
        return f"roles must be [system], human, gpt, human, gpt, ..., gpt; got {', '.join(roles)}"
    for j, m in enumerate(msgs):
        if m["from"] == "gpt" and (has_special(m["value"]) or TAG in m["value"]):
            return f"conversations[{j}] (gpt) holds a special token or {TAG}"
    tags = sum(m["value"].count(TAG) + m["value"].count(IMAGE) for m in msgs if m["from"] == "human")
    if tags != len(images):
        return f"the human turns hold {tags} images but 'images' lists {len(images)}"
    for p in images:
        try:
            problem = check_image(image_path({"images": [p]}, root))
        except InputError as e:
            problem = str(e)
        if problem:
            return problem
    return None


def read(path: str | os.PathLike) -> list[dict]:
    """The records of a ShareGPT JSON file, all checked first; image paths are absolute or relative
    to the file's folder. Each row gets `_root` (that folder)."""
    path = Path(path)
    records = load_json(path, list, "a ShareGPT file is a JSON list of records")
    if not records:
        raise InputError(f"{path}: a ShareGPT file is a non-empty JSON list of records")
    for k, rec in enumerate(records):
        problem = _check_record(rec, path.parent)
        if problem:
            raise InputError(f"{path}: record {k}: {problem}")
    return [{**rec, "_root": str(path.parent)} for rec in records]


def is_sharegpt(path: str | os.PathLike) -> bool:
    """A .json file (ShareGPT) rather than a .jsonl file of this project's records."""
    return Path(path).suffix == ".json"


def _user(value: str) -> str:
    """A human turn as our prompts write it: <image> tags become image blocks, any other special
    token is neutralised."""
    return neutralise(value.replace(IMAGE, TAG)).replace(TAG, IMAGE)


def tokens(rec: dict, processor, max_tokens: int | None = None) -> dict:
    """ids, loss mask and shown images of one ShareGPT record (see the module's docstring)."""
    tok, budget = processor.tokenizer, processor.budget
    msgs = rec["conversations"]
    system = msgs[0]["value"] if msgs[0]["from"] == "system" else PLAIN_SYSTEM_PROMPT
    msgs = msgs[1:] if msgs[0]["from"] == "system" else msgs
    shown = [budget.resize(load_image({"images": [p], "doc_id": rec.get("doc_id", "?")}, rec["_root"]))
             for p in rec["images"]]
    counts = [image_token_count(im) for im in shown]
    first = _user(msgs[0]["value"])
    n = first.count(IMAGE)
    text = f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{first}{IM_END}\n{IM_START}assistant\n"
    ids = encode_chunk(tok, text, counts[:n])
    mask = [False] * len(ids)
    for j in range(1, len(msgs), 2):
        piece = encode_chunk(tok, msgs[j]["value"])
        if j == len(msgs) - 1:
            piece += [tok.convert_tokens_to_ids(IM_END)]
        ids += piece
        mask += [msgs[j].get("loss", True)] * len(piece)
        if j + 1 < len(msgs):
            user = _user(msgs[j + 1]["value"])
            k = user.count(IMAGE)
            piece = encode_chunk(tok, tool_turn_text(user), counts[n:n + k])
            n += k
            ids += piece
            mask += [False] * len(piece)
    if max_tokens is not None and len(ids) > max_tokens:
        raise InputError(f"a ShareGPT conversation has {len(ids)} tokens (at most {max_tokens})")
    return {"ids": ids, "mask": mask, "shown": shown}

