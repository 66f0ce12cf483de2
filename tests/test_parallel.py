"""torchrun + FSDP2 on the CPU (gloo, 2 ranks, tiny model, float32): the same step as one process,
resume after a kill, the saved folder at world size 1, RL on 2 ranks, the engine on gathered weights,
gradient checkpointing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minio3 import parallel
import sft
from minio3.data import read_jsonl
from conftest import write_explorer_run
from minio3.model import load

ROOT = Path(__file__).resolve().parents[1]

# Runs a stage's main under torchrun; KILL_AT=n kills every rank at its n-th forward (a crash
# mid-run); REWARD=parity gives rewards with signal (as tests/test_rl.py does); ENGINE=path runs
# the engine check instead of a stage.
WRAPPER = f'''
import json, os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
import rl, sft
from minio3 import model as M, parallel
kill = int(os.environ.get("KILL_AT", "0"))
if kill:
    real, n = sft.token_logprobs, {{"c": 0}}
    def dying(model, batch):
        n["c"] += 1
        if n["c"] == kill:
            os._exit(3)
        return real(model, batch)
    sft.token_logprobs = dying
if os.environ.get("REWARD") == "parity":
    rl.rewards_for = lambda trajs, rows, *a, **k: [float(t.token_ids[-1] % 2) for t in trajs]
if os.environ.get("ENGINE"):
    from minio3.engine import Engine, Sample
    from PIL import Image
    world = parallel.setup()
    model, proc = M.load(sys.argv[1], dtype=torch.float32)
    parallel.shard(model, world, "fp32")
    replica = M.load(sys.argv[1], dtype=torch.float32)[0]
    with torch.no_grad():
        for p in replica.parameters():
            p.mul_(0.5)                     # spoiled, so that the copy has to fill every weight
    parallel.copy_weights(model, replica)
    sample = Sample(Image.open(sys.argv[2]).convert("RGB"), "<image>\\nWhat is on the red circle?")
    t = Engine(replica, proc, max_batch=1).run([sample], greedy=True, max_turns=2, max_turn_tokens=16,
                                               progress=False)[0]
    if world.main:
        json.dump({{"ids": t.token_ids, "logprobs": t.logprobs}}, open(os.environ["ENGINE"], "w"))
    parallel.close(world)
else:
    {{"sft": sft.main, "rl": rl.main}}[sys.argv[1]](sys.argv[2:])
'''


def torchrun(tmp: Path, args: list[str], **env) -> subprocess.CompletedProcess:
    script = tmp / "wrapper.py"
    script.write_text(WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script), *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env}, capture_output=True, text=True,
                          timeout=600)


def losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in read_jsonl(out.parent / (out.name + "_log.jsonl"))}


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = load(str(a))[0].state_dict(), load(str(b))[0].state_dict()
    assert set(wa) == set(wb)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


@pytest.fixture(scope="module")
def run_dir(tiny, probe_dir, tmp_path_factory):
    return write_explorer_run(tmp_path_factory.mktemp("parallel"), tiny, probe_dir)


def sft_args(root: Path, out: Path) -> list[str]:
    # batch 5 on 2 ranks: one rank takes 3 samples, the other 2 (shares of unequal size), each in 2
    # runs of similar length (--length-split 2, the default), as does one process with all 5
    return ["--data", str(root / "cs.jsonl"), "--init", str(root / "init"), "--out", str(out), "--steps", "3",
            "--batch", "5", "--lr", "1e-3", "--save-every", "2", "--verdict-drills", "0", "--precision", "fp32"]


@pytest.fixture(scope="module")
def two_runs(run_dir):
    sft.main(sft_args(run_dir, run_dir / "one"))
    done = torchrun(run_dir, ["sft", *sft_args(run_dir, run_dir / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_two_ranks_take_the_same_steps_as_one_process(two_runs):
    one, two = losses(two_runs / "one"), losses(two_runs / "two")
    assert list(two) == [1, 2, 3]
    assert [two[s] for s in two] == pytest.approx([one[s] for s in one], rel=1e-5, abs=1e-6)
    # (the folder loads at world size 1; AdamW moves a weight by about the rate whatever its gradient's
    # size, so float rounding of near-zero gradients, summed in another order, shows at ~1e-5)
    assert max_weight_diff(two_runs / "one", two_runs / "two") < 5e-5
    assert (two_runs / "two" / "optimizer_shards").is_dir()
    assert max_weight_diff(two_runs / "init", two_runs / "two") > 1e-4      # (and it did train)


def test_a_killed_torchrun_resumes_on_the_same_curve(two_runs):
    killed = two_runs / "killed"
    crashed = torchrun(two_runs, ["sft", *sft_args(two_runs, killed)], KILL_AT="5")   # dies in step 3 (2 forwards a step)
    assert crashed.returncode != 0 and losses(killed).keys() == {1, 2}
    done = torchrun(two_runs, ["sft", *sft_args(two_runs, killed), "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(killed)[3] == pytest.approx(losses(two_runs / "two")[3], rel=1e-6)
    assert max_weight_diff(killed, two_runs / "two") < 1e-6


def test_one_process_resumes_a_torchrun_checkpoint(two_runs, tmp_path):
    import shutil
    shutil.copytree(two_runs / "killed", tmp_path / "k")
    (tmp_path / "k_log.jsonl").write_text((two_runs / "killed_log.jsonl").read_text())
    sft.main([*sft_args(two_runs, tmp_path / "k")[:-6], "--steps", "4", "--save-every", "2", "--verdict-drills", "0",
              "--precision", "fp32",
              "--resume"])
    assert list(losses(tmp_path / "k")) == [1, 2, 3, 4]


def test_rl_runs_two_steps_on_two_ranks(two_runs, probe_dir):
    out = two_runs / "rl"
    done = torchrun(two_runs, ["rl", "--model", str(two_runs / "one"), "--data", str(probe_dir / "train.jsonl"),
                               "--out", str(out), "--steps", "2", "--questions", "2", "--group", "4",
                               "--max-turns", "2", "--max-turn-tokens", "12", "--minibatch", "4"], REWARD="parity")
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_jsonl(out.parent / "rl_log.jsonl")
    assert [r["step"] for r in log] == [1, 2] and all(r["share_groups_dropped"] < 1 for r in log)
    assert all(r["logprob_gap"] < 1e-4 for r in log)       # engine (replica) and trainer agree in float32
    assert max_weight_diff(two_runs / "one", out) > 0
    state = torch.load(out / "trainer_state.pt", weights_only=False)
    assert len(state["cursor"]) == 2                       # each rank's place in its own questions


def test_engine_on_gathered_weights_equals_the_unsharded_engine(two_runs, probe_dir):
    from minio3.engine import Engine, Sample
    from PIL import Image
    image = probe_dir / read_jsonl(probe_dir / "train.jsonl")[0]["images"][0]
    res = two_runs / "engine.json"
    done = torchrun(two_runs, [str(two_runs / "one"), str(image)], ENGINE=str(res))
    assert done.returncode == 0, done.stderr[-3000:]
    model, proc = load(str(two_runs / "one"), dtype=torch.float32)
    t = Engine(model, proc, max_batch=1).run([Sample(Image.open(image).convert("RGB"), "<image>\nWhat is on the red circle?")],
                                             greedy=True, max_turns=2, max_turn_tokens=16, progress=False)[0]
    got = json.loads(res.read_text())
    assert got["ids"] == t.token_ids
    assert got["logprobs"] == pytest.approx(t.logprobs, abs=1e-5)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(run_dir):
    from minio3.model import collate
    model, proc = load(str(run_dir / "init"), dtype=torch.float32)
    rows = sft.read_trajectories([str(run_dir / "cs.jsonl")])
    batch = collate(sft.file_batch(rows, 0, 2, 0, proc), proc, "cpu")

    kept = []                       # the activations autograd keeps for the backward pass

    def grads(m):
        m.train()
        m.zero_grad()
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            loss = sft.sft_loss(m, batch, int(batch["loss_mask"].sum()), 1)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, sum(kept)
    plain = grads(model)
    parallel.prepare(model, True, "fp32", parallel.World())      # one process: checkpointing only
    again = grads(model)
    assert again[2] < plain[2] / 2                               # layers' insides are recomputed, not kept
    assert again[0] == pytest.approx(plain[0], rel=1e-6)
    assert max(float((again[1][n] - g).abs().max()) for n, g in plain[1].items()) < 1e-5
