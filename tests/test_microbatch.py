import pytest
import torch

from lightning_gpipe.engine.microbatch import as_tuple, merge, split, split_sizes


def test_uneven_split_and_small_batch():
    assert split_sizes(10, 3) == [4, 3, 3]
    assert split_sizes(2, 4) == [1, 1]
    assert split_sizes(8, 1) == [8]
    x = torch.arange(10.0)
    assert [t.tolist() for t in split(x, 3)] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_split_structures():
    batch = {"x": torch.zeros(5, 2), "y": (torch.ones(5), [torch.arange(5)])}
    parts = split(batch, 2)
    assert [p["x"].shape[0] for p in parts] == [3, 2]
    assert isinstance(parts[1]["y"], tuple) and isinstance(parts[1]["y"][1], list)
    assert parts[1]["y"][1][0].tolist() == [3, 4]


def test_merge_inverts_split():
    x = torch.randn(7, 3)
    assert torch.equal(merge(split(x, 3)), x)
    pairs = [(a, a.sum(1)) for a in split(x, 2)]
    merged = merge(pairs)
    assert torch.equal(merged[0], x) and torch.equal(merged[1], x.sum(1))


def test_bad_batches():
    with pytest.raises(ValueError, match=r"cannot split a batch whose tensors disagree on dim 0: sizes \[3, 4\]"):
        split((torch.zeros(3), torch.zeros(4)), 2)
    with pytest.raises(ValueError, match=r"cannot split an empty batch \(dim 0 has size 0\)"):
        split(torch.zeros(0, 2), 2)
    with pytest.raises(ValueError, match="microbatches must be at least 1, got 0"):
        split(torch.zeros(4), 0)
    with pytest.raises(TypeError, match="a batch to split must be a tensor or a tuple, list or dict of tensors, got str"):
        split("text", 2)
    with pytest.raises(TypeError, match=r"must be a tensor or a tuple of tensors, got tuple of \(Tensor, int\)"):
        as_tuple((torch.zeros(1), 3))
