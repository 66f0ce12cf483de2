"""Stage 2: supervised fine-tuning (and the tiny base model's perception pretraining).

    python sft.py                                   # cold-start SFT: runs/tiny/coldstart.jsonl -> runs/tiny/sft
    python sft.py --base --init tiny --out checkpoints/tiny-base    # pretrain the tiny base from scratch

Each trajectory is replayed through the same Episode and chunk encoder as the engine, so the
tokens trained on are exactly those the engine would produce for it. Only assistant tokens carry
a loss: the prompt, the observation turns and the image tokens are masked out, by position.
"""
from __future__ import annotations

import argparse
import collections
import math
import multiprocessing
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import make_probe
from common import (IM_END, PLAIN_SYSTEM_PROMPT, SYSTEM_PROMPT, Episode, append_jsonl, encode_chunk, grade,
                    image_token_count, load, load_image, prompt_text, read_jsonl, rope_positions, save_checkpoint,
                    seed_everything, tool_turn_text)
from infer import Engine, Sample


# ----------------------------------------------------------------------------------------------
# Trajectory -> tokens
# ----------------------------------------------------------------------------------------------
def render(image: Image.Image, problem: str, turns: list[str], processor, system: str = SYSTEM_PROMPT,
           closed: bool = True) -> dict:
    """Tokens of a whole conversation: `turns` are the assistant texts, in order.

    After every turn but the last, the turn's action is carried out exactly as the engine does it
    (a zoom adds an observation turn with the crop, an invalid call an error turn). The last turn
    ends with <|im_end|> when `closed` (the model's own end of message).
    Returns ids, a boolean mask of assistant tokens, and the images as shown to the model.
    """
    tok = processor.tokenizer
    episode = Episode(image, processor.budget)
    ids = encode_chunk(tok, prompt_text(problem, system), [image_token_count(episode.shown[0])])
    mask = [False] * len(ids)
    for i, text in enumerate(turns):
        piece = encode_chunk(tok, text)
        last = i == len(turns) - 1
        if last and closed:
            piece += [tok.convert_tokens_to_ids(IM_END)]
        ids += piece
        mask += [True] * len(piece)
        if last:
            break
        action = episode.parse(text)
        if action.kind not in ("zoom", "invalid"):
            raise ValueError(f"turn {i} of {len(turns)} has no tool call, so the episode would end there")
        user, new = episode.apply(action)
        piece = encode_chunk(tok, tool_turn_text(user), [image_token_count(new)] if new else [])
        ids += piece
        mask += [False] * len(piece)
    return {"ids": ids, "mask": mask, "shown": episode.shown, "crops": episode.crops}


