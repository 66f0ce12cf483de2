import json

import numpy as np
import pytest
import torch

from research import gradnoise
import rl
from minio3.data import InputError, load_image, read_jsonl
from minio3.engine import Engine, Sample, Settings
from minio3.model import language_module, save_checkpoint


def test_noise_scale_recovers_a_known_signal_and_noise():
    rng = np.random.default_rng(0)
    d, k = 400, 3000
    true = rng.normal(size=d)
    true *= 1 / np.linalg.norm(true)                          # |G|^2 = 1
    sigma = np.sqrt(40 / d)                                   # trace S = 40: B_noise = 40
    g = true + sigma * rng.normal(size=(k, d))
    res = gradnoise.noise_scale(g @ g.T)
    # the textbook way: |mean|^2 less the mean's variance, with the unbiased covariance
    cov_trace = ((g - g.mean(0)) ** 2).sum() / (k - 1)
    assert res["noise"] == pytest.approx(cov_trace, rel=1e-9)
    assert res["signal"] == pytest.approx((g.mean(0) ** 2).sum() - cov_trace / k, rel=1e-9)
    assert res["B_noise"] == pytest.approx(40, rel=0.15)
    lo, hi = gradnoise.bootstrap_snr((g @ g.T)[:300, :300], n=200)
    assert lo < 1 / 40 < hi
    # pure noise: no signal measured, B_noise infinite or far beyond the sample
    z = rng.normal(size=(50, d))
    assert gradnoise.noise_scale(z @ z.T)["B_noise"] > 50
    with pytest.raises(ValueError):
        gradnoise.noise_scale(np.ones((1, 1)))


def test_arms_correlation_of_known_directions():
    rng = np.random.default_rng(1)
    d, k = 300, 2000
    a, b = np.zeros(d), np.zeros(d)
    a[0], b[0], b[1] = 1.0, 1.0, 1.0                          # cos(a, b) = 1 / sqrt(2)
    gm = a + 0.2 * rng.normal(size=(k, d))
    gu = b + 0.2 * rng.normal(size=(k, d))
    sm, su = gradnoise.noise_scale(gm @ gm.T)["signal"], gradnoise.noise_scale(gu @ gu.T)["signal"]
    assert gradnoise.arms_correlation(gm @ gu.T, sm, su) == pytest.approx(2 ** -0.5, abs=0.05)
    assert gradnoise.arms_correlation(gm @ gu.T, -1.0, su) is None


def _groups(tiny, probe_dir, rewards):
    model, proc = tiny
    rows = read_jsonl(probe_dir / "train.jsonl")[:2]
    settings = Settings(max_turns=2, temperature=1.0, seed=5, max_turn_tokens=12)
    trajs = Engine(model, proc).run([Sample(load_image(r, probe_dir), r["problem"]) for r in rows for _ in range(4)],
                                    settings, progress=False)
    keep = [True, False, True, True, True, True, False, True]
    return [(trajs[:4], rewards[:4], keep[:4]), (trajs[4:], rewards[4:], keep[4:])]


def test_group_gradients_add_up_to_the_batch_gradient(tiny, probe_dir):
    model, proc = tiny
    groups = _groups(tiny, probe_dir, [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    args = rl.parse_args(["--precision", "fp32", "--group", "4"])
    params = [p for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    per = [gradnoise.group_gradients(model, proc, g, args, params, "cpu") for g in groups]
    # the same loss over all 8 rollouts in one batch, with rl.py's own functions
    trajs = groups[0][0] + groups[1][0]
    batch = rl.as_batch(trajs, list(range(8)), proc, "cpu")
    lp = rl.token_logprobs(model, batch, args.temperature)
    rewards = torch.tensor(groups[0][1] + groups[1][1])
    for arm, keep in (("mask", torch.tensor(groups[0][2] + groups[1][2])), ("nomask", torch.ones(8, dtype=torch.bool))):
        adv = rl.group_advantages(rewards, 4, keep, exclude_masked_from_stats=False)
        loss, _ = rl.policy_loss(lp, lp.detach(), adv, batch["loss_mask"], keep, n_tokens=1000.0)
        whole = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)])
        assert torch.allclose(per[0][arm] + per[1][arm], whole, atol=1e-6, rtol=1e-4)
        assert per[0][arm].abs().sum() > 0
    assert not torch.allclose(per[0]["mask"], per[0]["nomask"])   # a masked row changes the gradient
    # halves: each the gradient of a group of its own (2 rollouts here)
    whole = gradnoise.group_gradients(model, proc, groups[1], args, params, "cpu", halves=True)
    assert torch.equal(whole["mask"], per[1]["mask"])
    for h, rows in enumerate((slice(0, 2), slice(2, 4))):
        half = tuple(part[rows] for part in groups[1])
        alone = gradnoise.group_gradients(model, proc, half, args, params, "cpu")
        for arm in ("mask", "nomask"):
            assert torch.allclose(whole[arm + "_halves"][h], alone[arm], atol=1e-7, rtol=1e-4)


