
import pytest
import torch
from PIL import Image

from minio3.conversation import encode_chunk, image_token_count, prompt_text
from minio3.data import read_jsonl, write_jsonl
from minio3.model import SPECIAL_TOKENS, load, save_checkpoint


def test_tokenizer_has_qwen_special_tokens(tiny):
    _, proc = tiny
    tok = proc.tokenizer
    for t in SPECIAL_TOKENS:
        ids = tok.encode(t, add_special_tokens=False)
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == t
    text = '<think>ok</think>\n<grounding>{"bbox_2d": [0.125, 0.250, 0.375, 0.500], "source": "original_image"}</grounding>'
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("<grounding>")) == 1 and len(tok.encode(" 0.375")) == 1


def _inputs(proc, images, question="<image>\nWhat is here?"):
    budget = proc.budget
    shown = [budget.resize(im) for im in images]
    text = prompt_text(question).replace("<|vision_end|>", "<|vision_end|>" + "and<|vision_start|><|image_pad|><|vision_end|>" * (len(images) - 1), 1)
    ids = encode_chunk(proc.tokenizer, text, [image_token_count(s) for s in shown])
    pv, grid = proc.pixels(shown)
    mm = (torch.tensor([ids]) == proc.image_token_id).int()
    return dict(input_ids=torch.tensor([ids]), pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=mm)


def test_save_load_round_trip_and_two_image_forward(tiny, tmp_path):
    model, proc = tiny
    images = [Image.new("RGB", (300, 200), (200, 30, 30)), Image.new("RGB", (100, 160), (20, 30, 200))]
    inputs = _inputs(proc, images)
    with torch.no_grad():
        a = model(**inputs).logits
    assert a.shape[1] == inputs["input_ids"].shape[1] and torch.isfinite(a).all()
    save_checkpoint(model, proc, tmp_path / "ck", {"note.txt": "hello"})
    assert not list(tmp_path.glob("ck.tmp*")) and (tmp_path / "ck" / "note.txt").read_text() == "hello"
    model2, proc2 = load(str(tmp_path / "ck"))
    assert proc2.budget == proc.budget and proc2.tokenizer.encode("red triangle") == proc.tokenizer.encode("red triangle")
    with torch.no_grad():
        b = model2(**inputs).logits
    assert torch.allclose(a, b, atol=1e-5)


def test_load_tiny_is_seeded():
    m1, _ = load("tiny", seed=3)
    m2, _ = load("tiny", seed=3)
    m3, _ = load("tiny", seed=4)
    w = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(m1.state_dict()[w], m2.state_dict()[w]) and not torch.equal(m1.state_dict()[w], m3.state_dict()[w])


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    write_jsonl(p, [{"a": 1}, {"b": 2}])
    assert read_jsonl(p) == [{"a": 1}, {"b": 2}]
    p.write_text('{"a": 1}\n\n{"b": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:3: not valid JSON"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: expected a JSON object"):
        read_jsonl(p)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "out.jsonl"
    write_jsonl(p, [{"keep": True}])

    def rows():
        yield {"x": 1}
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError):
        write_jsonl(p, rows())
    assert read_jsonl(p) == [{"keep": True}] and [f.name for f in tmp_path.iterdir()] == ["out.jsonl"]


def test_token_logprobs_of_a_padded_batch_equal_each_sample_alone(tiny, probe_dir):
    """A right-padded batch runs with the causal mask alone (no padding mask): the real tokens'
    log-probs must equal each conversation's own forward without padding; a batch padded on the
    left keeps its mask and still matches."""
    from minio3.conversation import render
    from minio3.data import load_image, read_jsonl
    from minio3.model import collate, token_logprobs
    model, proc = tiny
    rows = read_jsonl(probe_dir / "train.jsonl")[:3]   # three conversations of different lengths
    samples = [render(load_image(r, probe_dir), r["problem"], ["I look. " * 6 * i + f"<answer>{r['solution']}</answer>"],
                      proc) for i, r in enumerate(rows)]
    assert len({len(s["ids"]) for s in samples}) == 3
    with torch.no_grad():
        batch = collate(samples, proc, "cpu")
        together = token_logprobs(model, batch)
        for j, s in enumerate(samples):
            alone = token_logprobs(model, collate([s], proc, "cpu", multiple=1))[0]
            assert torch.allclose(together[j, :len(s["ids"])], alone, atol=1e-5)
        left = {k: v.clone() for k, v in batch.items()}   # the same rows padded on the left instead
        for j, s in enumerate(samples):
            k, n = len(s["ids"]), left["input_ids"].shape[1]
            for key in ("input_ids", "attention_mask", "loss_mask"):
                left[key][j] = torch.roll(batch[key][j], n - k)
            left["position_ids"][:, j] = torch.roll(batch["position_ids"][:, j], n - k, dims=-1)
        shifted = token_logprobs(model, left)
        for j, s in enumerate(samples):
            k, n = len(s["ids"]), left["input_ids"].shape[1]
            assert torch.allclose(shifted[j, n - k + 1:], together[j, 1:k], atol=1e-4)
