"""The training loop shared by sft.py and the tiny base's pretraining (research/base.py).

`train` is the loop: AdamW with warmup and cosine decay, gradient accumulation, clipping, bf16
autocast where it pays, checkpoints written atomically with the trainer's state, resume, a stop on a
NaN loss, one log line per step, held-out figures every --eval-every steps. The loss and the batches
come from the caller (`loss_fn`, `make_micro`), so the same loop trains on trajectories, drills and
the base's tasks. Under torchrun the model is sharded with FSDP2 (parallel.py) and each rank builds
its share of each batch.
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

from minio3 import parallel
from minio3.conversation import VERDICT_STYLES, grade
from minio3.data import NONNEGATIVE, POSITIVE, RATE, SHARE, append_jsonl, load_image, read_jsonl, read_records
from minio3.engine import Engine, Sample, Settings
from minio3.model import check_finite
from minio3.parallel import World
from minio3.plots import line_plot
from minio3.protocol import DEFAULT, Protocol


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


def train(args, model, processor, state: dict | None, make_micro, loss_fn, evaluate=None,
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
                    help="wording of the verdict and look drills (conversation.verdict): the trajectories' (collect.py --thoughts)")
    run = ap.add_argument_group("machine")
    run.add_argument("--threads", type=NONNEGATIVE, default=0, help="torch threads (0: torch's default)")
    run.add_argument("--workers", type=NONNEGATIVE, default=0, help="processes building batches ahead")
    run.add_argument("--grad-checkpointing", action="store_true",
                     help="recompute activations in the backward pass (memory for compute)")
    run.add_argument("--precision", choices=parallel.PRECISIONS, default="auto", help=parallel.PRECISION_HELP)
