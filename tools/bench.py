"""The engine's benchmark: `python -m tools.bench [--repeats 5]` prints one JSON object last.

1. Decode throughput, engine vs transformers' `model.generate`, same model, same prompts, greedy,
   at batch 1 and 16. Decode is timed apart from the prefill: the time of a call making N + 1 new
   tokens minus that of a call making 1. After a warm-up each figure is measured --repeats times
   and reported as the median with its spread (min, max); the whole call (prefill included) too.
2. A 6-turn rollout with an image in every observation, engine (cache kept across turns) vs the
   same rollout re-sending the whole history each turn: wall time and prefill tokens.
3. RL-shaped rollouts (4 hard questions x 8 rollouts of the committed base, 6 turns, T 0.7): rollouts
   a second with each question's prompt and picture prefilled once, and once a rollout.
On CUDA it also runs a Qwen2.5-VL-7B-shaped random model in bf16 at batch 1, 16 and 64: decode
tokens/s, ms per step, and the fraction of the memory-bandwidth roofline ((weights + KV read per
step) / measured copy bandwidth), against `generate` at batch 64.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

from minio3.conversation import IM_END, encode_chunk, image_token_count, prompt_text
from minio3.engine import Engine, Sample, Settings
from minio3.model import build_tiny, load
from minio3 import world

QUESTION = "<image>\nWhat is the character printed on the red triangle?"


def _images(n, seed=0):
    return [world.probe_sample(np.random.default_rng([seed, i]), "medium")[0] for i in range(n)]


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def hf_generate(model, processor, images, new_tokens):
    """transformers' generate on left-padded prompts; returns (seconds, new token ids)."""
    _sync(model.device)
    t = time.time()   # the request's preparation counts, as it does in the engine
    tok = processor.tokenizer
    shown = [processor.budget.resize(im) for im in images]
    seqs = [encode_chunk(tok, prompt_text(QUESTION), [image_token_count(s)]) for s in shown]
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tok.pad_token_id)
    att = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, n - len(s):], att[i, n - len(s):] = torch.tensor(s), 1
    pv, grid = processor.pixels(shown)
    dev = model.device
    kw = dict(input_ids=ids.to(dev), attention_mask=att.to(dev), pixel_values=pv.to(dev, model.dtype),
              image_grid_thw=grid.to(dev), mm_token_type_ids=(ids == processor.image_token_id).int().to(dev))
    out = model.generate(**kw, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    _sync(dev)
    return time.time() - t, out[:, n:].tolist()


def engine_generate(model, processor, images, new_tokens):
    eng = Engine(model, processor, max_batch=len(images))
    _sync(model.device)
    t = time.time()
    settings = Settings(max_turns=1, greedy=True, max_turn_tokens=new_tokens, stop=(), eos=False)
    res = eng.run([Sample(im, QUESTION) for im in images], settings, progress=False)
    _sync(model.device)
    return time.time() - t, [r.token_ids[-new_tokens:] for r in res]


def run_end(mask: list[bool], i: int) -> int:
    """End of the run of sampled tokens that starts at i (one assistant turn)."""
    while i < len(mask) and mask[i]:
        i += 1
    return i


def multiturn(model, processor, images, turns=6):
    """The same forced 6-turn search (5 zooms, then an answer) with the cache kept, and re-sent."""
    tok = processor.tokenizer
    rng = np.random.default_rng(0)
    scripts = []
    for _ in images:
        zs = []
        for _ in range(turns - 1):
            x, y = rng.uniform(0, 0.8, 2)
            box = f"[{x:.3f}, {y:.3f}, {x + 0.125:.3f}, {y + 0.125:.3f}]"
            zs.append(encode_chunk(tok, "<think>Check the next one.</think>\n<grounding>{\"bbox_2d\": " + box
                                   + ', "source": "original_image"}</grounding>'))
        answer = encode_chunk(tok, "<think>Found it.</think>\n<answer>7</answer>")
        zs.append(answer + [tok.convert_tokens_to_ids(IM_END)])
        scripts.append(zs)
    samples = [Sample(im, QUESTION, forced=s) for im, s in zip(images, scripts)]
    eng = Engine(model, processor, max_batch=len(images))
    _sync(model.device)
    t = time.time()
    res = eng.run(samples, max_turns=turns, greedy=True, progress=False)
    _sync(model.device)
    kept = time.time() - t
    kept_prefill = eng.prefill_tokens
    # re-send: turn k starts a fresh conversation holding the whole history so far (every image
    # encoded again), then decodes that turn's tokens with a cache of its own
    eng2 = Engine(model, processor, max_batch=len(images))
    n, slots = len(res), list(range(len(res)))
    starts = [[i for i in range(1, len(m)) if m[i] and not m[i - 1]] for m in (r.sampled_mask for r in res)]
    t = time.time()
    resend_prefill = 0
    for k in range(turns):
        hist = [r.token_ids[:s[k]] for r, s in zip(res, starts)]
        _, pos = eng2.forward(slots, hist, [r.shown[:k + 1] for r in res], [0] * n, [0] * n)
        resend_prefill += sum(map(len, hist))
        lens = [len(h) for h in hist]
        turn = [r.token_ids[s[k]:run_end(r.sampled_mask, s[k])] for r, s in zip(res, starts)]
        for j in range(max(map(len, turn)) - 1):
            eng2.forward(slots, [[tt[min(j, len(tt) - 1)]] for tt in turn], [[] for _ in slots], lens, pos)
            lens = [x + 1 for x in lens]
            pos = [x + 1 for x in pos]
    _sync(model.device)
    resend = time.time() - t
    return {"multiturn_kept_s": kept, "multiturn_resend_s": resend, "prefill_tokens_kept": kept_prefill,
            "prefill_tokens_resend": resend_prefill, "trajectory_tokens": sum(len(r.token_ids) for r in res)}


def decode_figures(model, processor, b: int, new_tokens: int, repeats: int, hf: bool = True) -> dict:
    """Decode tokens/s of the engine (and generate), median and spread over `repeats` after a warm-up."""
    images = _images(b)
    engine_generate(model, processor, images, 2)               # warm up both paths (first-call costs)
    if hf:
        hf_generate(model, processor, images, 2)
    runs = []
    for _ in range(repeats):
        e1, _ = engine_generate(model, processor, images, 1)
        te, ids_e = engine_generate(model, processor, images, new_tokens + 1)
        row = {"engine": b * new_tokens / (te - e1), "engine_ms_per_step": 1000 * (te - e1) / new_tokens,
               "engine_call_s": te}
        if hf:
            h1, _ = hf_generate(model, processor, images, 1)
            th, ids_h = hf_generate(model, processor, images, new_tokens + 1)
            row.update(hf=b * new_tokens / (th - h1), call_speedup=th / te, match=ids_e == ids_h)
            row["speedup"] = row["engine"] / row["hf"]
        runs.append(row)
    out = {}
    for key in runs[0]:
        if key == "match":
            out[f"outputs_match_b{b}"] = all(r["match"] for r in runs)
            continue
        v = np.array([r[key] for r in runs])
        out[f"{key}_b{b}"] = {"median": float(np.median(v)), "min": float(v.min()), "max": float(v.max())}
    return out


def copy_bandwidth() -> float:
    """Bytes per second of a device-to-device copy (read + write), the roofline's denominator."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    x.clone()
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(10):
        x.clone()
    torch.cuda.synchronize()
    return 2 * 10 * x.numel() / (time.time() - t)


def roofline(model, processor, figures: dict, b: int, new_tokens: int, bw: float) -> float:
    """(weights + KV bytes read per decode step) / step time / copy bandwidth."""
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    cfg = model.config.text_config
    prompt = len(encode_chunk(processor.tokenizer, prompt_text(QUESTION),
                              [image_token_count(processor.budget.resize(_images(1)[0]))]))
    ctx = prompt + new_tokens / 2                                  # the mean cached length over the steps
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * ctx * b   # K and V, bf16
    step_s = figures[f"engine_ms_per_step_b{b}"]["median"] / 1000
    return (weights + kv) / step_s / bw


def gpu_figures(processor, new_tokens: int, repeats: int) -> dict:
    from minio3.engine.decoder import flash_attn_with_kvcache
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    tiny_cfg = build_tiny()[0].config
    rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
    text = dict(vocab_size=len(processor.tokenizer), hidden_size=3584, intermediate_size=18944,
                num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_parameters=rope)
    vision = dict(depth=32, hidden_size=1280, out_hidden_size=3584, num_heads=16, intermediate_size=3420)
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=tiny_cfg.image_token_id,
                           video_token_id=tiny_cfg.video_token_id,
                           vision_start_token_id=tiny_cfg.vision_start_token_id)
    with torch.device("cuda"):
        big = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
    out = {"gpu_model": "Qwen2.5-VL-7B-shaped, random, bf16",
           "gpu_attention": "flash_attn_with_kvcache" if flash_attn_with_kvcache else "scaled_dot_product_attention"}
    bw = copy_bandwidth()
    out["bandwidth_GBps"] = bw / 1e9
    for b in (1, 16, 64):
        f = decode_figures(big, processor, b, new_tokens, repeats, hf=b == 64)
        f[f"roofline_fraction_b{b}"] = roofline(big, processor, f, b, new_tokens, bw)
        out.update({f"gpu_{k}": v for k, v in f.items()})
        print(f"gpu batch {b}: {f[f'engine_b{b}']['median']:.0f} tok/s, "
              f"{f[f'engine_ms_per_step_b{b}']['median']:.1f} ms a step, roofline {f[f'roofline_fraction_b{b}']:.2f}",
              flush=True)
    return out


def rollout_figures(repeats: int = 3, questions: int = 4, group: int = 8, device: str = "cpu") -> dict:
    """RL-shaped rollouts: `questions` hard probe questions x `group` rollouts of the committed base,
    6 turns, temperature 0.7 (run_tiny's), one engine call as an RL step makes it; rollouts a
    second with each question's prompt and picture prefilled once (the engine now) and once per
    rollout (before), measured alternately, the median of `repeats` and its spread."""
    model, processor = load("tiny-base", device=device)
    scenes = [world.probe_sample(np.random.default_rng([11, i]), "hard") for i in range(questions)]
    samples = [Sample(img, f["problem"]) for img, f, _ in scenes for _ in range(group)]
    settings = Settings(max_turns=6, temperature=0.7, max_turn_tokens=256, seed=0)
    times = {True: [], False: []}
    for r in range(repeats + 1):                 # the first round warms up (kernels for new shapes)
        for share in (True, False):
            eng = Engine(model, processor, max_batch=32, max_len=4096, share_prefix=share)
            _sync(device)
            t0 = time.perf_counter()
            eng.run(samples, settings, progress=False)
            _sync(device)
            if r:
                times[share].append(len(samples) / (time.perf_counter() - t0))
    spread = lambda v: {"median": float(np.median(v)), "min": float(min(v)), "max": float(max(v))}
    ratio = [a / b for a, b in zip(times[True], times[False])]
    return {"rollouts_per_s_shared": spread(times[True]), "rollouts_per_s_apart": spread(times[False]),
            "rollout_speedup_shared": spread(ratio), "rollout_workload": f"{questions} x {group}, 6 turns, T 0.7"}


def bench(new_tokens: int = 64, tiny: bool = True, repeats: int = 5):
    """tiny=False skips the CPU part (for a short GPU lease: only the 7B-shaped bf16 run)."""
    torch.manual_seed(0)
    model, processor = build_tiny()
    model.eval()
    out = {"device": "cpu", "model": "tiny (4.6M, float32)", "new_tokens": new_tokens, "repeats": repeats,
           "threads": torch.get_num_threads()}
    for b in (1, 16) if tiny else ():
        f = decode_figures(model, processor, b, new_tokens, repeats)
        out.update(f)
        print(f"batch {b}: decode engine {f[f'engine_b{b}']['median']:.0f} tok/s, generate "
              f"{f[f'hf_b{b}']['median']:.0f} tok/s: {f[f'speedup_b{b}']['median']:.2f}x "
              f"(spread {f[f'speedup_b{b}']['min']:.2f}-{f[f'speedup_b{b}']['max']:.2f}); whole call "
              f"{f[f'call_speedup_b{b}']['median']:.2f}x", flush=True)
    if tiny:
        mt = multiturn(model, processor, _images(8, seed=1))
        out.update(mt)
        out["speedup_vs_resend_multiturn"] = mt["multiturn_resend_s"] / mt["multiturn_kept_s"]
        out["prefill_tokens_ratio_vs_resend"] = mt["prefill_tokens_resend"] / mt["prefill_tokens_kept"]
    if tiny:
        rf = rollout_figures(max(1, repeats // 2))
        out.update(rf)
        print(f"rollouts (4 x 8, 6 turns, T 0.7): {rf['rollouts_per_s_shared']['median']:.2f}/s with the prompt "
              f"prefilled once a question, {rf['rollouts_per_s_apart']['median']:.2f}/s once a rollout: "
              f"{rf['rollout_speedup_shared']['median']:.2f}x", flush=True)
    if torch.cuda.is_available():
        out.update(gpu_figures(processor, new_tokens, repeats))
        rf = rollout_figures(2, questions=16, device="cuda")
        out.update({f"gpu_{k}": v for k, v in rf.items()})
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="measurements per figure (median and spread)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--gpu-only", action="store_true", help="skip the CPU part (a short GPU lease)")
    a = ap.parse_args()
    bench(a.new_tokens, not a.gpu_only, a.repeats)
