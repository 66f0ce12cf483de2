"""The KV cache on its own (no model): write, read, move a row, in both layouts."""
import pytest
import torch

from minio3.engine.decoder import KVCache


@pytest.mark.parametrize("layout", ["sdpa", "flash"])
def test_write_read_and_move_rows(layout):
    torch.manual_seed(0)
    layers, rows, length, heads, dim = 2, 4, 10, 2, 3
    cache = KVCache(layers, rows, length, heads, dim, torch.float32, "cpu", layout)
    shape = (rows, length, heads, dim) if layout == "flash" else (rows, heads, length, dim)
    assert cache.k[0].shape == shape and len(cache.v) == layers
    # rows 2 and 0 get 3 and 2 new positions at their own offsets (ragged: padding goes past the end)
    k, v = torch.randn(2, 3, heads, dim), torch.randn(2, 3, heads, dim)
    slots, where = torch.tensor([2, 0]), torch.tensor([[4, 5, 6], [0, 1, 2]])
    cache.write(1, slots, where, k, v)
    K, V = cache.read(1, torch.tensor([2, 0]), 7)
    assert K.shape == (2, heads, 7, dim)                                      # always [n, kv_heads, L, dim]
    assert torch.equal(K[0, :, 4:7], k[0].transpose(0, 1)) and torch.equal(V[1, :, 0:3], v[1].transpose(0, 1))
    assert K[0, :, :4].abs().sum() == 0 and cache.k[0].abs().sum() == 0      # nothing else, no other layer
    # contiguous slots 0..n-1 read the same values as a gather
    Kc, _ = cache.read(1, torch.tensor([0, 1, 2]), 7, contiguous=True)
    Kg, _ = cache.read(1, torch.tensor([0, 1, 2]), 7)
    assert torch.equal(Kc, Kg)
    # moving row 2 into row 1 copies its first 7 positions in every layer and leaves row 2 alone
    cache.move(2, 1, 7)
    K1, V1 = cache.read(1, torch.tensor([1]), 7)
    assert torch.equal(K1[0], K[0]) and torch.equal(V1[0], V[0])
    assert torch.equal(cache.read(1, torch.tensor([2]), 7)[0][0], K[0])
