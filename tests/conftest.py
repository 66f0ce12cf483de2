import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny():
    """A randomly initialised tiny model and its processor (built once per test session)."""
    import model as lib
    model, processor = lib.build_tiny(seed=0)
    return model.eval(), processor


@pytest.fixture(scope="session")
def probe_dir(tmp_path_factory):
    import make_probe
    out = tmp_path_factory.mktemp("probe")
    make_probe.write_probe(out, n_train=6, n_test=6, seed=3)
    return out
