import itertools
import random

import pytest

from lightning_gpipe.balance import optimal_split


def _largest_stage(costs, counts):
    ends = list(itertools.accumulate(counts))
    return max(sum(costs[end - c : end]) for c, end in zip(counts, ends))


def _brute_force(costs, k):
    n = len(costs)
    return min(
        max(sum(costs[a:b]) for a, b in zip((0, *cuts), (*cuts, n)))
        for cuts in itertools.combinations(range(1, n), k - 1)
    )


@pytest.mark.parametrize("kind", ["int", "float"])
def test_optimal_split_matches_brute_force(kind):
    rng = random.Random(0)
    for _ in range(500):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = [rng.randint(0, 9) if kind == "int" else rng.random() * 3 for _ in range(n)]
        counts = optimal_split(costs, k)
        assert len(counts) == k and min(counts) >= 1 and sum(counts) == n
        assert _largest_stage(costs, counts) == pytest.approx(_brute_force(costs, k), abs=1e-12), (costs, k, counts)


def test_one_expensive_layer_gets_a_stage_of_its_own():
    assert optimal_split([1, 1, 100, 1, 1], 3) == [2, 1, 2]
    assert optimal_split([0.1, 0.2, 0.3], 2) == [2, 1]  # float sums are compared consistently: 0.1 + 0.2 ties 0.3


def test_tie_rule_fills_earlier_stages_first():
    assert optimal_split([1, 1, 1, 1], 2) == [2, 2]
    assert optimal_split([2, 0, 0, 2], 2) == [3, 1]
    assert optimal_split([0, 0, 0], 3) == [1, 1, 1]


def test_bad_arguments():
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 non-empty stages"):
        optimal_split([1, 2], 3)
    with pytest.raises(ValueError, match=r"layer costs must not be negative, got \[1, -2\]"):
        optimal_split([1, -2], 1)
