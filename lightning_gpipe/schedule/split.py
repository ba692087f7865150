"""Balancing stages: splitting per-layer costs into K contiguous stages."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["optimal_split", "uniform_split", "stage_owners"]


def uniform_split(n: int, k: int) -> list[int]:
    """``n`` items in ``k`` parts by count alone, the earlier parts taking the remainder (layers per stage,
    samples per micro-batch)."""
    return [n // k + (1 if j < n % k else 0) for j in range(k)]


def stage_owners(balance: Sequence[int]) -> list[int]:
    """The stage that holds each layer, for layer counts per stage ``balance``."""
    return [stage for stage, count in enumerate(balance) for _ in range(count)]


def optimal_split(costs: Sequence[float], k: int) -> list[int]:
    """Layer counts per stage: the contiguous split of ``costs`` into ``k`` non-empty parts whose largest
    part's sum is the smallest possible.

    Exact: the smallest feasible largest sum is found by binary search over the sums of contiguous runs
    (a greedy fill decides feasibility), then the layers are cut at it. Tie rule: among optimal splits,
    each stage in turn takes as many layers as the optimum allows, leaving at least one per later stage.

    Examples:
        >>> optimal_split([1, 1, 100, 1, 1], 3)
        [2, 1, 2]
    """
    if not 1 <= k <= len(costs):
        raise ValueError(f"cannot split {len(costs)} layers into {k} non-empty stages")
    if any(c < 0 for c in costs):
        raise ValueError(f"layer costs must not be negative, got {list(costs)}")

    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def run(a: int, b: int) -> float:  # the cost of layers a..b-1, always computed the same way
        return prefix[b] - prefix[a]

    def parts_needed(limit: float) -> int:
        parts, start = 1, 0
        for end in range(1, n + 1):
            if run(start, end) > limit:
                parts, start = parts + 1, end - 1
        return parts

    # The optimum is the cost of some contiguous run: search those, so float costs are exact too.
    candidates = sorted({run(a, b) for a in range(n) for b in range(a + 1, n + 1)})
    candidates = [c for c in candidates if c >= max(run(i, i + 1) for i in range(n))]
    left, right = 0, len(candidates) - 1
    while left < right:
        mid = (left + right) // 2
        if parts_needed(candidates[mid]) <= k:
            right = mid
        else:
            left = mid + 1
    limit = candidates[left]
    # Fill greedily up to that limit, cutting early only to leave one layer for each stage still to come.
    counts: list[int] = []
    start = 0
    for end in range(1, n + 1):
        stages_after = k - len(counts) - 1
        if end - 1 > start and (run(start, end) > limit or n - (end - 1) == stages_after):
            counts.append(end - 1 - start)
            start = end - 1
    counts.append(n - start)
    return counts
