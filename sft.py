"""Stage 2: supervised fine-tuning on the cold-start trajectories.

    python sft.py                                   # runs/tiny/coldstart.jsonl -> runs/tiny/sft
    python sft.py --data runs/tiny/coldstart.jsonl --init tiny-base --out runs/tiny/sft --steps 240 --batch 8

Reads: trajectories (JSONL from collect.py; base records from `base.py --write-data` may be mixed
in) and the checkpoint to start from (--init). Writes: the fine-tuned model to --out (a checkpoint
folder, with trainer_state.pt for --resume), one line per step to <out>_log.jsonl, and with
--eval-data the held-out curve to <out>_log.png.

Each trajectory is replayed through the same Episode and chunk encoder as the engine (`render`),
so the tokens trained on are exactly those the engine would produce for it. Only assistant tokens
carry a loss: the prompt, the observation turns and the image tokens are masked out, by position.
`train` is the loop itself (AdamW, warmup + cosine, accumulation, clipping, checkpoints, resume,
a NaN stop); the tiny base's pretraining (base.py) runs through the same loop.
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
from tqdm import tqdm

import parallel
import sharegpt
from common import PLAIN_SYSTEM_PROMPT, SYSTEM_PROMPT, VERDICT_STYLES, encode_chunk, grade, prompt_text, render
from data import (InputError, NONNEGATIVE, NONNEGATIVE_FLOAT, POSITIVE, RATE, SHARE, append_jsonl, load_image,
                  main_cli, read_jsonl, read_records, turn_text)
from drills import ledger_drill, look_drills, verdict_drill
from eval import line_plot
from infer import Engine, Sample, Settings
from parallel import World
from protocol import DEFAULT, Protocol, add_protocol_args, apply_pixels, parse_with_preset, protocol_from_args
from model import (by_length, check_finite, collate, seed_everything, start_run,
                   token_logprobs)


# ----------------------------------------------------------------------------------------------
# The loss: cross-entropy on the assistant's tokens only
# ----------------------------------------------------------------------------------------------
def sft_loss(model, batch: dict, n_tokens: int, n_micro: int) -> torch.Tensor:
    """Minus the log-likelihood of the labelled tokens, as a mean over all labelled tokens of the
    step (`n_tokens`, counted over every micro-batch of a gradient-accumulation step). A batch of
    verdict drills (marked `drill`, which holds their weight) is a mean of its own, weighted and
    added: its few labelled tokens would otherwise weigh next to nothing beside the trajectories'."""
    lp = token_logprobs(model, batch)                     # [B, L]: log p(token t | tokens < t)
    mask = batch["loss_mask"].float()
    if "drill" in batch:   # batch["drill"]: the drills' weight
        return -batch["drill"] * (lp * mask).sum() / mask.sum().clamp(min=1.0)
    return -(lp * mask).sum() / n_tokens


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


# ----------------------------------------------------------------------------------------------
# Data: trajectories from JSONL files, in length-grouped batches
# ----------------------------------------------------------------------------------------------
def trajectory_turns(row: dict) -> list[str]:
    return [turn_text(t) for t in row["turns"]]


def read_trajectories(files: list[str]) -> list[dict]:
    """Rows of several files, all checked before training (a trajectory has `turns`, a base record
    a `solution`; a .json file is ShareGPT, e.g. the official cold-start data); each row's images
    are relative to its own file's folder."""
    rows = []
    for f in files:
        if sharegpt.is_sharegpt(f):
            rows += sharegpt.read(f)
        else:
            rows += [{**r, "_root": str(Path(f).parent)} for r in read_records(f, ("images", "problem",
                                                                                    ("turns", "solution")))]
        print(f"{len(rows)} records after {f}")
    return rows


def text_length(row: dict) -> float:
    """A rough token count: about 3 characters a token, ~70 tokens for each turn's image."""
    if "conversations" in row:
        return sum(len(m["value"]) for m in row["conversations"]) / 3 + 70 * len(row["images"])
    if "turns" in row:
        return sum(len(t) for t in trajectory_turns(row)) / 3 + 70 * len(row["turns"])
    return len(row["solution"])


