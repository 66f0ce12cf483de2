"""The decode step's pieces: the sampler on the device (its distribution, banned ids, seeding), no
read back to the host inside a decode step, and the flash-attn branch run through a reference
implementation of `flash_attn_with_kvcache`'s documented semantics."""
import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from minio3.engine import decoder
from minio3.model import nucleus
from minio3.conversation import encode_chunk
from minio3.engine import Engine, Sample, Settings
from minio3.engine.sampler import TokenChooser
from minio3 import world

ZOOM = '<grounding>{{"bbox_2d": {box}, "source": "original_image"}}</grounding>'


def test_sampler_matches_softmax_in_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    n = 40_000
    for temperature, top_p in [(1.0, 1.0), (0.7, 1.0), (1.0, 0.8)]:
        chooser = TokenChooser(torch.tensor([], dtype=torch.long), Settings(temperature=temperature, top_p=top_p))
        tokens, _ = chooser.choose(logits.expand(n, -1))
        counts = np.bincount(tokens.numpy(), minlength=6)
        p = torch.softmax(logits[0] / temperature, -1).numpy()
        if top_p < 1:                        # the smallest set of most likely tokens reaching top_p
            keep = (np.cumsum(p) - p) < top_p
            p = np.where(keep, p, 0) / p[keep].sum()
            assert counts[~keep].sum() == 0
        seen = p > 0
        chi2 = (((counts[seen] - n * p[seen]) ** 2) / (n * p[seen])).sum()
        assert chi2 < 22.5, (temperature, top_p, chi2)   # df <= 5, p = 0.0004


def test_nucleus_equals_a_loop_over_sorted_tokens():
    """model.nucleus against the definition worked token by token: walk the tokens from the most
    likely, stop once the mass taken reaches top_p, renormalise what was taken."""
    torch.manual_seed(0)
    logits = torch.randn(5, 12) * 2
    logits[4] = 0.0                                       # ties: any order among them takes the same mass
    for top_p in (0.3, 0.8, 0.999, 1.0):
        x = logits.clone().requires_grad_(True)
        shifted, drop = nucleus(torch.log_softmax(x, -1), top_p)
        assert torch.equal(nucleus(torch.log_softmax(logits, -1), top_p, rows=2)[1], drop)   # found in pieces
        for r in range(len(logits)):
            p = torch.softmax(logits[r], -1).numpy().astype(np.float64)
            taken, mass = [], 0.0
            for i in np.argsort(-p, kind="stable"):
                if mass >= top_p:
                    break
                taken.append(i)
                mass += p[i]
            assert sorted(np.flatnonzero(~drop[r].numpy())) == sorted(taken) or r == 4
            assert (~drop[r]).sum() == len(taken)
            kept = ~drop[r]
            want = np.log(p[kept.numpy()] / p[kept.numpy()].sum())
            assert np.allclose(shifted[r][kept].detach().numpy(), want, atol=1e-5)
        shifted.gather(1, torch.zeros(5, 1, dtype=torch.long)).sum().backward()
        assert torch.isfinite(x.grad).all()
    assert not nucleus(torch.log_softmax(logits, -1), 1.0)[1].any()


def test_sampler_never_emits_a_banned_id_and_is_seeded():
    logits = torch.zeros(500, 8)
    logits[:, 3] = 10.0                       # the banned id is by far the most likely
    for greedy in (True, False):
        s = Settings(greedy=greedy, seed=7)
        tokens, lps = TokenChooser(torch.tensor([3]), s).choose(logits)
        assert not (tokens == 3).any()
        assert torch.allclose(lps, torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0])
    # a nucleus that holds only the banned id: an allowed one is drawn instead, never a crash
    tokens, _ = TokenChooser(torch.tensor([3]), Settings(top_p=0.5, seed=7)).choose(logits)
    assert not (tokens == 3).any()
    a = TokenChooser(torch.tensor([3]), Settings(seed=7)).choose(logits)[0]
    b = TokenChooser(torch.tensor([3]), Settings(seed=7)).choose(logits)[0]
    c = TokenChooser(torch.tensor([3]), Settings(seed=8)).choose(logits)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    forced = TokenChooser(torch.tensor([3]), Settings(greedy=True)).choose(logits[:2], [5, None])[0]
    assert forced.tolist()[0] == 5


