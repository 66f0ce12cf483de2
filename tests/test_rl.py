"""GRPO pieces against hand-computed values, and a few RL steps end to end."""
import math

import pytest
import torch

import rl
from minio3.data import InputError, load_image, read_jsonl
from minio3.engine import Engine, Sample
from minio3.model import collate, load, save_checkpoint, token_logprobs


def test_group_advantages_official_and_paper():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    keep = torch.tensor([True, True, False, True, True, True, True, False])
    official = rl.group_advantages(rewards, 4, keep, exclude_masked_from_stats=False)
    # group 1: mean 0.25, unbiased std 0.5; group 2: mean 0.75, std 0.5
    assert torch.allclose(official, torch.tensor([1.5, -0.5, -0.5, -0.5, 0.5, 0.5, -1.5, 0.5]), atol=1e-5)
    paper = rl.group_advantages(rewards, 4, keep, exclude_masked_from_stats=True)
    s = 1 / math.sqrt(3)   # group 1 kept rewards [1, 0, 0]: mean 1/3, std 1/sqrt(3); group 2 kept [1, 1, 0]: mean 2/3
    want = [(2 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, -(1 / 3) / s, (1 / 3) / s, (1 / 3) / s, -(2 / 3) / s, (1 / 3) / s]
    assert torch.allclose(paper, torch.tensor(want), atol=1e-4)
    tied = rl.group_advantages(torch.ones(4), 4, torch.ones(4, dtype=torch.bool), False)
    assert torch.equal(tied, torch.zeros(4))


def _reference_loss(lp, old, adv, mask, keep, lo, hi):
    num, den, clipped = 0.0, 0, 0
    for i in range(len(lp)):
        for t in range(len(lp[0])):
            if not (mask[i][t] and keep[i]):
                continue
            r = math.exp(lp[i][t] - old[i][t])
            a = adv[i]
            rc = min(max(r, 1 - lo), 1 + hi)
            num += max(-a * r, -a * rc)
            clipped += (-a * rc) > (-a * r)
            den += 1
    return num / den, clipped / den


def test_policy_loss_matches_hand_computation_and_masked_rows_get_no_gradient():
    old = torch.tensor([[-1.0, -2.0, -0.5, 0.0], [-1.0, -1.0, -1.0, 0.0], [-0.3, -0.7, -1.2, -2.0]])
    delta = torch.tensor([[math.log(1.5), 0.1, -0.05, 0.0], [math.log(0.5), 0.2, 0.0, 0.0], [0.3, -0.3, 0.05, 0.2]])
    adv = torch.tensor([0.8, -1.2, 0.5])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    keep = torch.tensor([True, True, False])
    lp = (old + delta).clone().requires_grad_(True)
    loss, clip = rl.policy_loss(lp, old, adv, mask, keep, 0.2, 0.3)
    want, want_clip = _reference_loss((old + delta).tolist(), old.tolist(), adv.tolist(), mask.tolist(), keep.tolist(), 0.2, 0.3)
    assert loss.item() == pytest.approx(want, rel=1e-6) and clip.item() == pytest.approx(want_clip)
    loss.backward()
    assert torch.all(lp.grad[2] == 0)                 # the over-turn masked row: exactly zero
    assert torch.all(lp.grad[0, 3] == 0) and torch.all(lp.grad[1, 2:] == 0)   # unmasked positions only
    assert lp.grad[0, 1] != 0
    # the same row kept: it now gets a gradient
    lp2 = (old + delta).clone().requires_grad_(True)
    rl.policy_loss(lp2, old, adv, mask, torch.tensor([True, True, True]))[0].backward()
    assert lp2.grad[2].abs().sum() > 0
    # a huge ratio on a masked row cannot leak a NaN into the gradient
    lp3 = (old + delta).clone()
    lp3[2] = 500.0
    lp3.requires_grad_(True)
    l3, _ = rl.policy_loss(lp3, old, adv, mask, keep)
    l3.backward()
    assert torch.isfinite(l3) and torch.all(lp3.grad[2] == 0)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.6, 1.0), (1.0, 0.7)])