def collate(samples: list[dict], processor, device, multiple: int = 32) -> dict:
    """Right-padded batch with M-RoPE positions; padding and non-assistant tokens get no loss.
    The length is rounded up to a multiple of `multiple`: on CPU, oneDNN compiles a kernel for
    every new matrix shape (milliseconds each), so shapes that repeat are much faster."""
    if "ids" not in samples[0]:   # images only (the base model's vision pretraining)
        pixel_values, grids = processor.pixels([im for s in samples for im in s["shown"]])
        return {"pixel_values": pixel_values.to(device), "image_grid_thw": grids.to(device),
                "aux": torch.cat([torch.as_tensor(s["aux"]) for s in samples]).to(device)}
    pad = processor.tokenizer.pad_token_id
    n = -(-max(len(s["ids"]) for s in samples) // multiple) * multiple
    ids = torch.full((len(samples), n), pad, dtype=torch.long)
    loss_mask = torch.zeros(len(samples), n, dtype=torch.bool)
    attn = torch.zeros(len(samples), n, dtype=torch.long)
    pos = torch.zeros(3, len(samples), n, dtype=torch.long)
    shown = [im for s in samples for im in s["shown"]]
    pixel_values, grids = processor.pixels(shown)
    g = 0
    for b, s in enumerate(samples):
        k = len(s["ids"])
        ids[b, :k] = torch.tensor(s["ids"])
        loss_mask[b, :k] = torch.tensor(s["mask"])
        attn[b, :k] = 1
        sample_grids = [tuple(x) for x in grids[g:g + len(s["shown"])].tolist()]
        g += len(s["shown"])
        pos[:, b, :k] = rope_positions(s["ids"], sample_grids, 0, processor.image_token_id, processor.merge)[0]
    batch = {"input_ids": ids.to(device), "attention_mask": attn.to(device), "position_ids": pos.to(device),
             "pixel_values": pixel_values.to(device), "image_grid_thw": grids.to(device),
             "loss_mask": loss_mask.to(device)}
    if all("aux" in s for s in samples):   # per-token targets, in the vision tower's output order
        batch["aux"] = torch.cat([torch.as_tensor(s["aux"]) for s in samples]).to(device)
    return batch


def token_logprobs(model, batch: dict) -> torch.Tensor:
    """log p(token t | tokens < t) for every position t >= 1 (position 0 gets 0): [B, L]."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], pixel_values=batch["pixel_values"],
                image_grid_thw=batch["image_grid_thw"])
    logits = out.logits[:, :-1].float()
    lp = torch.gather(F.log_softmax(logits, -1), 2, batch["input_ids"][:, 1:, None])[..., 0]
    return F.pad(lp, (1, 0))


# ----------------------------------------------------------------------------------------------
# Data: trajectories from a JSONL file, or the base perception curriculum drawn on the fly.
# ----------------------------------------------------------------------------------------------
BASE_CURRICULUM = [  # (first step, task weights). "sheet" and "scene" train the vision tower only.
    (0, {"sheet": 0.6, "scene": 0.4}),
    (1500, {"describe": 0.2, "read": 0.15, "locate": 0.2, "list": 0.15, "sheet": 0.15, "scene": 0.15}),
    (4000, {"describe": 0.15, "read": 0.1, "locate": 0.15, "list": 0.3, "find": 0.15, "sheet": 0.15}),
    (5400, {"describe": 0.1, "read": 0.1, "locate": 0.05, "list": 0.4, "find": 0.2, "sheet": 0.15}),
]
VISION_TASKS = ("sheet", "scene")
SEARCH_PROMPT_SHARE = 0.5


def base_batch(step: int, size: int, seed: int, processor, weights: dict | None = None) -> tuple[str, list[dict]]:
    """A micro-batch of one base task at one difficulty level (so image sizes, and with them the
    matrix shapes, repeat from batch to batch)."""
    weights = weights or [w for start, w in BASE_CURRICULUM if step >= start][-1]
    rng = np.random.default_rng([seed, step])
    task = str(rng.choice(list(weights), p=np.array(list(weights.values())) / sum(weights.values())))
    level = str(rng.choice(list(make_probe.LEVELS)))
    # half the language records carry the search protocol's long system prompt instead of the plain
    # one, so that grounding and reading survive that context (the SFT stage starts from it)
    system = SYSTEM_PROMPT if rng.random() < SEARCH_PROMPT_SHARE else PLAIN_SYSTEM_PROMPT
    out = []
    if task == "sheet":      # dense sheets of labelled objects: 4 x 4 a picture, so fewer pictures
        return task, [dict(zip(("shown", "aux"), ([im], lab))) for im, lab in
                      (make_probe.glyph_sheet(rng) for _ in range(max(1, size // 2)))]
    if task == "scene":
        return task, [dict(zip(("shown", "aux"), ([im], lab))) for im, lab in
                      (make_probe.labelled_overview(rng, level, processor.budget) for _ in range(size))]
    for _ in range(size):
        img, question, answer, meta = make_probe.base_sample(rng, task, processor.budget, level)
        out.append({**render(img, make_probe.ask(question), [answer], processor, system=system),
                    "aux": meta["tokens"]})
    return task, out


def aux_loss(head: torch.nn.Linear, feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Auxiliary per-token classification on the vision tower's output (base pretraining only):
    colour, shape and character of what each image token shows, and its grid row and column.
    Dense targets reach the small vision tower directly, instead of only through the few answer
    tokens; the head is thrown away afterwards and the model stays the stock architecture."""
    logits = head(feats.float()).split(make_probe.AUX_SIZES, dim=-1)
    judged = [j for j in range(len(logits)) if (labels[:, j] != -100).any()]   # (sheets have no grid position)
    return sum(F.cross_entropy(logits[j], labels[:, j], ignore_index=-100) for j in judged) / len(logits)


def trajectory_turns(row: dict) -> list[str]:
    return [t["text"] if isinstance(t, dict) else t for t in row["turns"]]


def epoch_order(rows: list[dict], size: int, rng: np.random.Generator) -> np.ndarray:
    """A shuffled epoch in which each batch holds trajectories of similar length (less padding):
    shuffle, sort within windows of 8 batches by length, then shuffle the batches."""
    length = np.array([sum(len(t) for t in trajectory_turns(r)) / 3 + 70 * len(r.get("turns", [])) if "turns" in r
                       else len(r["solution"]) for r in rows])
    order = rng.permutation(len(rows))
    windows = [order[i:i + 8 * size] for i in range(0, len(order), 8 * size)]
    order = np.concatenate([w[np.argsort(length[w], kind="stable")] for w in windows])
    batches = [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
    if len(batches) < 2:
        return order
    return np.concatenate([batches[j] for j in rng.permutation(len(batches))])


def file_batch(rows: list[dict], root: Path, step: int, size: int, seed: int, processor) -> list[dict]:
    per_epoch = max(1, len(rows) // size)
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(rows, size, np.random.default_rng([seed, epoch]))
    out = []
    for i in order[k * size:(k + 1) * size]:
        row = rows[int(i)]
        system = PLAIN_SYSTEM_PROMPT if row.get("system") == "plain" else SYSTEM_PROMPT
        turns = trajectory_turns(row) if "turns" in row else [row["solution"]]
        out.append(render(load_image(row, row.get("_root", root)), row["problem"], turns, processor, system=system))
    return out


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


_JOB: dict = {}   # what the data workers need; set before the pool forks, so nothing is pickled


def _make_micro(k: int) -> tuple[str | None, dict]:
    """Micro-batch number k, collated on the CPU. A pure function of k: workers can build any of them."""
    a, processor = _JOB["args"], _JOB["processor"]
    if a.base:
        task, samples = base_batch(k, a.batch, a.seed, processor, _JOB["weights"])
    else:
        task, samples = None, file_batch(_JOB["rows"], _JOB["root"], k, a.batch, a.seed, processor)
    return task, collate(samples, processor, "cpu")


def micro_batches(start: int, stop: int, workers: int):
    """Micro-batches start..stop-1 in order; with workers > 0 they are built ahead in other processes
    (a bounded window, so a fast producer cannot fill the memory). Drawing the synthetic pictures is
    what limits a GPU run; on 2 CPU cores the default (0) builds them in the training process."""
    if workers <= 0:
        yield from (_make_micro(k) for k in range(start, stop))
        return
    with multiprocessing.get_context("fork").Pool(workers, torch.set_num_threads, (1,)) as pool:
        pending, k = collections.deque(), start
        while k < stop or pending:
            while k < stop and len(pending) < 3 * workers:
                pending.append(pool.apply_async(_make_micro, (k,)))
                k += 1
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------
# Evaluation of base records: greedy decode, then per-task accuracy.
# ----------------------------------------------------------------------------------------------
def _boxes(text: str) -> list[list[float]]:
    import re
    return [[float(v) for v in m.split(",")] for m in re.findall(r"\[([0-9., ]+)\]", text)
            if len(m.split(",")) == 4]


def score_base(row: dict, pred: str) -> float:
    """read/describe/list: exact answer; locate/find: the box given contains the target's box."""
    pred = pred.strip()
    if row["task"] in ("locate", "find"):
        boxes = _boxes(pred)
        if not boxes:
            return 0.0
        (x0, y0, x1, y1), (t0, u0, t1, u1) = boxes[0], row["target_bbox"]
        return float(x0 <= t0 + 1e-3 and y0 <= u0 + 1e-3 and x1 >= t1 - 1e-3 and y1 >= u1 - 1e-3)
    return float(pred == row["solution"].strip())


@torch.no_grad()
def evaluate_base(model, processor, rows: list[dict], root: Path, max_new_tokens: int = 160) -> dict:
    engine = Engine(model, processor)
    samples = [Sample(image=load_image(r, root), question=r["problem"], system=PLAIN_SYSTEM_PROMPT) for r in rows]
    results = engine.run(samples, max_turns=1, greedy=True, max_turn_tokens=max_new_tokens, progress=False)
    per: dict[str, list[float]] = {}
    for r, res in zip(rows, results):
        per.setdefault(r["task"], []).append(score_base(r, res.turn_texts[0].replace(IM_END, "")))
    return {t: float(np.mean(v)) for t, v in sorted(per.items())}


@torch.no_grad()
def evaluate_search(model, processor, rows: list[dict], root: Path, max_turns: int = 6) -> dict:
    """Probe questions rolled out greedily with the search protocol: accuracy per difficulty, mean turns."""
    samples = [Sample(image=load_image(r, root), question=r["problem"]) for r in rows]
    results = Engine(model, processor).run(samples, max_turns=max_turns, greedy=True, progress=False)
    per: dict[str, list[float]] = {}
    for r, res in zip(rows, results):
        per.setdefault(r.get("difficulty", "all"), []).append(grade(res.answer, r))
    acc = {d: float(np.mean(v)) for d, v in sorted(per.items())}
    acc["all"] = float(np.mean([v for vs in per.values() for v in vs]))
    acc["turns"] = float(np.mean([res.turns for res in results]))
    return acc


def plot_curves(log: Path, out: Path):
    """Held-out accuracy per task against the training step, from the run's log."""
    from eval import line_plot
    evals = {}
    for r in read_jsonl(log):
        if "eval" in r:
            evals[r["step"]] = r["eval"]   # a resumed run logs a step again: the last one counts
    series: dict[str, dict[str, float]] = {}
    for step, acc in sorted(evals.items()):
        for task, v in acc.items():
            series.setdefault(task, {})[str(step)] = v
    if series:
        line_plot(series, out, f"held-out accuracy by step ({log.name})", xlabel="step")


# ----------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["runs/tiny/coldstart.jsonl"],
                    help="trajectories (JSONL) to train on; base records (make_probe --base) may be mixed in")
    ap.add_argument("--base", action="store_true", help="train on the base perception curriculum, drawn on the fly")
    ap.add_argument("--init", default="tiny-base", help="'tiny' (random), 'tiny-base', or a checkpoint folder")
    ap.add_argument("--out", default="runs/tiny/sft")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--accum", type=int, default=1, help="gradient accumulation (micro-batches per step)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--vision-lr", type=float, default=None, help="learning rate of vision tower + merger")
    ap.add_argument("--warmup", type=float, default=0.05, help="warmup, as a fraction of --steps")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--train-vision", action="store_true", help="also train the vision tower (frozen by default)")
    ap.add_argument("--aux", type=float, default=1.0, help="weight of the base mode's auxiliary per-token loss (0: off)")
    ap.add_argument("--tasks", default=None, help="base task weights, e.g. read:1,locate:2 (default: the curriculum)")
    ap.add_argument("--eval-data", default=None, help="held-out records to score every --eval-every steps")
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-n", type=int, default=150)
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="processes that build batches ahead (GPU runs)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    state_file = out / "trainer_state.pt"
    resume = args.resume and state_file.exists()
    seed_everything(args.seed)
    model, processor = load(str(out) if resume else args.init, device=device)
    model.train()
    train_vision = args.train_vision or args.base
    for p in model.model.visual.parameters():
        p.requires_grad_(train_vision)
    vision = [p for p in model.model.visual.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.visual.")]
    groups = [{"params": rest, "lr": args.lr}]
    if vision:
        groups.append({"params": vision, "lr": args.vision_lr or args.lr})
    head, captured = None, {}
    if args.base and args.aux > 0:
        head = torch.nn.Linear(model.config.vision_config.out_hidden_size, sum(make_probe.AUX_SIZES)).to(device)
        groups.append({"params": list(head.parameters()), "lr": args.vision_lr or args.lr})
        model.model.visual.register_forward_hook(lambda m, i, o: captured.__setitem__("feats", o.pooler_output))
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    step = 0
    if resume:
        state = torch.load(state_file, weights_only=False)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if head is not None and "aux_head" in state:
            head.load_state_dict(state["aux_head"])
        print(f"resumed from {out} at step {step}")
    rows, root = [], None
    if not args.base:
        for f in args.data:     # several files mix; each row's images are relative to its own file
            rows += [{**r, "_root": str(Path(f).parent)} for r in read_jsonl(f)]
            print(f"{len(rows)} records after {f}")
    eval_rows = read_jsonl(args.eval_data) if args.eval_data else []
    eval_rows = eval_rows[:: max(1, len(eval_rows) // args.eval_n)][: args.eval_n]   # spread over the file's splits
    weights = {k: float(v) for k, v in (p.split(":") for p in args.tasks.split(","))} if args.tasks else None
    if weights:
        eval_rows = [r for r in eval_rows if r.get("task") in weights]
    log = out.parent / (out.name + "_log.jsonl")
    use_amp = device == "cuda"

    def checkpoint():
        save_checkpoint(model, processor, out, {"trainer_state.pt": {
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
            "torch_rng": torch.get_rng_state(), "args": vars(args),
            **({"aux_head": head.state_dict()} if head is not None else {})}})

    _JOB.update(args=args, processor=processor, weights=weights, rows=rows, root=root)
    data = micro_batches(step * args.accum, args.steps * args.accum, args.workers)
    bar = tqdm(total=args.steps, initial=step, desc="sft", dynamic_ncols=True)
    t0, tokens = time.time(), 0
    while step < args.steps:
        opt.zero_grad(set_to_none=True)
        total_loss, total_tokens = 0.0, 0
        micro, task = [], None
        for _ in range(args.accum):
            task, batch = next(data)
            micro.append(_to(batch, device))
        n_tok = max(1, sum(int(b["loss_mask"][:, 1:].sum()) for b in micro if "loss_mask" in b))
        for batch in micro:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                if "input_ids" in batch:
                    lp = token_logprobs(model, batch)
                    loss = -(lp * batch["loss_mask"].float()).sum() / n_tok
                else:            # a vision-only batch: the auxiliary loss alone
                    model.model.visual(batch["pixel_values"], grid_thw=batch["image_grid_thw"])
                    loss = torch.zeros((), device=device)
            if head is not None and "aux" in batch:
                loss = loss + args.aux * aux_loss(head, captured["feats"], batch["aux"]) / len(micro)
            if not torch.isfinite(loss):
                bar.close()
                last = torch.load(state_file, weights_only=False)["step"] if state_file.exists() else None
                raise SystemExit(f"step {step + 1}: the loss is {loss.item()}; stopping. The last good checkpoint "
                                 f"is {out} (step {last})." if last is not None else
                                 f"step {step + 1}: the loss is {loss.item()}; stopping before any checkpoint was saved.")
            loss.backward()
            total_loss += loss.item()
            total_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        sched.step()
        step += 1
        tokens += total_tokens
        rate = tokens / (time.time() - t0)
        bar.set_postfix(loss=f"{total_loss:.3f}", tok_s=f"{rate:.0f}")
        bar.update(1)
        record = {"step": step, "task": task, "loss": total_loss, "grad_norm": float(gnorm), "lr": sched.get_last_lr()[0],
                  "tokens_per_s": rate, "time": time.time()}
        if eval_rows and (step % args.eval_every == 0 or step == args.steps):
            model.eval()
            evaluate = evaluate_base if args.base else evaluate_search
            acc = evaluate(model, processor, eval_rows, Path(args.eval_data).parent)
            model.train()
            record["eval"] = acc
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        append_jsonl(log, record)
        if "eval" in record:
            plot_curves(log, log.with_suffix(".png"))
        if step % args.save_every == 0 or step == args.steps:
            checkpoint()
    bar.close()
    print(f"saved {out} after {step} steps")


if __name__ == "__main__":
    main()