def epoch_order(rows: list[dict], size: int, rng: np.random.Generator) -> np.ndarray:
    """A shuffled epoch in which each batch holds trajectories of similar length (less padding):
    shuffle, sort within windows of 8 batches by length, then shuffle the batches."""
    length = np.array([text_length(r) for r in rows])
    order = rng.permutation(len(rows))
    windows = [order[i:i + 8 * size] for i in range(0, len(order), 8 * size)]
    order = np.concatenate([w[np.argsort(length[w], kind="stable")] for w in windows])
    batches = [order[i:i + size] for i in range(0, len(order) - size + 1, size)]
    if len(batches) < 2:
        return order
    return np.concatenate([batches[j] for j in rng.permutation(len(batches))])


def file_batch(rows: list[dict], step: int, size: int, seed: int, processor, max_tokens: int | None = None,
               protocol: Protocol = DEFAULT, part: tuple[int, int] = (0, 1)):
    """Batch number `step` of the epoch it falls in, rendered into tokens. A record with `turns` is
    a trajectory (replayed under `protocol`), one with `conversations` a ShareGPT record (its own
    texts); one with neither (a base record) is one turn answering with its solution. `part` =
    (rank, ranks): only this rank's share, every ranks-th sample; a rank left without one gets
    the batch's first sample with no token to learn from (it must still take part in the step)."""
    per_epoch = max(1, len(rows) // size)
    epoch, k = divmod(step, per_epoch)
    order = epoch_order(rows, size, np.random.default_rng([seed, epoch]))
    batch = order[k * size:(k + 1) * size]
    mine = batch[part[0]::part[1]]
    out = [_render_row(rows, int(i), processor, max_tokens, protocol) for i in (mine if len(mine) else batch[:1])]
    if not len(mine):
        out[0]["mask"] = [False] * len(out[0]["mask"])
    return out


def _render_row(rows: list[dict], i: int, processor, max_tokens: int | None, protocol: Protocol) -> dict:
    row = rows[i]
    if "conversations" in row:
        return sharegpt.tokens(row, processor, max_tokens)
    system = PLAIN_SYSTEM_PROMPT if row.get("system") == "plain" else protocol.system
    turns = trajectory_turns(row) if "turns" in row else [row["solution"]]
    unlearned = {k for k, t in enumerate(row.get("turns", [])) if isinstance(t, dict) and t.get("learn") is False}
    try:
        return render(load_image(row, row["_root"]), row["problem"], turns, processor, system=system,
                      max_tokens=max_tokens, protocol=protocol, unlearned=unlearned)
    except InputError as e:
        raise InputError(f"record {row.get('doc_id', i)}: {e}") from None


_JOB: dict = {}   # the micro-batch maker; set before the pool forks, so nothing is pickled


def _make_micro(k: int):
    return _JOB["make"](k)


def micro_batches(make, start: int, stop: int, workers: int):
    """make(k) for k = start..stop-1, in order: `make` is a pure function of k (a micro-batch,
    collated on the CPU), so with workers > 0 they are built ahead in other processes (a bounded
    window, so a fast producer cannot fill the memory). Drawing the synthetic pictures is what
    limits a GPU run; on 2 CPU cores the default (0) builds them in the training process."""
    if workers <= 0:
        yield from (make(k) for k in range(start, stop))
        return
    _JOB["make"] = make
    with multiprocessing.get_context("fork").Pool(workers, torch.set_num_threads, (1,)) as pool:
        pending, k = collections.deque(), start
        while k < stop or pending:
            while k < stop and len(pending) < 3 * workers:
                pending.append(pool.apply_async(_make_micro, (k,)))
                k += 1
            yield pending.popleft().get()


# ----------------------------------------------------------------------------------------------
# Held-out evaluation and its curve
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_search(model, processor, rows: list[dict], root: Path, max_turns: int = 6,
                    protocol: Protocol = DEFAULT) -> dict:
    """Probe questions rolled out greedily with the search protocol: accuracy per difficulty, mean turns."""
    samples = [Sample(image=load_image(r, root), question=r["problem"]) for r in rows]
    settings = Settings(max_turns=max_turns, greedy=True, protocol=protocol)
    results = Engine(model, processor).run(samples, settings, progress=False)
    per: dict[str, list[float]] = {}
    for r, res in zip(rows, results):
        per.setdefault(r.get("difficulty", "all"), []).append(grade(res.answer, r))
    acc = {d: float(np.mean(v)) for d, v in sorted(per.items())}
    acc["all"] = float(np.mean([v for vs in per.values() for v in vs]))
    acc["turns"] = float(np.mean([res.turns for res in results]))
    return acc


def plot_curves(log: Path, out: Path):
    """Held-out accuracy per task against the training step, from the run's log."""
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


def spread(rows: list[dict], n: int) -> list[dict]:
    """n rows taken evenly over the file (so every split and task of it is represented)."""
    return rows[:: max(1, len(rows) // n)][:n]


def read_held_out(path: str | None, n: int, need) -> list[dict]:
    """--eval-data's records (checked), n of them spread over the file; none without the flag."""
    return spread(read_records(path, need), n) if path else []


# ----------------------------------------------------------------------------------------------
# The trainer (sft.py and base.py)
# ----------------------------------------------------------------------------------------------
def optimizer(model, args, extras: dict):
    """AdamW over the trainable weights (the vision tower and `extras` at --vision-lr if given),
    with linear warmup then cosine decay to 0 at --steps."""
    vision = [p for p in model.model.visual.parameters() if p.requires_grad]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("model.visual.")]
    groups = [{"params": rest, "lr": args.lr}]
    if vision:
        groups.append({"params": vision, "lr": args.vision_lr or args.lr})
    for module in extras.values():
        groups.append({"params": list(module.parameters()), "lr": args.vision_lr or args.lr})
    opt = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.01)
    warm = max(1, int(args.warmup * args.steps))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    return opt, sched


def train_step(model, micro: list[dict], loss_fn, step: int, out: Path,
               precision: str = "auto", world: World = World()) -> tuple[float, int]:
    """Forward and backward over the micro-batches of one optimizer step (gradients accumulate).
    Returns the summed loss and the number of tokens seen. Under `precision` bf16 (auto: on CUDA)
    the matrix work runs in bfloat16 under autocast while the weights and AdamW's state stay float32.
    Under torchrun the token count is summed over the ranks and divided by their number (FSDP
    averages the gradients), so the step equals one process that saw every rank's samples."""
    n_tok = sum(int(b["loss_mask"][:, 1:].sum()) for b in micro if "loss_mask" in b and "drill" not in b)
    n_tok = max(1.0, world.sum(n_tok)) / world.size
    total_loss, total_tokens = 0.0, 0
    for batch in micro:
        with parallel.autocast(model, precision):
            loss = loss_fn(model, batch, n_tok, len(micro))
        check_finite(loss, step + 1, out)
        loss.backward()
        total_loss += loss.item()
        total_tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
    return world.sum(total_loss) / world.size, int(world.sum(total_tokens))


def resume_state(state: dict, model, opt, sched, extras: dict, out: Path, world: World) -> int:
    """Put a checkpoint's optimizer, schedule, RNG and extra modules back; returns its step."""
    parallel.load_optimizer(model, opt, out, state, world)
    sched.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    for name, module in extras.items():
        module.load_state_dict(state[name])
    return state["step"]


def _listed(batch) -> list[dict]:
    return batch if isinstance(batch, list) else [batch]


def train(args, model, processor, state: dict | None, make_micro, loss_fn=sft_loss, evaluate=None,
          extras: dict | None = None, world: World | None = None):
    """The loop: `make_micro(k)` gives (task name or None, micro-batch k, or a list of batches
    that count as one micro-batch; under torchrun this rank's share of it),
    `loss_fn(model, batch, n_tokens, n_micro)` its loss, `evaluate(model)` a dict of held-out
    figures every --eval-every steps; `extras` are modules trained alongside the
    model (saved in trainer_state.pt). Rank 0 logs and shows progress."""
    extras, out, device = extras or {}, Path(args.out), next(model.parameters()).device
    world = world or World(device=str(device))
    model.train()
    opt, sched = optimizer(model, args, extras)
    step = resume_state(state, model, opt, sched, extras, out, world) if state else 0
    log = out.parent / (out.name + "_log.jsonl")
    data = micro_batches(make_micro, step * args.accum, args.steps * args.accum, args.workers)
    bar = tqdm(total=args.steps, initial=step, desc="sft", dynamic_ncols=True, disable=not world.main)
    t0, tokens = time.time(), 0
    while step < args.steps:
        opt.zero_grad(set_to_none=True)
        micro = [next(data) for _ in range(args.accum)]
        batches = [{k: v.to(device) for k, v in b.items()} for _, mb in micro for b in _listed(mb)]
        loss, n = train_step(model, batches, loss_fn, step, out, args.precision, world)
        gnorm = parallel.grad_norm(model, args.clip)
        opt.step()
        sched.step()
        step, tokens = step + 1, tokens + n
        rate = tokens / (time.time() - t0)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:.0f}")
        bar.update(1)
        record = {"step": step, "task": micro[-1][0], "loss": loss, "grad_norm": gnorm,
                  "lr": sched.get_last_lr()[0], "tokens_per_s": rate, "time": time.time()}
        if parallel.peak_memory_gb(world) is not None:
            record["max_memory_GB"] = parallel.peak_memory_gb(world)
        if evaluate and (step % args.eval_every == 0 or step == args.steps):
            model.eval()
            record["eval"] = evaluate(model)
            model.train()
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in record["eval"].items()))
        if world.main:
            append_jsonl(log, record)
            if "eval" in record:
                plot_curves(log, log.with_suffix(".png"))
        if step % args.save_every == 0 or step == args.steps:
            parallel.save(model, opt, processor, out, world, {"trainer_state.pt": {
                "scheduler": sched.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                "args": vars(args), "world_size": world.size,
                **{name: module.state_dict() for name, module in extras.items()}}})
    bar.close()
    if world.main:
        print(f"saved {out} after {step} steps")


