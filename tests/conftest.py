import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """A randomly initialised tiny model and its processor (built once per test session)."""
    from minio3 import model as lib
    model, processor = lib.build_tiny(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory):
    import make_probe
    out = tmp_path_factory.mktemp("probe")
    make_probe.write_probe(out, n_train=6, n_test=6, seed=3)
    return out


def write_explorer_run(root: Path, tiny, probe_dir: Path) -> Path:
    """A training run's inputs in `root`: the tiny model saved as init/, and cs.jsonl, the explorer's
    trajectories over the probe's training questions (images as absolute paths)."""
    import random

    from minio3 import explorer
    from minio3.data import load_image, read_jsonl, write_jsonl
    from minio3.model import save_checkpoint
    model, proc = tiny
    save_checkpoint(model, proc, root / "init")
    trajs = []
    for r in read_jsonl(probe_dir / "train.jsonl"):
        res = explorer.explore(load_image(r, probe_dir), r["problem"], proc.budget, random.Random(0))
        trajs.append({**r, "images": [str(probe_dir / r["images"][0])], "turns": res["turns"]})
    write_jsonl(root / "cs.jsonl", trajs)
    return root
