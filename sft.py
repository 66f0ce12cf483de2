"""Stage 2: supervised fine-tuning on the cold-start trajectories.

    python sft.py                                   # runs/tiny/coldstart.jsonl -> runs/tiny/sft
    python sft.py --steps 400 --batch 8 --out runs/tiny/sft_b8        # the same data, other updates

Reads: trajectories (JSONL from collect.py, or ShareGPT JSON such as the official cold-start data)
and the checkpoint to start from (--init, by default the committed tiny base). Writes: the
fine-tuned model to --out (a checkpoint folder, with trainer_state.pt for --resume), one line per
step to <out>_log.jsonl, and with --eval-data the held-out curve to <out>_log.png.

Each trajectory is replayed through the same Episode and chunk encoder as the engine (`render`),
so the tokens trained on are exactly those the engine would produce for it. Only assistant tokens
carry a loss (`sft_loss`): the prompt, the observation turns and the image tokens are masked out,
by position. Beside the trajectories each step trains a few *verdict drills* (minio3/drills.py):
text-only sentences that decide whether the object a crop showed is the one asked for, the skill a
search needs most. The loop itself (AdamW, warmup + cosine, clipping, checkpoints, resume) is
minio3/trainer.py's `train`.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from minio3 import parallel, sharegpt
from minio3.conversation import PLAIN_SYSTEM_PROMPT, render
from minio3.data import InputError, NONNEGATIVE, NONNEGATIVE_FLOAT, POSITIVE, load_image, main_cli, read_records, turn_text
from minio3.drills import DRILL_KINDS, DRILL_LOG, DRILL_SEARCH_SHARE, drill_accuracy, drill_batch
from minio3.model import by_length, collate, seed_everything, start_run, token_logprobs
from minio3.protocol import DEFAULT, Protocol, add_protocol_args, apply_pixels, parse_with_preset, protocol_from_args
from minio3.trainer import add_training_args, evaluate_search, read_held_out, train

# The tiny run's recipe: what `python sft.py` does with no flags (run_tiny.sh). Small batches for
# many steps: the same trajectories and cost as 8 x 400, twice the updates. Four verdict drills a
# step, worded as the trajectories' verdicts ("compare": the two shapes side by side), at half the
# trajectories' weight. bf16 compute where the CPU or GPU has it.
RECIPE = dict(steps=800, batch=4, lr=1e-3, verdict_drills=4, verdict_style="compare", drill_weight=0.5,
              precision="best")


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


# ----------------------------------------------------------------------------------------------
# Held-out evaluation and its curve
# ----------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------
# The trainer (sft.py and base.py)
# ----------------------------------------------------------------------------------------------


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["runs/tiny/coldstart.jsonl"],
                    help="trajectories (JSONL) to train on; base records (base.py --write-data) may mix in; "
                         "a .json file is ShareGPT (the official cold-start data, collect.py --sharegpt)")
    ap.add_argument("--train-vision", action="store_true", help="train the vision tower (default: frozen)")
    ap.add_argument("--length-split", type=POSITIVE, default=2,
                    help="a step's trajectories, sorted by length, go through the model in this many runs, each "
                         "padded to its own longest (the same gradient, less padding; model.by_length)")
    add_drill_args(ap)
    add_training_args(ap, init="tiny-base", out="runs/tiny/sft", steps=RECIPE["steps"])
    add_protocol_args(ap)
    ap.set_defaults(**RECIPE)
    return parse_with_preset(ap, argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
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