class HostReads(TorchDispatchMode):
    """Counts the operations that read a tensor's value back to the host (.item(), int(t), ...)."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads.append(str(func))
        return func(*args, **(kwargs or {}))


def _no_host_reads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a host read inside the decode step")
    for name in ("tolist", "item", "numpy", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, refuse)


def test_a_decode_step_and_its_sampling_read_nothing_back(tiny, monkeypatch):
    model, proc = tiny
    img, fields, _ = world.probe_sample(np.random.default_rng(1), "medium")
    eng = Engine(model, proc, max_batch=3)
    prompt = encode_chunk(proc.tokenizer, "<think>a</think>")
    dec = eng.decoder
    dec.forward([0, 1, 2], [prompt, prompt[:3], prompt[:5]], [[], [], []], [0, 0, 0], [0, 0, 0])
    chooser = TokenChooser(eng.banned, Settings(temperature=1.0, top_p=0.9))
    starts = [len(prompt), 3, 5]
    with monkeypatch.context() as m, HostReads() as reads:
        _no_host_reads(m)
        logits, _ = dec.forward([0, 1, 2], [[5], [6], [7]], [[], [], []], starts, starts)
        tokens, lps = chooser.choose(logits, [None, None, None])
    assert reads.reads == []
    assert tokens.shape == (3,) and lps.shape == (3,)


def flash_reference(q, k_cache, v_cache, k=None, v=None, cache_seqlens=None, cache_batch_idx=None,
                    causal=False):
    """flash_attn_with_kvcache as documented: q [b, T, H, d]; the caches [rows, Lmax, kv, d]; k, v
    [b, T, kv, d] are written into row cache_batch_idx[i] from position cache_seqlens[i]; each query
    attends to that row's keys 0 .. seqlens + T - 1, causally aligned to the bottom right (query j
    sees keys <= seqlens + j); kv heads are shared by H / kv query heads. Returns [b, T, H, d]."""
    b, T, H, d = q.shape
    rows = cache_batch_idx.long() if cache_batch_idx is not None else torch.arange(b)
    out = []
    for i in range(b):
        r, s = int(rows[i]), int(cache_seqlens[i])
        if k is not None:
            k_cache[r, s:s + T], v_cache[r, s:s + T] = k[i], v[i]
        L = s + T
        g = H // k_cache.shape[2]
        K = k_cache[r, :L].transpose(0, 1).repeat_interleave(g, 0)   # [H, L, d]
        V = v_cache[r, :L].transpose(0, 1).repeat_interleave(g, 0)
        scores = q[i].transpose(0, 1) @ K.transpose(-1, -2) / d ** 0.5   # [H, T, L]
        if causal:
            seen = torch.arange(L)[None, :] <= (s + torch.arange(T))[:, None]
            scores = scores.masked_fill(~seen, float("-inf"))
        out.append((scores.softmax(-1) @ V).transpose(0, 1))
    return torch.stack(out)


def test_the_flash_branch_equals_sdpa_through_the_reference(tiny, monkeypatch):
    model, proc = tiny
    tok = proc.tokenizer
    monkeypatch.setattr(decoder, "flash_attn_with_kvcache", flash_reference)
    scenes = [world.probe_sample(np.random.default_rng(s), "medium") for s in (1, 2, 3)]
    zoom = lambda box: encode_chunk(tok, ZOOM.format(box=box))
    samples = lambda: [Sample(scenes[0][0], scenes[0][1]["problem"], forced=[zoom("[0.0, 0.0, 0.5, 0.5]")]),
                       Sample(scenes[1][0], scenes[1][1]["problem"]),
                       Sample(scenes[2][0], "<image>\nA longer question about a small yellow diamond?",
                              forced=[zoom("[0.5, 0.5, 1.0, 1.0]"), zoom("[0.2, 0.2, 0.4, 0.4]")])]
    runs = []
    for attention in ("sdpa", "flash"):
        eng = Engine(model, proc, max_batch=2)            # 3 samples, 2 rows: rows leave and join
        eng.decoder = decoder.Decoder(model, proc, 2, eng.max_len, attention=attention)
        assert eng.decoder.use_flash == (attention == "flash") and eng.decoder.cache.layout == attention
        runs.append(eng.run(samples(), greedy=True, max_turns=3, max_turn_tokens=12, progress=False))
    for a, b in zip(*runs):
        assert a.token_ids == b.token_ids
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)



def test_the_benchmark_reports_medians_and_spreads(tiny):
    from tools import bench
    model, proc = tiny
    f = bench.decode_figures(model, proc, 2, new_tokens=2, repeats=2)
    for key in ("engine_b2", "hf_b2", "speedup_b2", "call_speedup_b2", "engine_ms_per_step_b2"):
        assert f[key]["min"] <= f[key]["median"] <= f[key]["max"]    # (2 tokens: too few for the figure itself)
    assert f["outputs_match_b2"] is True          # the engine and generate agree, greedy


def test_the_rollout_benchmark_compares_shared_and_separate_prefills():
    from tools import bench
    f = bench.rollout_figures(repeats=1, questions=1, group=2)
    for key in ("rollouts_per_s_shared", "rollouts_per_s_apart", "rollout_speedup_shared"):
        assert 0 < f[key]["min"] <= f[key]["median"] <= f[key]["max"]


def test_decode_windows_give_the_eager_engines_trajectories():
    """k decode steps on the device between host reads (runner.py) against one read per step, on
    the committed base's real searches (tool calls, observation turns, stops mid-window, rows that
    leave and join), greedy: the same tokens, log-probs, turns and crops."""
    from minio3.model import load
    model, proc = load("tiny-base")
    tok = proc.tokenizer
    scenes = [world.probe_sample(np.random.default_rng([9, i]), lvl) for i, lvl in
              enumerate(["easy", "medium", "hard", "medium", "easy"])]
    zoom = lambda box: encode_chunk(tok, "<think>Look closer.</think>\n" + ZOOM.format(box=box))
    scripts = [[zoom("[0.0, 0.0, 0.5, 0.5]")], None, [zoom("[0.5, 0.0, 1.0, 0.5]"), zoom("[0.25, 0.25, 0.5, 0.5]")],
               None, [zoom("[0.0, 0.5, 0.5, 1.0]")]]   # scripted zooms first, then the base's own text
    samples = [Sample(img, fields["problem"], forced=f) for (img, fields, _), f in zip(scenes, scripts)]
    runs = {}
    for k in (1, 3, 8):
        eng = Engine(model, proc, max_batch=3)
        runs[k] = eng.run(samples, greedy=True, max_turns=4, max_turn_tokens=64, window=k, progress=False)
        if k > 1:
            assert eng.runner is not None              # the window path did run
    for k in (3, 8):
        for a, b in zip(runs[1], runs[k]):
            assert a.token_ids == b.token_ids and a.turn_texts == b.turn_texts and a.crops == b.crops
            assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
            assert (a.answer, a.exceeded, a.truncated) == (b.answer, b.exceeded, b.truncated)
    assert sum(len(t.crops) for t in runs[1]) >= 4      # observation turns, then free decoding after them
    assert sum(t.turns for t in runs[1]) > sum(len(f or []) for f in scripts)


def test_stop_mask_marks_every_token_that_can_end_a_stop_string():
    from minio3.engine.runner import stop_mask
    pieces = ["</", "grounding", ">", "</grounding>", "ing>", "x</grounding>y", "hello", "<|im_end|>", "g"]
    mask = stop_mask(pieces, ("</grounding>", "<|im_end|>")).tolist()
    assert mask == [False, False, True, True, True, True, False, True, False]


def test_a_decode_window_reads_back_once(tiny, monkeypatch):
    """k steps of a window: no value read back inside the steps, one .tolist() at the end."""
    from minio3.engine.runner import DecodeWindow, stop_mask
    model, proc = tiny
    eng = Engine(model, proc, max_batch=2)
    prompt = encode_chunk(proc.tokenizer, "<think>a</think>")
    eng.decoder.forward([0, 1], [prompt, prompt[:4]], [[], []], [0, 0], [0, 0])
    win = DecodeWindow(eng.decoder, 2)
    win.load([5, 6], [len(prompt), 4], [len(prompt), 4], [0, 0])
    chooser = TokenChooser(eng.banned, Settings(temperature=1.0))
    mask = stop_mask(eng.pieces, ("</grounding>", "<|im_end|>"))
    reads, real = [], torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real(t))
    with HostReads() as scalars:
        toks, lps, ran = win.run(2, 6, len(prompt) + 8, chooser.choose, mask, None, 100, 1000)
    assert scalars.reads == [] and len(reads) == 1
    assert len(toks) == 6 and all(len(r) == 2 for r in toks) and ran[0] == [True, True]
