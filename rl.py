"""Stage 3: reinforcement learning with verifiable rewards (GRPO) and over-turn masking.

    python rl.py                                   # runs/tiny/sft -> runs/tiny/rl
    python rl.py --no-overturn-mask --out runs/tiny/rl_nomask     # the ablation: exceeded rollouts trained on

Reads: a policy checkpoint (--model) and probe questions (--data). Writes: the trained policy to
--out (a checkpoint folder, with trainer_state.pt for --resume) and one line per step to
<out>_log.jsonl (reward, accuracy, turns, shares exceeded/truncated/dropped, loss, clip fraction,
seconds, the rollouts' share of them, and rollouts a second).

Each step: take P questions, roll out G trajectories per question through the engine in one call
(at most --max-turns turns; a group whose rewards all tie is replaced inside the call by the next
question's G rollouts, `rollout_groups`), score each answer (1 if right), turn the scores into
advantages within each group (`group_advantages`), and take clipped policy-gradient steps
(`policy_loss`) on exactly the tokens the engine sampled, their log-probabilities taken at the
temperature they were sampled at.

Over-turn masking (`overturn_keep`): a trajectory that still calls the tool on its last allowed turn
(or runs out of context) has no answer, so its reward is 0. Trained on, that 0 teaches the model to
stop searching early. Mini-o3 masks such trajectories out of the loss instead: the model is neither
rewarded nor punished for searching longer than the training limit, and at test time it can use
many more turns than it was trained with.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minio3.conversation import grade
from minio3 import parallel
from minio3.data import (InputError, NONNEGATIVE_FLOAT, POSITIVE, PROBABILITY, RATE, SHARE, Questions, append_jsonl,
                         flag, load_image, main_cli, names, read_records, select_levels)
from minio3.judge import judge
from minio3.engine import Engine, Sample, Settings
from minio3.model import (check_finite, collate, load, resolve_checkpoint, seed_everything, start_run,
                          token_logprobs, train_only)
from minio3.parallel import World
from minio3.protocol import add_protocol_args, apply_pixels, load_judge_prompt, parse_with_preset, protocol_from_args


# ----------------------------------------------------------------------------------------------
# The three functions to read first: the advantages, the loss, and which rollouts the loss keeps.
# ----------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group_size: int, keep: torch.Tensor,
                     exclude_masked_from_stats: bool) -> torch.Tensor:
    """GRPO advantages: each reward standardised within its group of `group_size` rollouts of the
    same question, (r - mean) / (std + 1e-6).

    rewards: [N] floats, N = number of questions x group_size, groups consecutive.
    keep:    [N] bools, False for trajectories that exceeded the turn limit or the context.
    exclude_masked_from_stats:
        True  - the paper's formula: masked trajectories take no part in the group's mean and std.
        False - the official code: they do (with their reward, 0), and are only masked in the loss.
    Returns [N] advantages. Masked rows get a value too; `policy_loss` is what zeroes them.
    """
    r = rewards.float().view(-1, group_size)                       # [groups, G]
    if exclude_masked_from_stats:
        w = keep.float().view(-1, group_size)                      # who counts in the statistics
    else:
        w = torch.ones_like(r)
    n = w.sum(1, keepdim=True)
    mean = (r * w).sum(1, keepdim=True) / n.clamp(min=1)
    var = ((r - mean) ** 2 * w).sum(1, keepdim=True) / (n - 1).clamp(min=1)   # unbiased, like torch.std
    std = var.sqrt()
    return ((r - mean) / (std + 1e-6)).view(-1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                loss_mask: torch.Tensor, keep: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.3,
                n_tokens: float | None = None):
    """The clipped policy-gradient objective, averaged over the tokens that count.

    logprobs:     [N, T] log p of each token under the policy being trained
    old_logprobs: [N, T] the same under the policy that sampled them (from the engine)
    advantages:   [N]    one per trajectory, shared by all its tokens
    loss_mask:    [N, T] 1 on tokens the model sampled (not prompts, observations, images, padding)
    keep:         [N]    0 for trajectories masked by over-turn masking
    n_tokens:     the mean's denominator if not this batch's own count of kept tokens (under torchrun:
                  the count over every rank's share of the mini-batch, divided by the ranks)
    Returns (loss, clip_fraction).
    """
    # --- over-turn masking: keep = 0 switches a whole row off, loss_mask the non-sampled tokens --
    mask = loss_mask.bool() & keep.bool()[:, None]                           # [N, T]
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # 0 where off
    ratio = torch.exp(log_ratio)                                             # pi / pi_old per token
    unclipped = -advantages[:, None] * ratio
    clipped = -advantages[:, None] * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    per_token = torch.maximum(unclipped, clipped)                            # the pessimistic bound
    n_tokens = mask.sum().clamp(min=1) if n_tokens is None else n_tokens
    loss = (per_token * mask).sum() / n_tokens                               # token mean over kept tokens
    clip_fraction = ((clipped > unclipped) & mask).sum().float() / n_tokens
    return loss, clip_fraction


def overturn_keep(traj, masking: bool = True) -> bool:
    """Over-turn masking, decided here and nowhere else: with masking (the default), a rollout that
    exceeded the turn limit or the context is kept out of the loss (keep = False); without it
    (--no-overturn-mask) it is trained on with its reward, 0, like any wrong answer."""
    return not (masking and traj.exceeded)


# ----------------------------------------------------------------------------------------------
# Rewards
# ----------------------------------------------------------------------------------------------
def rewards_for(trajs, rows, judge_engine=None, format_bonus: float = 0.0,
                tool_bonus: float = 0.0, judge_texts: dict | None = None) -> list[float]:
    """Correctness of the answer (rule match, or the judge's "Score: 0/1"), plus optional bonuses
    for a well-formed answer and for having used the tool (both off by default, as in the paper)."""
    if judge_engine is not None:
        correct = judge(judge_engine, rows, [t.answer for t in trajs], judge_texts)
    else:
        correct = [grade(t.answer, r) for t, r in zip(trajs, rows)]
    return [c + format_bonus * t.answered + tool_bonus * (len(t.crops) > 0) for c, t in zip(correct, trajs)]


# ----------------------------------------------------------------------------------------------
# One step: roll out groups, score them, update the policy
# ----------------------------------------------------------------------------------------------
def rollout_groups(engine, questions: Questions, root: Path, args, step: int, judge_engine=None,
                   n_questions: int | None = None, rank: int = 0):
    """P groups of G rollouts whose rewards do not all tie, in one engine call; under torchrun P is
    this rank's share. Tied groups teach nothing: as soon as a group is scored and ties, the next
    question's G rollouts join the same call (they take the rows that free up), at most 3 times in
    a chain. Returns the groups as (trajectories, rewards, keep), in the order they were asked, every
    rollout's (trajectory, reward, correct) for the log, and the number of groups tried and dropped."""
    G, P = args.group, n_questions or args.questions
    settings = Settings(max_turns=args.max_turns, temperature=args.temperature, top_p=args.top_p,
                        seed=args.seed * 100_003 + step * 101 + rank * 1_000_003,
                        max_turn_tokens=args.max_turn_tokens, max_total_tokens=args.max_total_tokens,
                        max_images=args.max_images, protocol=args.protocol)
    asked, finished, scored = [], {}, {}      # (question, round) a group; trajectories; (rewards, keep)

    def ask(rnd: int) -> list[Sample]:
        q = questions.take(1)[0]
        asked.append((q, rnd))
        image = load_image(q, root)           # one picture a question, shared by its G rollouts
        return [Sample(image, q["problem"]) for _ in range(G)]

    def more(i: int, traj) -> list[Sample]:
        """Called by the engine as each rollout ends: score a group when its last rollout is in."""
        g = i // G
        finished[i] = traj
        if any(g * G + k not in finished for k in range(G)):
            return []
        q, rnd = asked[g]
        tg = [finished[g * G + k] for k in range(G)]
        rg = rewards_for(tg, [q] * G, judge_engine, args.format_bonus, args.tool_bonus, args.judge_texts)
        keep_g = [overturn_keep(t, masking=not args.no_overturn_mask) for t in tg]
        counted = [r for r, k in zip(rg, keep_g) if k or args.stats == "official"]
        scored[g] = (tg, rg, keep_g, len(counted) < 2 or np.std(counted) < 1e-4)
        return ask(rnd + 1) if scored[g][3] and rnd < 3 else []

    first = [s for _ in range(P) for s in ask(0)]
    engine.run(first, settings, progress=False, more=more)
    groups, stats = [], []
    for g, (q, _) in enumerate(asked):
        tg, rg, keep_g, tied = scored[g]
        stats += [(t, r, grade(t.answer, q)) for t, r in zip(tg, rg)]
        if not tied:
            groups.append((tg, rg, keep_g))
    return groups, stats, len(asked), len(asked) - len(groups)


def kl_penalty(ref, batch, lp, temperature: float = 1.0, n_tokens: float | None = None,
               top_p: float = 1.0) -> torch.Tensor:
    """k3 estimate of KL(policy || reference) over the sampled tokens (off unless --kl > 0), both at
    the sampling temperature and top-p; a mean over `n_tokens` (default: this batch's sampled tokens)."""
    with torch.no_grad():
        ref_lp = token_logprobs(ref, batch, temperature, top_p)
    d = ref_lp - lp
    m = batch["loss_mask"].float()
    return ((torch.exp(d) - d - 1) * m).sum() / (m.sum().clamp(min=1) if n_tokens is None else n_tokens)


def trained_mask(traj, first_turn: int = 1) -> list[bool]:
    """The tokens the loss sees: the sampled ones, in the assistant's turns `first_turn` and later
    (1: every turn; 2: all but the opening). A turn is a run of sampled positions, so the turns are
    counted from positions, never from token values."""
    mask, turn, prev = [], 0, False
    for m in traj.sampled_mask:
        turn += bool(m) and not prev
        mask.append(bool(m) and turn >= first_turn)
        prev = bool(m)
    return mask


def as_batch(trajs, idx: list[int], processor, device, masks: list[list[bool]] | None = None) -> dict:
    """Trajectories idx collated for a forward; the loss mask is `masks` (default: every sampled token)."""
    return collate([{"ids": trajs[i].token_ids, "mask": trajs[i].sampled_mask if masks is None else masks[i],
                     "shown": trajs[i].shown} for i in idx], processor, device)


def update(model, opt, processor, groups, args, step: int, out: Path, ref=None, world: World = World(),
           filler=None, old_from_engine: bool = False) -> dict:
    """Policy-gradient updates on mini-batches of the kept trajectories, each an optimizer step over
    runs of similar length (`parallel.length_runs`). The old log-probs (the policy that sampled):
    with `old_from_engine`, the engine's own, recorded as it sampled with these very weights (one
    process, one dtype); else the trainer's, from one no-grad pass before the first update (an FSDP2
    or bfloat16 replica sampled). Either way the first mini-batch's ratio is 1, and the engine's gap
    to the trainer's log-probs at the sampling weights is logged. `filler` (a trajectory) pads a rank
    that has fewer mini-batches or runs (or none). Returns the mean loss, clip fraction, tokens
    trained on and the engine-trainer gap."""
    trajs = [t for g in groups for t in g[0]] + ([filler] if filler is not None else [])
    rewards = torch.tensor([r for g in groups for r in g[1]], dtype=torch.float)
    keep = torch.tensor([k for g in groups for k in g[2]] + [False] * (filler is not None), dtype=torch.bool)
    adv = group_advantages(rewards, args.group, keep[:len(rewards)], exclude_masked_from_stats=args.stats == "paper")
    adv = torch.cat([adv, torch.zeros(len(trajs) - len(adv))])
    masks = [trained_mask(t, args.train_from_turn) for t in trajs]
    device = next(model.parameters()).device
    order = [int(i) for i in np.random.default_rng([args.seed, step]).permutation(len(rewards)) if keep[i]]
    size = max(1, args.minibatch // world.size)                    # this rank's share of a mini-batch
    length = lambda i: len(trajs[i].token_ids)
    chunks = [parallel.length_runs(idx, min(args.length_split, size), length, world, len(trajs) - 1)
              for idx in parallel.minibatches(order, size, world, len(trajs) - 1)]
    olds = None                                     # None: the engine's log-probs are the old ones
    if not old_from_engine:
        model.eval()
        with torch.no_grad(), parallel.autocast(model, args.precision):   # the sampling policy, by the trainer
            olds = [[token_logprobs(model, as_batch(trajs, run, processor, device, masks), args.temperature,
                                    args.top_p) for run in runs] for runs in chunks]
    model.train()
    losses, clips, n_tok, gap = [], [], 0, [0.0, 0]
    for k, runs in enumerate(chunks):
        opt.zero_grad(set_to_none=True)
        # the loss is a mean over the whole mini-batch's tokens, whichever run they are in: the runs'
        # gradients add up to the mini-batch's
        rows = [i for run in runs for i in run]
        kept = max(1.0, world.sum(sum(sum(masks[i]) for i in rows if keep[i]))) / world.size
        sampled = max(1, sum(sum(masks[i]) for i in rows))
        loss, clip = 0.0, 0.0
        for j, run in enumerate(runs):
            # collated again rather than kept from the no-grad pass: at 7B scale every mini-batch's
            # pixels held at once would not fit; the images are cut and resized already (Trajectory.shown)
            batch = as_batch(trajs, run, processor, device, masks)
            engine_lp = engine_logprobs(trajs, run, batch["input_ids"].shape[1]).to(device)
            old = engine_lp if olds is None else olds[k][j]
            run_loss, run_clip, lp = loss_of_run(model, batch, old, adv[run].to(device), keep[run].to(device),
                                                 (kept, sampled), args, ref)
            if olds is not None or k == 0:         # the trainer's log-probs at the sampling weights
                on = batch["loss_mask"].bool() & keep[run].to(device)[:, None]
                log_gap(gap, engine_lp, lp if olds is None else old, on)
            check_finite(run_loss, step + 1, out)
            run_loss.backward()
            loss, clip = loss + run_loss.item(), clip + run_clip.item()
            n_tok += int(batch["attention_mask"].sum())
        parallel.grad_norm(model, 1.0)
        opt.step()
        losses.append(loss)
        clips.append(clip)
    return {"loss": float(np.mean(losses)) if losses else 0.0,
            "clip_fraction": float(np.mean(clips)) if clips else 0.0, "n_tok": n_tok,
            "logprob_gap": gap[0] / max(gap[1], 1)}


def loss_of_run(model, batch, old, adv, keep, counts, args, ref=None):
    """One run's policy loss, clip fraction and (detached) log-probs at the sampling temperature, with
    the KL penalty if --kl; `counts` = (kept, sampled): the mini-batch's token counts the means divide by."""
    with parallel.autocast(model, args.precision):
        lp = token_logprobs(model, batch, args.temperature, args.top_p)   # the policy that sampled
    loss, clip = policy_loss(lp, old, adv, batch["loss_mask"], keep, args.clip_low, args.clip_high, counts[0])
    if ref is not None:
        loss = loss + args.kl * kl_penalty(ref, batch, lp, args.temperature, counts[1], args.top_p)
    return loss, clip, lp.detach()


# ----------------------------------------------------------------------------------------------
# The log: the engine's log-probs against the trainer's, and one step's record
# ----------------------------------------------------------------------------------------------
def engine_logprobs(trajs, run: list[int], width: int) -> torch.Tensor:
    """[len(run), width]: the log-probs the engine recorded as it sampled run's trajectories, in the
    positions of their tokens (0 off the sampled ones and in the padding)."""
    lp = torch.zeros(len(run), width)
    for j, i in enumerate(run):
        lp[j, :len(trajs[i].logprobs)] = torch.tensor(trajs[i].logprobs)
    return lp


def log_gap(gap: list, engine_lp: torch.Tensor, trainer_lp: torch.Tensor, on: torch.Tensor):
    """Add to `gap` (sum, count) the engine's log-probs' distance to the trainer's on `on`."""
    gap[0] += float((engine_lp - trainer_lp).abs()[on].sum())
    gap[1] += int(on.sum())


def step_record(step: int, stats: list, tried: int, dropped: int, upd: list[dict], seconds: float,
                rollout_seconds: float) -> dict:
    """What one step logs: reward and accuracy of every rollout, how many, how it searched, the update,
    and the time. `stats` holds (reward, correct, turns, exceeded, truncated, tokens) of every rank's
    rollouts, `upd` every rank's update figures."""
    s = np.array(stats, dtype=float).reshape(-1, 6)
    return {"step": step, "reward_mean": float(s[:, 0].mean()), "accuracy": float(s[:, 1].mean()),
            "mean_turns": float(s[:, 2].mean()), "share_exceeded": float(s[:, 3].mean()),
            "share_truncated": float(s[:, 4].mean()), "share_groups_dropped": dropped / max(tried, 1),
            "rollouts": len(s),                               # tied groups' refills included
            "loss": float(np.mean([u["loss"] for u in upd])),
            "clip_fraction": float(np.mean([u["clip_fraction"] for u in upd])),
            "logprob_gap": float(np.mean([u["logprob_gap"] for u in upd])),
            "seconds": seconds, "rollouts_per_s": len(s) / seconds,      # the whole step: rollouts and update
            "rollout_seconds": rollout_seconds,                           # of which the rollouts
            "tokens_per_s": (s[:, 5].sum() + sum(u["n_tok"] for u in upd)) / seconds}


def add_optimisation_args(ap):
    """The update's flags: mini-batches, rate, clipping, what trains, over-turn masking, precision."""
    op = ap.add_argument_group("optimisation")
    op.add_argument("--minibatch", type=POSITIVE, default=16,
                    help="trajectories per optimizer update (questions x group: one update a step)")
    op.add_argument("--length-split", type=POSITIVE, default=2,
                    help="a mini-batch's trajectories, sorted by length, go through the model in this many runs "
                         "(the same gradient, less padding; model.by_length)")
    op.add_argument("--lr", type=RATE, default=3e-5)
    op.add_argument("--clip-low", type=SHARE, default=0.2)
    op.add_argument("--clip-high", type=NONNEGATIVE_FLOAT, default=0.3)
    op.add_argument("--train-modules", type=names, default=None,
                    help="train only these parts of the language model, comma-separated (model.language_module, "
                         "e.g. layers.3.mlp); all (the default): the whole language model")
    op.add_argument("--kl", type=NONNEGATIVE_FLOAT, default=0.0, help="KL penalty to the start model (off)")
    op.add_argument("--train-from-turn", type=POSITIVE, default=1,
                    help="the loss skips the assistant's earlier turns (2: the opening is not trained)")
    op.add_argument("--no-overturn-mask", action="store_true", help="train on exceeded trajectories too")
    op.add_argument("--precision", choices=parallel.PRECISIONS, default="best", help=parallel.PRECISION_HELP)
    op.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward")
    op.add_argument("--stats", choices=["official", "paper"], default="official",
                    help="whether masked trajectories count in the group mean/std (official) or not (paper)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    io = ap.add_argument_group("input and output")
    io.add_argument("--model", default="runs/tiny/sft", help="the policy to start from")
    io.add_argument("--data", default="runs/tiny/probe/train.jsonl", help="questions (probe records)")
    io.add_argument("--out", default="runs/tiny/rl", help="checkpoint folder; the log: <out>_log.jsonl")
    io.add_argument("--levels", type=names, default=["hard"],
                    help="train only on these difficulties, comma-separated (all: every question)")
    io.add_argument("--save-every", type=POSITIVE, default=5)
    io.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    io.add_argument("--overwrite", action="store_true", help="replace a run that is already in --out")
    io.add_argument("--seed", type=int, default=0)
    ro = ap.add_argument_group("rollouts")
    ro.add_argument("--steps", type=POSITIVE, default=20)
    ro.add_argument("--questions", type=POSITIVE, default=4, help="questions per step (P)")
    ro.add_argument("--group", type=flag(int, 2), default=8,
                    help="rollouts per question (G, at least 2: GRPO compares rollouts of one question)")
    ro.add_argument("--max-turns", type=POSITIVE, default=6)
    ro.add_argument("--max-turn-tokens", type=POSITIVE, default=256)
    ro.add_argument("--max-total-tokens", type=POSITIVE, default=4096, help="the whole conversation")
    ro.add_argument("--max-images", type=POSITIVE, default=32, help="the original and its crops")
    ro.add_argument("--temperature", type=RATE, default=0.7, help="of the rollouts, and of the log-probs trained on")
    ro.add_argument("--top-p", type=PROBABILITY, default=1.0,
                    help="sample the rollouts from the nucleus of this mass, and train on its log-probs "
                         "(model.nucleus; 1: the whole distribution, as the paper)")
    ro.add_argument("--max-batch", type=POSITIVE, default=32, help="engine rows at a time")
    ro.add_argument("--rollout-dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                    help="the engine's weights (auto: bfloat16 on CUDA, float32 on the CPU)")
    rw = ap.add_argument_group("rewards")
    rw.add_argument("--judge", help="an LLM judge (path or hub name) instead of the rule match")
    rw.add_argument("--judge-prompt", help="the judge's texts (see eval.py --judge-prompt)")
    rw.add_argument("--format-bonus", type=NONNEGATIVE_FLOAT, default=0.0)
    rw.add_argument("--tool-bonus", type=NONNEGATIVE_FLOAT, default=0.0)
    add_optimisation_args(ap)
    add_protocol_args(ap)
    return parse_with_preset(ap, argv)


def rollout_model(model, args, world: World):
    """The weights the engine runs on, in --rollout-dtype: the trainer's own in one process at its
    dtype, else an unsharded replica that `parallel.copy_weights` refreshes before each step."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.rollout_dtype)
    dtype = dtype or (torch.bfloat16 if world.device.startswith("cuda") else torch.float32)
    if not world.sharded and dtype == next(model.parameters()).dtype:
        return model
    return load(args.model, device=world.device, dtype=dtype)[0].eval()


def start(args, out: Path, world: World):
    """The trainer's model (FSDP2 under torchrun), its optimizer, the rollout engine on its own
    weights, the question stream (this rank's share) and the step to start from."""
    rows = select_levels(read_records(args.data), args.levels, args.data)   # checked before any work
    if args.judge:
        resolve_checkpoint(args.judge)
    seed_everything(args.seed)
    model, processor, state = start_run(out, args.model, args.resume, world.device, args.overwrite, world)
    for p in model.model.visual.parameters():      # the vision tower stays frozen, as in SFT
        p.requires_grad_(False)
    if args.train_modules:
        train_only(model, args.train_modules)
    apply_pixels(processor, args)
    parallel.prepare(model, args.grad_checkpointing, args.precision, world)   # (FSDP2 under torchrun)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, 0.99),
                            weight_decay=0.0)
    if state:
        parallel.load_optimizer(model, opt, out, state, world)
    cursor = state["cursor"] if state else 0        # (one per rank under torchrun)
    questions = Questions(rows[world.rank::world.size], args.seed,
                          cursor[world.rank] if isinstance(cursor, list) else cursor)
    replica = rollout_model(model, args, world)
    engine = Engine(replica, processor, max_batch=args.max_batch, max_len=args.max_total_tokens)
    return model, processor, opt, engine, questions, state["step"] if state else 0


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    args.protocol = protocol_from_args(args)       # (prompts files are read before any work)
    args.judge_texts = load_judge_prompt(args.judge_prompt) if args.judge_prompt else None
    out, world = Path(args.out), parallel.setup()
    if args.questions % world.size:
        raise InputError(f"--questions {args.questions} must be a multiple of the {world.size} ranks")
    model, processor, opt, engine, questions, step = start(args, out, world)
    ref = load(args.model, device=world.device)[0] if args.kl > 0 else None
    judge_engine = Engine(*load(args.judge, device=world.device), max_batch=args.max_batch) if args.judge else None
    log = out.parent / (out.name + "_log.jsonl")
    bar = tqdm(total=args.steps, initial=step, desc="rl", dynamic_ncols=True, disable=not world.main)
    while step < args.steps:
        t0 = time.time()
        if engine.decoder.model is not model:       # the engine's replica takes the trainer's weights
            parallel.copy_weights(model, engine.decoder.model)
        model.eval()
        groups, stats, tried, dropped = rollout_groups(engine, questions, Path(args.data).parent, args, step,
                                                       judge_engine, args.questions // world.size, world.rank)
        t_rollouts = time.time() - t0
        upd = update(model, opt, processor, groups, args, step, out, ref, world, stats[0][0],
                     old_from_engine=engine.decoder.model is model)   # the engine sampled with these weights
        step += 1
        light = [(r, c, t.turns, t.exceeded, t.truncated, len(t.token_ids)) for t, r, c in stats]
        record = step_record(step, sum(world.gather(light), []), int(world.sum(tried)), int(world.sum(dropped)),
                             world.gather(upd), time.time() - t0, t_rollouts)
        if parallel.peak_memory_gb(world) is not None:
            record["max_memory_GB"] = parallel.peak_memory_gb(world)
        if world.main:
            append_jsonl(log, record)
            tqdm.write(" ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()))
        bar.set_postfix(acc=f"{record['accuracy']:.2f}", turns=f"{record['mean_turns']:.1f}",
                        exc=f"{record['share_exceeded']:.2f}")
        bar.update(1)
        if step % args.save_every == 0 or step == args.steps:
            parallel.save(model, opt, processor, out, world, {"trainer_state.pt": {
                "step": step, "cursor": world.gather(questions.cursor) if world.sharded else questions.cursor,
                "args": {k: v for k, v in vars(args).items() if k not in ("protocol", "judge_texts")}}})
    bar.close()
    if world.main:
        print(f"saved {out} after {step} steps")
    parallel.close(world)


if __name__ == "__main__":
    main_cli(main)