def test_gradnoise_end_to_end_writes_its_report(tiny, probe_dir, tmp_path, monkeypatch):
    model, proc = tiny
    save_checkpoint(model, proc, tmp_path / "init")
    monkeypatch.setattr(rl, "rewards_for", lambda trajs, rows, *a, **k: [float(t.token_ids[-1] % 2) for t in trajs])
    base = ["--model", str(tmp_path / "init"), "--data", str(probe_dir / "train.jsonl"), "--questions", "2",
            "--group", "4", "--max-turns", "2", "--max-turn-tokens", "12", "--precision", "fp32"]
    gradnoise.main(base + ["--groups", "3", "--report", str(tmp_path / "rep")])
    res = json.loads((tmp_path / "rep" / "gradnoise.json").read_text())
    assert res["groups"] == 3 and res["rollouts"] >= 12 and res["group_size"] == 4
    for arm in ("mask", "nomask"):
        assert res[arm]["noise"] > 0 and len(res[arm]["snr_per_group_95"]) == 2
        assert set(res[arm]["signal_share_at"]) == {"2", "256"}
    assert (tmp_path / "rep" / "gradnoise.png").stat().st_size > 0
    # the modules split the language model's parameters and, dot products being sums over
    # parameters, the signal and the noise: the modules' add up to the whole's
    mods = res["modules"]
    assert sum(m["params"] for m in mods.values()) == sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("model.visual."))
    for arm in ("mask", "nomask"):
        for key in ("signal", "noise"):
            assert sum(m[arm][key] for m in mods.values()) == pytest.approx(res[arm][key], rel=1e-9)
    # rewards that always tie: a clear error naming the data, no report
    monkeypatch.setattr(rl, "rewards_for", lambda trajs, rows, *a, **k: [0.0 for _ in trajs])
    with pytest.raises(InputError, match=r"train.jsonl: in \d+ rollouts only 0 groups had rewards"):
        gradnoise.main(base + ["--groups", "2", "--report", str(tmp_path / "rep2")])
    assert not (tmp_path / "rep2").exists()
    with pytest.raises(InputError, match="measures both arms"):
        gradnoise.main(base + ["--no-overturn-mask", "--report", str(tmp_path / "rep3")])


def test_modules_name_the_parts_of_the_language_model(tiny):
    model, _ = tiny
    named = [(n, p) for n, p in model.named_parameters() if not n.startswith("model.visual.")]
    slices = gradnoise.module_slices(named)
    layers = model.config.text_config.num_hidden_layers
    assert set(slices) == {"embed_tokens", "norms"} | {f"layers.{i}.{k}" for i in range(layers) for k in ("attn", "mlp")}
    covered = sorted((s.start, s.stop) for sl in slices.values() for s in sl)
    assert covered[0][0] == 0 and covered[-1][1] == sum(p.numel() for _, p in named)
    assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))          # no gap, no overlap
    assert language_module("model.language_model.layers.3.post_attention_layernorm.weight") == "norms"
    assert language_module("model.language_model.layers.1.self_attn.o_proj.weight") == "layers.1.attn"


def test_question_split_separates_a_question_s_own_direction_from_the_shared_one():
    rng = np.random.default_rng(2)
    d, k = 300, 1500
    shared = np.zeros(d)
    shared[0] = 1.0                                           # |E m_q|^2 = 1
    own = rng.normal(size=(k, d)) * np.sqrt(3 / d)            # E|own_q|^2 = 3: E|m_q|^2 = 4
    m = shared + own
    h0 = m + rng.normal(size=(k, d)) * np.sqrt(20 / d)        # each half: its question's mean + noise
    h1 = m + rng.normal(size=(k, d)) * np.sqrt(20 / d)
    allh = np.concatenate([h0, h1])
    s = allh.sum(0)
    res = gradnoise.question_split(float(s @ s), float((allh ** 2).sum()), list((h0 * h1).sum(1)), k)
    assert res["same_question"] == pytest.approx(4, abs=3 * res["same_question_se"])
    assert res["across_questions"] == pytest.approx(1, abs=0.15)
    assert res["shared_share"] == pytest.approx(0.25, abs=0.05)
    assert res["half_norm_sq"] == pytest.approx(24, rel=0.05)   # |m_q|^2 + the noise's 20
    # the same from every pair of halves of different questions, counted one by one
    small = slice(0, 40)
    a, b = h0[small], h1[small]
    pairs = [x @ y for i, x in enumerate(np.concatenate([a, b])) for j, y in enumerate(np.concatenate([a, b]))
             if i % 40 != j % 40]
    s = np.concatenate([a, b]).sum(0)
    direct = gradnoise.question_split(float(s @ s), float((a ** 2).sum() + (b ** 2).sum()), list((a * b).sum(1)), 40)
    assert direct["across_questions"] == pytest.approx(np.mean(pairs), rel=1e-9)
