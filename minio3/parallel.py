"""One node, several processes: `torchrun --nproc_per_node N sft.py ...` (or rl.py) with FSDP2.

Run without torchrun, every function here is a no-op or the plain single-process version, so one
process keeps working unchanged. Under torchrun:
  * `setup()` joins the process group (NCCL on CUDA, gloo on the CPU) and picks this rank's device;
  * `shard()` applies FSDP2's `fully_shard` to every vision block and decoder layer, then to the
    root: the float32 master weights and AdamW's state are split over the ranks; on CUDA the
    compute runs in bf16 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`);
  * gradients are averaged over the ranks by FSDP, so a rank's loss is scaled by the world size
    and divided by a token count summed over all ranks (`World.sum`): the result equals one process
    that saw every rank's samples;
  * `save()` writes the plain Hugging Face folder (rank 0 gathers the full weights) and the
    optimizer's shards with torch.distributed.checkpoint; `load_optimizer()` reads them back;
  * `copy_weights()` fills an unsharded replica (the engine's model) from the sharded trainer one
    tensor at a time.
"""
from __future__ import annotations

import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from minio3.model import by_length

OPTIMIZER_DIR = "optimizer_shards"   # inside a checkpoint written under torchrun


@dataclass
class World:
    rank: int = 0
    size: int = 1
    device: str = "cpu"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1

    def sum(self, value: float) -> float:
        """The sum over the ranks of a number every rank holds."""
        if not self.sharded:
            return value
        t = torch.tensor([float(value)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item())

    def max(self, value: int) -> int:
        if not self.sharded:
            return value
        t = torch.tensor([int(value)], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def gather(self, obj) -> list:
        """Every rank's `obj`, in rank order (on every rank)."""
        if not self.sharded:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self):
        if self.sharded:
            dist.barrier()


def peak_memory_gb(world: World) -> float | None:
    """The largest CUDA memory any rank has held so far (GB); None off CUDA."""
    if not world.device.startswith("cuda"):
        return None
    return world.max(torch.cuda.max_memory_allocated()) / 1e9


def setup(device: str | None = None) -> World:
    """This process's place: one process (WORLD_SIZE unset or 1) or a torchrun rank."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        from minio3.model import pick_device
        return World(0, 1, device or pick_device())
    cuda = torch.cuda.is_available() and device != "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), f"cuda:{local}" if cuda else "cpu")


def prepare(model, grad_checkpointing: bool, precision: str, world: World):
    """Gradient checkpointing (recompute each layer's activations in backward: less memory, about
    a third more compute), then FSDP2 under torchrun. Call after choosing the trainable weights."""
    if grad_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)   # (transformers >= 5.2x)
        if enable:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kind = next(model.parameters()).device.type
    if kind == "cpu" and uses_bf16(kind, precision) and not native_bf16(kind):
        warnings.warn("--precision bf16 on a CPU without AVX-512 BF16 or AMX: bfloat16 is emulated there, several "
                      "times slower than float32 (6.6x on one SFT step measured); use --precision best or fp32",
                      stacklevel=2)
    shard(model, world, precision)


PRECISIONS = ("auto", "best", "bf16", "fp32")
PRECISION_HELP = ("the compute's precision: bf16 autocast over float32 weights (AdamW's state stays float32), "
                  "or float32 throughout; auto: bf16 on CUDA, float32 on the CPU; best: bf16 where the "
                  "hardware computes it (CUDA, a CPU with AVX-512 BF16 or AMX), float32 elsewhere")


def native_bf16(device_type: str) -> bool:
    """Whether this machine computes bfloat16 natively: CUDA, or a CPU with AVX-512 BF16 or AMX.
    Elsewhere (AVX2 CPUs: most laptops, older servers) bf16 matrix work is emulated and measured
    6.6x slower than float32 on one SFT step, measured on such a CPU."""
    if device_type == "cuda":
        return True
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")   # private: absent means no
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def uses_bf16(device_type: str, precision: str) -> bool:
    """Whether the compute runs in bfloat16: always with "bf16", never with "fp32", on CUDA only
    with "auto", where the hardware computes it natively with "best" (on a CPU with AVX-512 BF16 it
    was about 1.5x faster than float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: choose from {PRECISIONS}")
    if precision == "best":
        return native_bf16(device_type)
    return precision == "bf16" or (precision == "auto" and device_type == "cuda")


def autocast(model, precision: str):
    """bf16 autocast over float32 weights in one process (FSDP2's policy does it when sharded)."""
    kind = next(model.parameters()).device.type
    return torch.autocast(kind, dtype=torch.bfloat16, enabled=uses_bf16(kind, precision))


def shard(model, world: World, precision: str = "auto"):
    """FSDP2 over the model: one unit per vision block and per decoder layer, then the root."""
    if not world.sharded:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    kind = "cuda" if world.device.startswith("cuda") else "cpu"
    mesh = init_device_mesh(kind, (world.size,))
    # bf16 parameters under FSDP on CUDA only; sharded on the CPU (gloo, the tests) they stay float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if kind == "cuda" and uses_bf16(kind, precision) else MixedPrecisionPolicy()
    for block in model.model.visual.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    for layer in model.model.language_model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) one: all-gathers a DTensor, a collective call."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@torch.no_grad()
def copy_weights(src, dst):
    """dst's weights := src's (dst unsharded, any dtype; src possibly FSDP-sharded). One tensor at
    a time, in the same order on every rank, so the gathers match."""
    target = dst.state_dict()
    for name, value in src.state_dict().items():
        target[name].copy_(full_value(value))


def grad_norm(model, clip: float) -> float:
    """Clip the gradients' global norm to `clip`; the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    return float(full_value(norm))


def save(model, opt, processor, out: Path, world: World, extra: dict):
    """A checkpoint: the Hugging Face folder (rank 0, full weights) with `extra` files; under
    torchrun the optimizer's shards go beside them (torch.distributed.checkpoint), one process
    keeps the optimizer inside trainer_state.pt as before."""
    from minio3.model import save_checkpoint
    if not world.sharded:
        save_checkpoint(model, processor, out, {**extra, "trainer_state.pt": {
            **extra.get("trainer_state.pt", {}), "optimizer": opt.state_dict()}})
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _tied(model):
        weights.pop("lm_head.weight", None)   # one tensor under two names: saved once, as one process does
    staging = out.parent / f".{out.name}.optimizer-staging"
    if world.main and staging.exists():
        shutil.rmtree(staging)
    world.barrier()
    dcp.save({"optimizer": get_optimizer_state_dict(model, opt)}, checkpoint_id=str(staging))
    world.barrier()
    if world.main:
        _write_main(model, weights, processor, out, staging, extra)
    world.barrier()


def _tied(model) -> bool:
    cfg = model.config
    return bool(getattr(cfg, "tie_word_embeddings", False)
                or getattr(getattr(cfg, "text_config", None), "tie_word_embeddings", False))


def _write_main(model, weights: dict, processor, out: Path, staging: Path, extra: dict):
    from minio3.data import atomic_path
    with atomic_path(out) as tmp:
        model.save_pretrained(tmp, state_dict=weights)
        processor.save_pretrained(tmp)
        shutil.move(str(staging), str(tmp / OPTIMIZER_DIR))
        for name, obj in extra.items():
            torch.save(obj, tmp / name)


def load_optimizer(model, opt, out: Path, state: dict, world: World):
    """Put a checkpoint's optimizer state back: from trainer_state.pt (written by one process) or
    from its shards (written under torchrun; read back at any world size, one process included)."""
    if "optimizer" in state and not world.sharded:
        opt.load_state_dict(state["optimizer"])
        return
    if "optimizer" in state:
        raise ValueError(f"{out} was written by one process: resume it without torchrun")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    shards = Path(out) / OPTIMIZER_DIR
    if not shards.is_dir():
        raise FileNotFoundError(f"{out}: no {OPTIMIZER_DIR}/ (was it written by one process? resume it so)")
    sd = {"optimizer": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=str(shards))
    set_optimizer_state_dict(model, opt, sd["optimizer"])


def close(world: World):
    if world.sharded and dist.is_initialized():
        dist.destroy_process_group()


# Under torchrun every rank takes the same number of forwards in an RL update (FSDP gathers in each).
def minibatches(order: list[int], size: int, world: World, filler: int) -> list[list[int]]:
    """The kept trajectories in mini-batches of `size`; every rank gets as many as the busiest one,
    padded with `filler`, a row that teaches nothing."""
    chunks = [order[b:b + size] for b in range(0, len(order), size)]
    return chunks + [[filler]] * (world.max(len(chunks)) - len(chunks))


def length_runs(idx: list[int], parts: int, length, world: World, filler: int) -> list[list[int]]:
    """One mini-batch's rows in runs of similar `length` (model.by_length), each forwarded on its own;
    under torchrun every rank makes exactly `parts` runs, the missing ones (in a short last
    mini-batch) being the `filler` row."""
    runs = by_length(idx, parts, length)
    return runs + [[filler]] * (parts - len(runs)) if world.sharded else runs
