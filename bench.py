"""The engine's benchmark: `python bench.py` prints one JSON object last.

1. Decode throughput, engine vs transformers' `model.generate`, same model, same prompts, greedy,
   the same number of new tokens, at batch 1 and 16 (prefill included in both).
2. A 6-turn rollout with an image in every observation, engine (cache kept across turns) vs the
   same rollout re-sending the whole history each turn: wall time and prefill tokens.
On CUDA it also runs a Qwen2.5-VL-7B-shaped random model in bf16 at batch 64 and reports the
fraction of the memory-bandwidth bound.
"""
from __future__ import annotations

import json
import time

import numpy as np
import torch

import make_probe
from common import IM_END, encode_chunk, image_token_count, prompt_text
from infer import Engine, Sample, Settings
from model import build_tiny

QUESTION = "<image>\nWhat is the character printed on the red triangle?"


def _images(n, seed=0):
    return [make_probe.probe_sample(np.random.default_rng([seed, i]), "medium")[0] for i in range(n)]


def _sync(device):
    if device.type == "cuda":
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


def bandwidth_fraction(model, processor, batch=64, new_tokens=64):
    """(weights + KV read per decode step) / step time, as a share of the measured copy bandwidth."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    t = time.time()
    for _ in range(10):
        x.clone()
    torch.cuda.synchronize()
    bw = 2 * 10 * x.numel() / (time.time() - t)
    images = _images(batch)
    secs, _ = engine_generate(model, processor, images, new_tokens)
    weights = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "visual" not in n)
    cfg = model.config.text_config
    ctx = 300 + new_tokens / 2
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * ctx * batch   # K and V, bf16
    step = secs / new_tokens
    return {"gpu_tokens_per_s_b64": batch * new_tokens / secs, "bandwidth_GBps": bw / 1e9,
            "bandwidth_bound_fraction": (weights + kv) / step / bw}


def bench(new_tokens: int = 64, tiny: bool = True):
    """tiny=False skips the CPU part (for a short GPU lease: only the 7B-shaped bf16 run)."""
    torch.manual_seed(0)
    model, processor = build_tiny()
    model.eval()
    out = {"device": "cpu", "model": "tiny (4.6M, float32)", "new_tokens": new_tokens}
    for b in (1, 16) if tiny else ():
        images = _images(b)
        engine_generate(model, processor, images[:1], 4)     # warm up both paths
        hf_generate(model, processor, images[:1], 4)
        # decode throughput: the time of N more tokens after the first (the prefill cancels out)
        e1, _ = engine_generate(model, processor, images, 1)
        te, ids_e = engine_generate(model, processor, images, new_tokens + 1)
        h1, _ = hf_generate(model, processor, images, 1)
        th, ids_h = hf_generate(model, processor, images, new_tokens + 1)
        de, dh = b * new_tokens / (te - e1), b * new_tokens / (th - h1)
        out[f"engine_decode_tokens_per_s_b{b}"] = de
        out[f"hf_generate_decode_tokens_per_s_b{b}"] = dh
        out[f"speedup_vs_hf_generate_b{b}"] = de / dh
        out[f"end_to_end_speedup_vs_hf_generate_b{b}"] = th / te   # prefill + decode
        out[f"outputs_match_b{b}"] = ids_e == ids_h
        print(f"batch {b}: decode engine {de:.0f} tok/s, generate {dh:.0f} tok/s; "
              f"whole call {th / te:.2f}x", flush=True)
    if tiny:
        mt = multiturn(model, processor, _images(8, seed=1))
        out.update(mt)
        out["speedup_vs_resend_multiturn"] = mt["multiturn_resend_s"] / mt["multiturn_kept_s"]
        out["prefill_tokens_ratio_vs_resend"] = mt["prefill_tokens_resend"] / mt["prefill_tokens_kept"]
    if torch.cuda.is_available():
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        rope = {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}
        text = dict(vocab_size=len(processor.tokenizer), hidden_size=3584, intermediate_size=18944,
                    num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_parameters=rope)
        vision = dict(depth=32, hidden_size=1280, out_hidden_size=3584, num_heads=16, intermediate_size=3420)
        ids = model.config
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=ids.image_token_id,
                               video_token_id=ids.video_token_id,
                               vision_start_token_id=ids.vision_start_token_id)
        with torch.device("cuda"):
            big = Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16).eval()
        out.update(bandwidth_fraction(big, processor))
        out["gpu_model"] = "Qwen2.5-VL-7B-shaped, random, bf16"
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    bench()
