"""The engine against plain transformers forwards without any cache."""
import numpy as np
import torch

from minio3.conversation import (IM_END, STOP_STRINGS, Episode, encode_chunk, image_token_count, prompt_text, render,
                    tool_turn_text)
from minio3.engine import Engine, Sample
from minio3.engine.sampler import BANNED_TOKENS
from minio3.model import collate
from minio3 import world

ZOOM = '<grounding>{{"bbox_2d": {box}, "source": "{src}"}}</grounding>'


def _scene(seed, level="medium"):
    img, fields, _ = world.probe_sample(np.random.default_rng(seed), level)
    return img, fields["problem"]


def test_decoder_logits_equal_transformers_forward(tiny):
    model, proc = tiny
    img, q = _scene(0)
    turns = [ZOOM.format(box="[0.25, 0.25, 0.5, 0.5]", src="original_image"),
             ZOOM.format(box="[0.1, 0.2, 0.9, 0.8]", src="observation_1"), "<think>x</think>\n<answer>3</answer>"]
    s = render(img, q, turns, proc)
    batch = collate([s], proc, "cpu")
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                    image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=(batch["input_ids"] == proc.image_token_id).int()).logits[0]
    eng = Engine(model, proc, max_batch=1)
    # feed the sequence in three chunks that cut the text between the images, so later chunks
    # continue a cached row with images inside them
    ids = s["ids"]
    ends = [i for i, t in enumerate(ids) if t == proc.tokenizer.convert_tokens_to_ids("<|vision_end|>")]
    cuts = [0, ends[0] + 3, ends[1] + 1, len(ids)]
    pos, k_img = 0, 0
    for a, b in zip(cuts, cuts[1:]):
        chunk = ids[a:b]
        n_img = sum(1 for i in range(a, b) if ids[i] == proc.image_token_id and ids[i - 1] != proc.image_token_id)
        logits, nxt = eng.forward([0], [chunk], [s["shown"][k_img:k_img + n_img]], [a], [pos])
        k_img += n_img
        pos = nxt[0]
        assert (logits[0] - ref[b - 1]).abs().max() < 1e-4
    assert k_img == 3


def naive_episode(model, proc, sample, max_turns, max_turn_tokens):
    """The reference: the whole conversation re-run through the transformers forward, no cache,
    at every step (positions from transformers' own get_rope_index)."""
    tok = proc.tokenizer
    banned = [tok.get_vocab()[t] for t in BANNED_TOKENS if t in tok.get_vocab()]
    ep = Episode(sample.image, proc.budget)
    ids = encode_chunk(tok, prompt_text(sample.question, sample.system), [image_token_count(ep.shown[0])])
    turns, turn = [], []
    while True:
        forced = sample.forced[len(turns)] if sample.forced and len(turns) < len(sample.forced) else None
        if forced and len(turn) < len(forced):
            token = forced[len(turn)]   # scripted: no need to run the model
        else:
            pv, grid = proc.pixels(ep.shown)
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(input_ids=x, pixel_values=pv, image_grid_thw=grid,
                               mm_token_type_ids=(x == proc.image_token_id).int()).logits[0, -1]
            logits[banned] = float("-inf")   # processor-only tokens
            token = int(logits.argmax())
        ids.append(token)
        turn.append(token)
        text = tok.decode(turn)
        if not (token == tok.convert_tokens_to_ids(IM_END) or any(s in text for s in STOP_STRINGS)):
            if len(turn) >= max_turn_tokens:
                return ids, "truncated"
            continue
        turns.append(text)
        turn = []
        action = ep.parse(text.replace(IM_END, ""))
        if action.kind in ("answer", "none"):
            return ids, action.kind
        if len(turns) >= max_turns:
            return ids, "exceeded"
        user, new = ep.apply(action)
        ids += encode_chunk(tok, tool_turn_text(user), [image_token_count(new)] if new else [])


def test_ragged_multiturn_batch_equals_naive_loop(tiny):
    model, proc = tiny
    tok = proc.tokenizer
    enc = lambda t: encode_chunk(tok, t)
    zoom = lambda box, src="original_image": enc(ZOOM.format(box=box, src=src))
    samples = [
        # two zooms (the second into the first crop), then free greedy text until the turn limit
        Sample(*_scene(1, "hard"), forced=[zoom("[0.0, 0.0, 0.5, 0.5]"), zoom("[0.5, 0.5, 1.0, 1.0]", "observation_1")]),
        # an invalid call (error turn), then a zoom, then free text
        Sample(*_scene(2, "easy"), forced=[enc('<grounding>{"bbox_2d": [0.9, 0.1, 0.2, 0.3], "source": "original_image"}</grounding>'),
                                            zoom("[0.3, 0.3, 0.6, 0.9]")]),
        # free text from the start, a longer question
        Sample(_scene(3)[0], "<image>\nA much longer question about the small yellow diamond near the edge?"),
        # a zoom, then an answer
        Sample(*_scene(4), forced=[zoom("[0.125, 0.25, 0.375, 0.5]"), enc("<answer>7</answer>") + [tok.convert_tokens_to_ids(IM_END)]]),
        # a zoom on every turn: hits the turn limit
        Sample(*_scene(5), forced=[zoom("[0.0, 0.0, 0.5, 0.5]")] * 3),
    ]
    eng = Engine(model, proc, max_batch=2)   # 5 samples through 2 slots: rows leave and join
    out = eng.run(samples, max_turns=3, greedy=True, max_turn_tokens=32, progress=False)
    flags = []
    for s, t in zip(samples, out):
        ref_ids, how = naive_episode(model, proc, s, max_turns=3, max_turn_tokens=32)
        assert t.token_ids == ref_ids
        flags.append(how)
        assert how != "exceeded" or t.exceeded_turns
        assert how != "truncated" or (t.truncated and not t.exceeded and not t.answered)
    assert flags[3] == "answer" and out[3].answer == "7" and out[3].answered
    assert flags[4] == "exceeded" and out[4].exceeded_turns and len(out[4].crops) == 2
    assert out[1].tool_errors == 1 and "x0 < x1" in tok.decode(out[1].token_ids)
    assert len(out[0].crops) == 2 and out[0].crops[1]["source"] == "observation_1"
    # nothing is fed twice: every token but each episode's last one went through the cache once
    assert eng.prefill_tokens + eng.decode_tokens == sum(len(t.token_ids) for t in out) - len(out)