def add_training_args(ap: argparse.ArgumentParser, init: str, out: str, steps: int):
    """The trainer's flags (shared with base.py)."""
    io = ap.add_argument_group("input and output")
    io.add_argument("--init", default=init, help="'tiny' (random), 'tiny-base', or a checkpoint folder")
    io.add_argument("--out", default=out, help="checkpoint folder; the log goes to <out>_log.jsonl")
    io.add_argument("--save-every", type=POSITIVE, default=200)
    io.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    io.add_argument("--overwrite", action="store_true", help="replace a run that is already in --out")
    io.add_argument("--eval-data", default=None, help="held-out records to score every --eval-every steps")
    io.add_argument("--eval-every", type=POSITIVE, default=500)
    io.add_argument("--eval-n", type=POSITIVE, default=150)
    op = ap.add_argument_group("optimisation")
    op.add_argument("--steps", type=POSITIVE, default=steps)
    op.add_argument("--batch", type=POSITIVE, default=16)
    op.add_argument("--accum", type=POSITIVE, default=1, help="micro-batches a step (accumulation)")
    op.add_argument("--lr", type=RATE, default=1e-3)
    op.add_argument("--vision-lr", type=RATE, default=None, help="learning rate of vision tower + merger")
    op.add_argument("--warmup", type=SHARE, default=0.05, help="warmup, as a fraction of --steps")
    op.add_argument("--clip", type=RATE, default=1.0, help="gradient-norm clipping")
    op.add_argument("--max-tokens", type=POSITIVE, default=4096, help="longest conversation trained on")
    op.add_argument("--seed", type=int, default=0)
    op.add_argument("--verdict-style", choices=VERDICT_STYLES, default="ledger",
                    help="wording of the verdict and look drills (common.verdict): the trajectories' (collect.py --thoughts)")
    run = ap.add_argument_group("machine")
    run.add_argument("--threads", type=NONNEGATIVE, default=0, help="torch threads (0: torch's default)")
    run.add_argument("--workers", type=NONNEGATIVE, default=0, help="processes building batches ahead")
    run.add_argument("--grad-checkpointing", action="store_true",
                     help="recompute activations in the backward pass (memory for compute)")
    run.add_argument("--precision", choices=parallel.PRECISIONS, default="auto", help=parallel.PRECISION_HELP)


