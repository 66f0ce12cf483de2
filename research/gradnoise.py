"""How many rollouts does one RL step need? GRPO's gradient noise scale, measured on a policy.

    python -m research.gradnoise --model runs/ablation_long/sft --levels hard --temperature 0.7 \\
        --precision best --groups 64 --report runs/gradnoise_long

Every other flag is rl.py's and means what it means there (the rollouts, the loss, the masking).

It rolls out groups of G rollouts with the RL settings, keeps the groups whose rewards do not all
tie (the ones a step trains on), and takes each group's policy gradient alone, at the first update
of a step (ratio 1): g_i, once with over-turn masking and once without, from the same rollouts.
A step of B groups follows their mean. Written with G for the true (expected) gradient:

    |G|^2     = the mean of g_i . g_j over pairs of *different* groups (unbiased: they are independent)
    trace S   = the mean of |g_i|^2 minus |G|^2 (the total variance of one group's gradient)
    B_noise   = trace S / |G|^2, the groups per step at which the step's signal equals its noise

A step of B groups has E|mean|^2 = |G|^2 + trace S / B, so the share of it that is signal is
1 / (1 + B_noise / B) (McCandlish et al. 2018, "An empirical model of large-batch training").
With Adam each step moves every weight by about the rate whatever the gradient's size: a step that
is 95% noise moves the weights mostly at random. It also gives the correlation between the true
gradients with and without masking, and draws the signal share against the groups per step.
The same figures for each part of the language model (model.language_module; a dot product is a
sum over parameters, so the parts' signal and noise add up to the whole's): what a run that trains
that part alone (rl.py --train-modules) would face.

Reads: a policy (--model) and questions (--data). Writes: <report>/gradnoise.json and .png.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minio3 import parallel
import rl
from minio3.data import InputError, POSITIVE, atomic_path, main_cli, read_records, select_levels
from minio3.plots import line_plot
from minio3.engine import Engine
from minio3.model import language_module, load, seed_everything, token_logprobs
from minio3.protocol import apply_pixels, protocol_from_args

ARMS = ("mask", "nomask")


def off_diagonal_mean(m: np.ndarray) -> float:
    """The mean of m[i, j] over i != j: over pairs of different groups, which are independent."""
    k = len(m)
    return float((m.sum() - np.trace(m)) / (k * (k - 1)))


def noise_scale(gram: np.ndarray) -> dict:
    """The signal and noise of one group's gradient from the Gram matrix of K of them
    (gram[i, j] = g_i . g_j): |G|^2 is the mean off-diagonal entry, trace S the mean diagonal one
    less |G|^2; B_noise is inf when no signal is measured (|G|^2 <= 0)."""
    k = len(gram)
    if k < 2:
        raise ValueError("the noise scale needs at least 2 gradients")
    signal = off_diagonal_mean(gram)
    noise = np.trace(gram) / k - signal
    return {"signal": float(signal), "noise": float(noise), "snr_per_group": float(signal / noise),
            "B_noise": float(noise / signal) if signal > 0 else float("inf")}


def bootstrap_snr(gram: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """The 2.5% and 97.5% points of the signal-to-noise of one group (1 / B_noise), the groups
    resampled with replacement (a group drawn twice is one group: its pairs with itself are left out)."""
    rng, k, out = np.random.default_rng(seed), len(gram), []
    for _ in range(n):
        idx = np.unique(rng.integers(0, k, k))
        if len(idx) > 1:
            out.append(noise_scale(gram[np.ix_(idx, idx)])["snr_per_group"])
    return [float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))]


def arms_correlation(gram_mu: np.ndarray, signal_m: float, signal_u: float) -> float | None:
    """cos(G_mask, G_nomask), the true gradients' cosine: the cross products g_i^mask . g_j^nomask
    of different groups estimate G_mask . G_nomask (a group with itself shares its rollouts)."""
    cross = off_diagonal_mean(gram_mu)
    return float(cross / np.sqrt(signal_m * signal_u)) if signal_m > 0 and signal_u > 0 else None


def question_split(sum_sq: float, norms_sq: float, same: list[float], k: int) -> dict:
    """Is the consistent part of a question's gradient its own, or shared with other questions?
    From 2K half-group gradients h (each half of a group of G taken as a group of G/2 of its own):
    `same` holds the K dot products of a question's two halves, which estimate |m_q|^2, the squared
    mean gradient of question q; pairs of halves of different questions estimate |E_q m_q|^2, the
    part that all questions share and a step over new questions can follow. sum_sq = |sum of all
    2K halves|^2, norms_sq = the sum of their |h|^2."""
    same = np.asarray(same, dtype=float)
    across = (sum_sq - norms_sq - 2 * same.sum()) / (2 * k * (2 * k - 2))
    mean = float(same.mean())
    return {"half_norm_sq": norms_sq / (2 * k),   # the mean |h|^2: the scale the two below compare to
            "same_question": mean, "same_question_se": float(same.std(ddof=1) / np.sqrt(k)),
            "across_questions": float(across), "shared_share": float(across / mean) if mean > 0 else None}


def module_slices(named: list[tuple[str, torch.Tensor]]) -> dict[str, list[slice]]:
    """Where each module's parameters lie in the flat gradient (_flat's order)."""
    out, at = {}, 0
    for name, p in named:
        out.setdefault(language_module(name), []).append(slice(at, at + p.numel()))
        at += p.numel()
    return out


def _flat(loss, params, retain: bool) -> torch.Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=retain, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float() for g, p in zip(grads, params)])


def group_gradients(model, processor, group, args, params, device, halves: bool = False) -> dict:
    """One group's policy gradient, flat, with over-turn masking ("mask") and without ("nomask"),
    from one forward. The token sum is divided by a constant (1,000), as a step's mean over its
    mini-batch is. With `halves`, also "<arm>_halves": the gradients of its first and second half,
    each half a group of its own (its advantages taken within the half), for question_split."""
    trajs, rewards, keep_mask = group
    n = len(trajs)
    batch = rl.as_batch(trajs, list(range(n)), processor, device)
    with parallel.autocast(model, args.precision):
        lp = token_logprobs(model, batch, args.temperature, args.top_p)
    r, out = torch.tensor(rewards, dtype=torch.float), {}
    parts = [slice(0, n)] + ([slice(0, n // 2), slice(n // 2, n)] if halves else [])
    for arm, keep in (("mask", torch.tensor(keep_mask)), ("nomask", torch.ones(n, dtype=torch.bool))):
        vecs = []
        for j, s in enumerate(parts):
            adv = rl.group_advantages(r[s], len(r[s]), keep[s], exclude_masked_from_stats=args.stats == "paper")
            loss, _ = rl.policy_loss(lp[s], lp[s].detach(), adv.to(device), batch["loss_mask"][s], keep[s].to(device),
                                     n_tokens=1000.0)
            vecs.append(_flat(loss, params, retain=not (arm == "nomask" and j == len(parts) - 1)))
        out[arm] = vecs[0]
        if halves:
            out[arm + "_halves"] = vecs[1:]
    return out


def collect_groups(engine, questions, root: Path, args, k: int) -> tuple[list, list]:
    """K untied groups of rollouts, rolled out P questions at a time (rl.rollout_groups, which
    itself asks again up to 4 times when groups tie); at most 4 times the rounds K needs."""
    groups, rollouts, bar = [], [], tqdm(total=k, desc="untied groups", dynamic_ncols=True)
    for round_ in range(4 * -(-k // args.questions)):
        if len(groups) >= k:
            break
        new, stats, _, _ = rl.rollout_groups(engine, questions, root, args, round_)
        groups += new[:k - len(groups)]
        rollouts += stats
        bar.update(min(len(new), bar.total - bar.n))
    bar.close()
    if len(groups) < 2:
        raise InputError(f"{args.data}: in {len(rollouts)} rollouts only {len(groups)} groups had rewards that "
                         "did not all tie; the noise scale needs at least 2")
    if len(groups) < k:
        print(f"measuring {len(groups)} groups, not {k}: the others' rewards tied in {len(rollouts)} rollouts")
    return groups, rollouts


def measure(model, processor, groups, args) -> tuple[dict, dict]:
    """The Gram matrices of the groups' gradients (with masking, without, and across: cross[i, j] =
    g_i(mask) . g_j(nomask)); and, from each group's halves, what question_split needs (a running
    sum, so the halves are not kept)."""
    device = next(model.parameters()).device
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    k, n = len(groups), sum(p.numel() for p in params)
    grads = {a: torch.empty(k, n, dtype=torch.float64) for a in ARMS}   # (float64: a Gram entry sums 10^6 products)
    halves = {a: {"sum": torch.zeros(n, dtype=torch.float64), "norms_sq": 0.0, "same": []} for a in ARMS}
    model.train()
    for i, group in enumerate(tqdm(groups, desc="gradients", dynamic_ncols=True)):
        g = group_gradients(model, processor, group, args, params, device, halves=True)
        for a in ARMS:
            grads[a][i] = g[a]
            h0, h1 = g[a + "_halves"]
            halves[a]["sum"] += h0.double() + h1.double()
            halves[a]["norms_sq"] += float(h0.double() @ h0.double() + h1.double() @ h1.double())
            halves[a]["same"].append(float(h0.double() @ h1.double()))
    model.eval()
    gram = {key: (grads[a] @ grads[b].T).numpy()
            for key, a, b in (("mask", "mask", "mask"), ("nomask", "nomask", "nomask"), ("cross", "mask", "nomask"))}
    split = {a: question_split(float(h["sum"] @ h["sum"]), h["norms_sq"], h["same"], k) for a, h in halves.items()}
    gram["modules"] = {m: {"params": sum(s.stop - s.start for s in sl),
                           **{a: sum(grads[a][:, s] @ grads[a][:, s].T for s in sl).numpy() for a in ARMS}}
                       for m, sl in module_slices(named).items()}
    return gram, split


def _scale(gram: np.ndarray, seed: int) -> dict:
    """noise_scale with its bootstrap interval and the 95% lower bound on B_noise (None: no bound)."""
    res = {**noise_scale(gram), "snr_per_group_95": bootstrap_snr(gram, seed=seed)}
    res["B_noise_95_low"] = 1 / res["snr_per_group_95"][1] if res["snr_per_group_95"][1] > 0 else None
    return res


def summarise(gram: dict, split: dict, groups, rollouts, args) -> dict:
    res = {"groups": len(groups), "rollouts": len(rollouts), "group_size": args.group,
           "rollout_accuracy": float(np.mean([c for _, _, c in rollouts])),
           "share_exceeded": float(np.mean([t.exceeded for t, _, _ in rollouts])),
           "kept_rows_with_masking": float(np.mean([k for g in groups for k in g[2]]))}
    for a in ARMS:
        res[a] = _scale(gram[a], args.seed)
        res[a]["signal_share_at"] = {str(b): 1 / (1 + res[a]["B_noise"] / b) for b in (args.questions, 256)}
        res[a]["question_split"] = split[a]
    res["modules"] = {m: {"params": g["params"], **{a: _scale(g[a], args.seed) for a in ARMS}}
                      for m, g in gram["modules"].items()}
    # the cosine of two signals means something only where both are measured (95% intervals above 0)
    measured = all(res[a]["snr_per_group_95"][0] > 0 for a in ARMS)
    res["cos_true_mask_nomask"] = arms_correlation(gram["cross"], res["mask"]["signal"], res["nomask"]["signal"]) \
        if measured else None
    return res


def draw(res: dict, path: Path):
    """The share of a step's gradient that is signal against the groups per step (2^0 .. 2^12): each
    arm's estimate and the 95% interval's ends (an end at or below 0, no signal, is not drawn)."""
    series = {}
    for a in ARMS:
        lo, hi = res[a]["snr_per_group_95"]
        for name, snr in ((a, res[a]["snr_per_group"]), (f"{a}: 95% upper", hi), (f"{a}: 95% lower", lo)):
            if snr > 0 or name == a:
                s = max(snr, 0.0)
                series[name] = {str(e): 2 ** e * s / (1 + 2 ** e * s) for e in range(13)}
    line_plot(series, path, f"GRPO: share of a step's gradient that is signal ({res['groups']} groups measured)",
              xlabel=f"log2 of groups of {res['group_size']} rollouts a step (2: 4, 8: 256)")


def _low(r: dict) -> str:
    return f"{r['B_noise_95_low']:.0f}" if r["B_noise_95_low"] else "inf"


def report(res: dict):
    """The figures on the terminal: both arms, then each module's B_noise (what a run that trained
    that module alone would face), largest signal per group first."""
    print(f"{res['groups']} groups of {res['group_size']} ({res['rollouts']} rollouts, accuracy "
          f"{res['rollout_accuracy']:.2f}, {res['share_exceeded']:.2f} reached the turn limit)")
    for a in ARMS:
        r, q = res[a], res[a]["question_split"]
        print(f"{a:7s} B_noise {r['B_noise']:.3g} groups (95%: above {_low(r)}); signal/noise of one group "
              f"{r['snr_per_group']:.2e} (95% {r['snr_per_group_95'][0]:.2e} .. {r['snr_per_group_95'][1]:.2e}); "
              "share of a step that is signal: " + ", ".join(f"{s:.3f} at {b} groups" for b, s in r["signal_share_at"].items()))
        print(f"{'':7s} halves' |h|^2 {q['half_norm_sq']:.3g}; halves of one question agree {q['same_question']:.3g} "
              f"± {q['same_question_se']:.2g}, of different questions {q['across_questions']:.3g}")
    cos = res["cos_true_mask_nomask"]
    print("cos(true gradient with masking, without): " + (f"{cos:.2f}" if cos is not None else
                                                          "not measured (a signal's interval reaches 0)"))
    print(f"{'module':16s} {'params':>9s} | {'B_noise, masking (95%: above)':>30s} | {'no masking':>22s}")
    for m, r in sorted(res["modules"].items(), key=lambda kv: -kv[1]["mask"]["snr_per_group"]):
        cells = [f"{r[a]['B_noise']:.3g} ({_low(r[a])})" for a in ARMS]
        print(f"{m:16s} {r['params']:9d} | {cells[0]:>30s} | {cells[1]:>22s}")


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)            # (--group is rl.py's, --groups ours)
    ap.add_argument("--groups", type=POSITIVE, default=64, help="untied groups to measure (K, at least 2)")
    ap.add_argument("--report", default="runs/gradnoise", help="folder for gradnoise.json and gradnoise.png")
    own, rest = ap.parse_known_args(argv)
    args = rl.parse_args(rest)
    args.protocol, args.judge_texts = protocol_from_args(args), None
    if args.judge or args.judge_prompt:
        raise InputError("gradnoise.py grades by the rule match; --judge is rl.py's only")
    if args.no_overturn_mask:
        raise InputError("gradnoise.py measures both arms, with over-turn masking and without; drop --no-overturn-mask")
    rows = select_levels(read_records(args.data), args.levels, args.data)
    seed_everything(args.seed)
    model, processor = load(args.model)
    for p in model.model.visual.parameters():      # frozen in SFT and RL: no gradient
        p.requires_grad_(False)
    apply_pixels(processor, args)
    parallel.prepare(model, False, args.precision, parallel.World())   # (warns of an emulated bf16)
    engine = Engine(model, processor, max_batch=args.max_batch, max_len=args.max_total_tokens)
    questions = rl.Questions(rows, args.seed)
    groups, rollouts = collect_groups(engine, questions, Path(args.data).parent, args, max(2, own.groups))
    res = {"model": args.model, "data": args.data, "levels": args.levels, "temperature": args.temperature,
           "max_turns": args.max_turns, **summarise(*measure(model, processor, groups, args), groups, rollouts, args)}
    out = Path(own.report)
    with atomic_path(out / "gradnoise.json") as tmp:
        tmp.write_text(json.dumps(res, indent=1))
    draw(res, out / "gradnoise.png")
    report(res)
    print(f"wrote {out / 'gradnoise.json'} and {out / 'gradnoise.png'}")


if __name__ == "__main__":
    main_cli(main)