def test_engine_old_logprobs_equal_training_forward(tiny, probe_dir, temperature, top_p):
    """The engine's log-prob of each sampled token is the training forward's at the sampling
    temperature and top-p, so the ratio of rl.py's loss compares the policy with the one that sampled."""
    model, proc = tiny
    row = read_jsonl(probe_dir / "train.jsonl")[0]
    trajs = Engine(model, proc).run([Sample(load_image(row, probe_dir), row["problem"])] * 3, max_turns=2,
                                    temperature=temperature, top_p=top_p, seed=5, max_turn_tokens=24, progress=False)
    batch = collate([{"ids": t.token_ids, "mask": t.sampled_mask, "shown": t.shown} for t in trajs], proc, "cpu")
    with torch.no_grad():
        lp = token_logprobs(model, batch, temperature, top_p)
        assert not torch.allclose(lp, token_logprobs(model, batch, temperature / 2, top_p))
        if top_p < 1:   # the nucleus's log-probs, not the whole distribution's
            assert not torch.allclose(lp, token_logprobs(model, batch, temperature))
    for j, t in enumerate(trajs):
        idx = [i for i, m in enumerate(t.sampled_mask) if m]
        assert torch.allclose(lp[j, idx], torch.tensor([t.logprobs[i] for i in idx]), atol=1e-4)
        assert batch["loss_mask"][j].sum() == len(idx)


