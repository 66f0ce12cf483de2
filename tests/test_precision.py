"""Mixed precision (issue 13): the trainers keep float32 master weights, whatever the device, so that
small AdamW updates are not rounded away; bf16 is for the compute only (autocast on CUDA)."""
import copy
import random
import warnings

import pytest
import torch

import collect
import sft
from minio3.conversation import render
from minio3.data import load_image, read_jsonl
from minio3.model import collate, save_checkpoint, start_run
from minio3 import explorer
from minio3 import trainer


def _batch(probe_dir, processor):
    row = read_jsonl(probe_dir / "train.jsonl")[0]
    image = load_image(row, probe_dir)
    res = explorer.explore(image, row["problem"], processor.budget, random.Random(0))
    return collate([render(image, row["problem"], res["turns"], processor)], processor, "cpu")


def _changed_share(model, batch, lr: float) -> float:
    """One AdamW step at `lr` under bf16 autocast: the share of trained weights that moved."""
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = sft.sft_loss(model, batch, int(batch["loss_mask"][:, 1:].sum()), 1)
    loss.backward()
    opt.step()
    with_grad = [(p, b) for p, b in zip(params, before) if p.grad is not None and p.grad.abs().sum() > 0]
    moved = sum(int((p.detach() != b).sum()) for p, b in with_grad)
    return moved / sum(b.numel() for _, b in with_grad)


def test_start_run_gives_float32_master_weights_even_from_a_bf16_checkpoint(tiny, tmp_path):
    model, proc = tiny
    save_checkpoint(copy.deepcopy(model).to(torch.bfloat16), proc, tmp_path / "bf16")   # the fixture stays fp32
    loaded, _, _ = start_run(tmp_path / "run", str(tmp_path / "bf16"), False, "cpu")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


def test_adamw_at_lr_1e6_moves_every_weight_in_fp32_but_few_in_bf16(tiny, probe_dir, tmp_path):
    """The GPU configuration's dtypes, emulated on the CPU: bf16 compute under autocast. With fp32
    master weights (what start_run gives) one step at lr 1e-6 changes every weight that has a
    gradient; with the weights themselves in bf16 (the old CUDA path) most updates round away."""
    model, proc = tiny
    save_checkpoint(model, proc, tmp_path / "init")
    batch = _batch(probe_dir, proc)
    master, _, _ = start_run(tmp_path / "a", str(tmp_path / "init"), False, "cpu")
    assert _changed_share(master.train(), batch, 1e-6) > 0.999
    pure_bf16, _, _ = start_run(tmp_path / "b", str(tmp_path / "init"), False, "cpu")
    assert _changed_share(pure_bf16.to(torch.bfloat16).train(), batch, 1e-6) < 0.2


def test_precision_choice_sets_the_compute_dtype_on_the_cpu(tiny, probe_dir, tmp_path):
    """`auto` on the CPU is float32 (the same loss as `fp32`, to the bit); `bf16` runs the matrix
    work in bfloat16 there too: a loss near the float32 one but not equal, float32 gradients."""
    from minio3 import parallel
    model, proc = tiny
    batch = _batch(probe_dir, proc)
    assert not parallel.uses_bf16("cpu", "auto") and parallel.uses_bf16("cuda", "auto")
    assert parallel.uses_bf16("cpu", "bf16") and not parallel.uses_bf16("cuda", "fp32")
    losses = {}
    for precision in ("fp32", "auto", "bf16"):
        model.zero_grad(set_to_none=True)
        losses[precision], _ = trainer.train_step(model, [batch], sft.sft_loss, 0, tmp_path, precision)
        assert {p.grad.dtype for p in model.parameters() if p.grad is not None} == {torch.float32}
    model.zero_grad(set_to_none=True)
    assert losses["auto"] == losses["fp32"]
    assert losses["bf16"] != losses["fp32"] and abs(losses["bf16"] - losses["fp32"]) < 0.05 * losses["fp32"]
    with pytest.raises(ValueError, match="fp16"):
        parallel.uses_bf16("cpu", "fp16")


def test_best_precision_follows_the_cpu_and_forced_bf16_without_it_warns(tiny, monkeypatch):
    """`best` is bf16 exactly where the hardware computes it (CUDA; a CPU with AVX-512 BF16 or
    AMX) and float32 elsewhere; `bf16` forced on a CPU without either warns (emulated, several times slower)."""
    from minio3 import parallel
    model, _ = tiny
    assert parallel.uses_bf16("cuda", "best")
    for avx512_bf16, amx in ((False, False), (True, False), (False, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert parallel.native_bf16("cpu") == (avx512_bf16 or amx)
        assert parallel.uses_bf16("cpu", "best") == (avx512_bf16 or amx)
        assert not parallel.uses_bf16("cpu", "auto") and parallel.uses_bf16("cpu", "bf16")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    with pytest.warns(UserWarning, match="emulated"):
        parallel.prepare(model, False, "bf16", parallel.World())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for precision in ("best", "fp32", "auto"):
            parallel.prepare(model, False, precision, parallel.World())
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        parallel.prepare(model, False, "bf16", parallel.World())