def add_drill_args(ap: argparse.ArgumentParser):
    """The drills added to each SFT step (drill_batch), each kind a loss of its own."""
    ap.add_argument("--drill-weight", type=NONNEGATIVE_FLOAT, default=1.0,
                    help="weight of the drills' mean loss beside the trajectories' (1: equal)")
    ap.add_argument("--verdict-drills", type=NONNEGATIVE, default=0,
                    help="text-only drills of the verdict (is the object described the one asked for?) added "
                         "to each step, half of them yes, as a loss of their own (0: none)")
    ap.add_argument("--ledger-drills", type=NONNEGATIVE, default=0,
                    help="text-only drills of stepping through one's own list (the backward ledger's copies: "
                         "collect.py --thoughts backward) added to each step, as a loss of their own (0: none)")
    ap.add_argument("--look-drills", type=NONNEGATIVE, default=0,
                    help="drills of one crop each (a target, a look-alike, another colour, an empty cell), asked "
                         "'Is this the <colour> <shape>?', added to each step, as a loss of their own (0: none)")


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["runs/tiny/coldstart.jsonl"],
                    help="trajectories (JSONL) to train on; base records (base.py --write-data) may mix in; "
                         "a .json file is ShareGPT (the official cold-start data, collect.py --sharegpt)")
    ap.add_argument("--train-vision", action="store_true", help="train the vision tower (default: frozen)")
    ap.add_argument("--length-split", type=POSITIVE, default=2,
                    help="a step's trajectories, sorted by length, go through the model in this many runs, each "
                         "padded to its own longest (the same gradient, less padding; model.by_length)")
    add_drill_args(ap)
    add_training_args(ap, init="tiny-base", out="runs/tiny/sft", steps=300)
    add_protocol_args(ap)
    args = parse_with_preset(ap, argv)
    protocol = protocol_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = read_trajectories(args.data)             # every input is checked before any work
    held_out = read_held_out(args.eval_data, args.eval_n, ("images", "problem", "solution"))
    world = parallel.setup()
    if world.sharded and held_out:
        raise InputError("--eval-data works in one process only; under torchrun evaluate the checkpoint with eval.py")
    seed_everything(args.seed)
    model, processor, state = start_run(Path(args.out), args.init, args.resume, world.device, args.overwrite, world)
    apply_pixels(processor, args)
    for p in model.model.visual.parameters():
        p.requires_grad_(args.train_vision)
    parallel.prepare(model, args.grad_checkpointing, args.precision, world)
    drills = {kind: getattr(args, f"{kind}_drills") for kind in DRILL_KINDS if getattr(args, f"{kind}_drills")}

    runs = min(args.length_split, max(1, args.batch // world.size))   # the same count on every rank

    def make(k):
        samples = file_batch(rows, k, args.batch, args.seed, processor, args.max_tokens, protocol,
                             (world.rank, world.size))
        micro = [collate(run, processor, "cpu") for run in by_length(samples, runs)]
        for kind, n in drills.items():
            samples = drill_batch(k, n, args.seed, processor, world.rank, DRILL_SEARCH_SHARE, args.verdict_style, kind)
            micro.append({**collate(samples, processor, "cpu"), "drill": torch.tensor(args.drill_weight)})
        return None, micro
    evaluate = None
    if held_out or (drills and not world.sharded):  # held-out searches; fresh drills of each kind trained
        root = Path(args.eval_data).parent if held_out else None
        evaluate = lambda m: {
            **(evaluate_search(m, processor, held_out, root, protocol=protocol) if held_out else {}),
            **{DRILL_LOG[kind]: drill_accuracy(m, processor, style=args.verdict_style, kind=kind) for kind in drills}}
    train(args, model, processor, state, make, sft_loss, evaluate, world=world)
    parallel.close(world)


if __name__ == "__main__":
    main_cli(main)