def test_rl_steps_end_to_end_change_the_weights(tiny, probe_dir, tmp_path, monkeypatch):
    model, proc = tiny
    save_checkpoint(model, proc, tmp_path / "init")
    # a random model never answers: give rewards that vary (the reward itself is tested above)
    levels = []

    def rewards(trajs, rows, *a, **k):
        levels.extend(r["difficulty"] for r in rows)
        return [float(t.token_ids[-1] % 2) for t in trajs]
    monkeypatch.setattr(rl, "rewards_for", rewards)
    base = ["--model", str(tmp_path / "init"), "--data", str(probe_dir / "train.jsonl"), "--out", str(tmp_path / "rl")]
    rl.main(base + ["--steps", "2", "--questions", "2", "--group", "4", "--max-turns", "2", "--max-turn-tokens", "12",
                    "--lr", "1e-3", "--save-every", "1", "--no-overturn-mask",   # (masked, every row here would be off)
                    "--levels", "medium,hard"])
    assert levels and set(levels) <= {"medium", "hard"}   # the curriculum: only the levels asked for
    rolled = len(levels)                                  # every rollout rewarded, refills included
    with pytest.raises(InputError, match=r"train.jsonl: no record has a difficulty in extreme \(it has: easy, hard, medium\)"):
        rl.main(base + ["--out", str(tmp_path / "rl2"), "--levels", "extreme"])
    log = read_jsonl(tmp_path / "rl_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and sum(r["rollouts"] for r in log) == rolled
    assert {"reward_mean", "accuracy", "mean_turns", "share_exceeded", "share_groups_dropped", "loss",
            "clip_fraction", "tokens_per_s", "seconds", "rollouts_per_s"} <= set(log[0])
    assert all(r["seconds"] > 0 and abs(r["rollouts_per_s"] * r["seconds"] - r["rollouts"]) < 1e-6 for r in log)
    assert all(0 < r["rollout_seconds"] < r["seconds"] for r in log)
    assert all(r["logprob_gap"] < 1e-4 for r in log)    # the engine's old log-probs are the trainer's
    # 12 tokens a turn: every rollout's first turn is cut, which ends it unanswered (not masked)
    assert log[0]["share_truncated"] == 1.0 and log[0]["share_exceeded"] == 0.0
    trained, _ = load(str(tmp_path / "rl"))
    before = model.state_dict()
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and not any(k.startswith("model.visual.") for k in changed)   # vision tower frozen


def test_update_in_runs_of_similar_length_is_the_same_step(tiny, probe_dir, tmp_path):
    """rl.update forwards each mini-batch in runs sorted by length (--length-split), each run's loss
    divided by the whole mini-batch's kept tokens: the gradient equals one padded pass's. With plain
    SGD at rate 1 the weights' change is minus the gradient, so the two updates must agree."""
    import copy
    model, proc = tiny
    rows = read_jsonl(probe_dir / "train.jsonl")[:2]
    groups = []
    for row, n in zip(rows, (6, 20)):   # two questions, turns of different lengths
        trajs = Engine(model, proc).run([Sample(load_image(row, probe_dir), row["problem"])] * 4, max_turns=2,
                                        temperature=1.0, seed=3, max_turn_tokens=n, progress=False)
        groups.append((trajs, [1.0, 0.0, 0.0, 1.0], [True, True, False, True]))
    assert len({len(t.token_ids) for g in groups for t in g[0]}) > 1
    changes, figures = {}, {}
    for split in (1, 3):
        m = copy.deepcopy(model)
        args = rl.parse_args(["--length-split", str(split), "--minibatch", "8", "--group", "4"])
        figures[split] = rl.update(m, torch.optim.SGD(m.parameters(), lr=1.0), proc, groups, args, 0, tmp_path)
        changes[split] = {k: v - model.state_dict()[k] for k, v in m.state_dict().items()}
    assert figures[3]["loss"] == pytest.approx(figures[1]["loss"], rel=1e-5, abs=1e-7)
    assert figures[3]["clip_fraction"] == pytest.approx(figures[1]["clip_fraction"], abs=1e-7)
    norm = max(v.abs().max().item() for v in changes[1].values())
    assert norm > 0 and all(torch.allclose(changes[3][k], changes[1][k], atol=1e-4 * norm) for k in changes[1])


def test_old_logprobs_from_the_engine_give_the_same_update_with_one_forward_less(tiny, probe_dir, tmp_path,
                                                                                 monkeypatch):
    """When the engine sampled with the trainer's own weights, its recorded log-probs are the old
    policy's: the update (two mini-batches, so the second one's ratio is not 1) equals the one whose
    old log-probs come from the trainer's no-grad pass, and it runs one forward a run instead of two."""
    import copy
    model, proc = tiny
    row = read_jsonl(probe_dir / "train.jsonl")[0]
    trajs = Engine(model, proc).run([Sample(load_image(row, probe_dir), row["problem"])] * 8, max_turns=2,
                                    temperature=1.0, seed=4, max_turn_tokens=16, progress=False)
    groups = [(trajs[:4], [1.0, 0.0, 0.0, 1.0], [True] * 4), (trajs[4:], [0.0, 1.0, 0.0, 0.0], [True] * 4)]
    forwards = []
    real = rl.token_logprobs
    monkeypatch.setattr(rl, "token_logprobs", lambda *a, **k: forwards.append(1) or real(*a, **k))
    changes, figures, calls = {}, {}, {}
    for from_engine in (False, True):
        m, n0 = copy.deepcopy(model), len(forwards)
        args = rl.parse_args(["--minibatch", "4", "--group", "4", "--length-split", "1", "--temperature", "1.0"])
        figures[from_engine] = rl.update(m, torch.optim.SGD(m.parameters(), lr=1.0), proc, groups, args, 0, tmp_path,
                                         old_from_engine=from_engine)
        changes[from_engine] = {k: v - model.state_dict()[k] for k, v in m.state_dict().items()}
        calls[from_engine] = len(forwards) - n0
    assert calls == {False: 4, True: 2}            # two mini-batches of one run each
    assert figures[True]["loss"] == pytest.approx(figures[False]["loss"], rel=1e-4, abs=1e-6)
    assert figures[True]["logprob_gap"] < 1e-4 and figures[False]["logprob_gap"] < 1e-4
    norm = max(v.abs().max().item() for v in changes[False].values())
    assert norm > 0 and all(torch.allclose(changes[True][k], changes[False][k], atol=1e-4 * norm) for k in changes[False])


def test_train_modules_moves_only_the_named_parts(tiny, probe_dir, tmp_path, monkeypatch):
    model, proc = tiny
    save_checkpoint(model, proc, tmp_path / "init")
    monkeypatch.setattr(rl, "rewards_for", lambda trajs, rows, *a, **k: [float(t.token_ids[-1] % 2) for t in trajs])
    base = ["--model", str(tmp_path / "init"), "--data", str(probe_dir / "train.jsonl"), "--steps", "1",
            "--questions", "2", "--group", "4", "--max-turns", "2", "--max-turn-tokens", "12", "--lr", "1e-3",
            "--no-overturn-mask"]
    rl.main(base + ["--out", str(tmp_path / "rl"), "--train-modules", "layers.1.mlp,embed_tokens"])
    trained, _ = load(str(tmp_path / "rl"))
    before = model.state_dict()
    changed = {k for k, v in trained.state_dict().items() if not torch.equal(v, before[k])}
    assert any(".layers.1.mlp." in k for k in changed) and any("embed_tokens" in k for k in changed)
    assert all(".layers.1.mlp." in k or "embed_tokens" in k or k == "lm_head.weight" for k in changed), changed
    with pytest.raises(InputError, match=r"--train-modules: no part named layers.9.mlp; the parts: embed_tokens, "
                                         r"layers.0.attn"):
        rl.main(base + ["--out", str(tmp_path / "rl2"), "--train-modules", "layers.9.mlp"])


def test_trained_mask_counts_turns_from_positions():
    from types import SimpleNamespace
    t = SimpleNamespace(sampled_mask=[False, False, True, True, False, True, True, True, False, False, True])
    assert rl.trained_mask(t) == [bool(m) for m in t.sampled_mask]
    assert rl.trained_mask(t, 2) == [False] * 5 + [True, True, True, False, False, True]
    assert rl.trained_mask(t, 3) == [False] * 10 + [True]
    assert not any(rl.trained_mask(t, 4))


def test_update_from_turn_two_is_the_update_without_the_opening(tiny, probe_dir, tmp_path):
    """--train-from-turn 2 trains on the turns after the first only: the step equals a plain step on
    the same trajectories with the first turn's tokens marked unsampled (plain SGD at rate 1, so the
    weights' change is minus the gradient). The two-turn rollouts are made by cutting a sampled run."""
    import copy
    model, proc = tiny
    row = read_jsonl(probe_dir / "train.jsonl")[0]
    trajs = Engine(model, proc).run([Sample(load_image(row, probe_dir), row["problem"])] * 4, max_turns=1,
                                    temperature=1.0, seed=3, max_turn_tokens=16, progress=False)
    cut, opened = [], []
    for i, t in enumerate(trajs):
        cut_at = t.sampled_mask.index(True) + 2 + 3 * i                     # turn 1: 2, 5, 8, 11 tokens
        a = copy.copy(t)
        a.sampled_mask = t.sampled_mask[:cut_at] + [False] + t.sampled_mask[cut_at + 1:]
        b = copy.copy(a)
        b.sampled_mask = [False] * (cut_at + 1) + a.sampled_mask[cut_at + 1:]
        cut.append(a)
        opened.append(b)
    changes, losses = [], []
    for ts, first_turn in ((cut, 2), (opened, 1), (cut, 1)):
        m = copy.deepcopy(model)
        args = rl.parse_args(["--minibatch", "4", "--group", "4", "--train-from-turn", str(first_turn)])
        losses.append(rl.update(m, torch.optim.SGD(m.parameters(), lr=1.0), proc, [(ts, [1.0, 0.0, 0.0, 0.0], [True] * 4)],
                  args, 0, tmp_path)["loss"])   # a mean over the trained tokens (the step itself is clipped)
        changes.append({k: v - model.state_dict()[k] for k, v in m.state_dict().items()})
    norm = max(v.abs().max().item() for v in changes[1].values())
    assert losses[0] == pytest.approx(losses[1], rel=1e-5) and losses[0] != pytest.approx(losses[2], rel=1e-3)
    assert norm > 0 and all(torch.allclose(changes[0][k], changes[1][k], atol=1e-4 * norm) for k in changes[1])
    assert not all(torch.allclose(changes[2][k], changes[1][k], atol=1e-4 * norm) for k in changes[1])


def test_a_step_is_one_engine_call_and_tied_groups_are_refilled_inside_it(tiny, probe_dir, monkeypatch):
    """rollout_groups asks P questions in one engine call; a group whose rewards tie is replaced by
    the next question's G rollouts, which join the same call (at most 3 times in a chain), and the
    groups that train are the untied ones, in the order asked."""
    model, proc = tiny
    rows = read_jsonl(probe_dir / "train.jsonl")
    calls, scored = [], []

    def rewards(trajs, rows_, *a, **k):      # the first two groups scored tie (all 0), the rest vary
        scored.append(rows_[0]["doc_id"])
        return [0.0] * len(trajs) if len(scored) <= 2 else [float(i % 2) for i in range(len(trajs))]
    monkeypatch.setattr(rl, "rewards_for", rewards)
    engine = Engine(model, proc, max_batch=8)
    real_run = engine.run
    monkeypatch.setattr(engine, "run", lambda *a, **k: calls.append(1) or real_run(*a, **k))
    args = rl.parse_args(["--questions", "2", "--group", "3", "--max-turns", "1", "--max-turn-tokens", "6",
                          "--levels", "all"])
    args.protocol, args.judge_texts = rl.protocol_from_args(args), None
    questions = rl.Questions(rows, seed=0)
    groups, stats, tried, dropped = rl.rollout_groups(engine, questions, probe_dir, args, step=0)
    assert calls == [1]                                   # one engine call for the step, refills included
    assert (tried, dropped, len(groups)) == (4, 2, 2)     # two tied groups, each replaced by a new question
    assert len(stats) == 4 * 3 and questions.cursor == 4  # every rollout is logged; four questions asked
    assert [sum(r) for _, r, _ in groups] == [1.0, 1.0]   # the groups that train are the untied ones