def test_logprobs_equal_transformers_log_softmax(tiny):
    model, proc = tiny
    img, q = _scene(6)
    eng = Engine(model, proc, max_batch=2)
    t = eng.run([Sample(img, q)], max_turns=1, temperature=1.0, seed=3, max_turn_tokens=20, progress=False)[0]
    pv, grid = proc.pixels(t.shown)
    x = torch.tensor([t.token_ids])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=x, pixel_values=pv, image_grid_thw=grid,
                                     mm_token_type_ids=(x == proc.image_token_id).int()).logits[0].float(), -1)
    idx = [i for i, m in enumerate(t.sampled_mask) if m]
    assert len(idx) == 20
    ref = torch.tensor([lp[i - 1, t.token_ids[i]].item() for i in idx])
    assert torch.allclose(torch.tensor([t.logprobs[i] for i in idx]), ref, atol=1e-4)


def test_per_row_stop_strings(tiny):
    model, proc = tiny
    img, q = _scene(8)
    tok = proc.tokenizer
    forced = [encode_chunk(tok, "<think>a</think> done here") + encode_chunk(tok, " and more text")]
    out = Engine(model, proc).run([Sample(img, q, forced=forced, stop=("done",)), Sample(img, q, forced=forced)],
                                  max_turns=1, greedy=True, max_turn_tokens=12, progress=False)
    assert out[0].turn_texts[0].endswith("done") and not out[0].over_length
    assert "and more" in out[1].turn_texts[0]


def test_sampling_is_seeded(tiny):
    model, proc = tiny
    img, q = _scene(7)
    eng = Engine(model, proc, max_batch=2)
    runs = [eng.run([Sample(img, q)] * 2, max_turns=1, seed=s, max_turn_tokens=15, progress=False) for s in (1, 1, 2)]
    assert runs[0][0].token_ids == runs[1][0].token_ids and runs[0][1].token_ids == runs[1][1].token_ids
    assert runs[0][0].token_ids != runs[2][0].token_ids
    g = eng.run([Sample(img, q)], max_turns=1, greedy=True, max_turn_tokens=15, progress=False)[0]
    p = eng.run([Sample(img, q)], max_turns=1, top_p=1e-6, seed=9, max_turn_tokens=15, progress=False)[0]
    assert g.token_ids == p.token_ids   # top-p that keeps one token is greedy


def test_processor_only_tokens_are_never_sampled(tiny):
    """A model that puts nearly all its mass on <|image_pad|> still never emits it (it would claim an
    image that does not exist), and the log-probability reported is that of the full distribution."""
    model, proc = tiny
    pad = proc.image_token_id
    bias = torch.zeros(model.lm_head.weight.shape[0])
    bias[pad] = 30.0
    handle = model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    try:
        for greedy in (True, False):
            out = Engine(model, proc).run([Sample(*_scene(7))], max_turns=1, greedy=greedy, max_turn_tokens=8,
                                          progress=False)[0]
            sampled = [t for t, m in zip(out.token_ids, out.sampled_mask) if m]
            assert sampled and pad not in sampled
            assert max(lp for lp, m in zip(out.logprobs, out.sampled_mask) if m) < -20   # the pad held the mass
    finally:
        handle.remove()


def test_a_shared_prompt_and_picture_is_prefilled_once_with_the_same_trajectories(tiny):
    """The G rollouts of one question (one picture object, one question) are prefilled once and the
    cache row copied; greedy and sampled trajectories equal those of separate prefills (separate
    copies of the picture), token for token, and the prefill counts one prompt a question."""
    from copy import copy
    model, proc = tiny
    scenes = [_scene(s) for s in (3, 4)]
    shared = [Sample(img, q) for img, q in scenes for _ in range(4)]
    apart = [Sample(copy(img), q) for img, q in scenes for _ in range(4)]
    for kw in ({"greedy": True}, {"temperature": 1.0, "seed": 5}):
        runs = {}
        for name, samples in (("shared", shared), ("apart", apart)):
            eng = Engine(model, proc, max_batch=8)
            trajs = eng.run(samples, max_turns=3, max_turn_tokens=24, progress=False, **kw)
            runs[name] = ([t.token_ids for t in trajs], [t.logprobs for t in trajs], eng.prefill_tokens)
        assert runs["shared"][0] == runs["apart"][0]
        assert np.allclose(np.concatenate(runs["shared"][1]), np.concatenate(runs["apart"][1]), atol=1e-5)
        prompt = len(Engine(model, proc, max_batch=1).run([apart[0]], max_turns=1, max_turn_tokens=1,
                                                          progress=False)[0].token_ids) - 1
        assert runs["apart"][2] - runs["shared"][2] == 6 * prompt     # 3 of each 4 prompts not prefilled
