import pytest

from lightning_gpipe.schedule import Action, Phase, checkpoint_stop, clock_cycles, fthenb


def test_fthenb_literal_order():
    assert [repr(a) for a in fthenb(2, 3, 0)] == ["F0", "F1", "F2", "B2", "B1", "B0"]
    assert fthenb(2, 3, 1) == fthenb(2, 3, 0)
    assert fthenb(1, 1, 0) == [Action(Phase.FORWARD, 0), Action(Phase.BACKWARD, 0)]


def test_clock_cycles_literal_timeline():
    ticks = [" ".join(f"{j}:{a!r}" for j, a in sorted(tick)) for tick in clock_cycles(3, 2)]
    assert ticks == [
        "0:F0", "0:F1 1:F0", "1:F1 2:F0", "2:F1", "2:B1", "1:B1 2:B0", "0:B1 1:B0", "0:B0",
    ]  # fmt: skip


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 4), (4, 8), (3, 5)])
def test_clock_cycles_follow_fthenb_and_give_gpipe_bubble(k, m):
    ticks = clock_cycles(k, m)
    for j in range(k):
        assert [a for tick in ticks for stage, a in tick if stage == j] == fthenb(k, m, j)
        busy = sum(1 for tick in ticks for stage, _ in tick if stage == j)
        assert 1 - busy / len(ticks) == pytest.approx((k - 1) / (m + k - 1))


def test_checkpoint_stop():
    assert [checkpoint_stop(mode, 4) for mode in ("always", "except_last", "never")] == [4, 3, 0]
    assert checkpoint_stop("except_last", 1) == 0
    with pytest.raises(ValueError, match=r"checkpoint must be one of \('always', 'except_last', 'never'\), got 'sometimes'"):
        checkpoint_stop("sometimes", 4)


def test_bad_sizes():
    with pytest.raises(ValueError, match="need at least one stage and one micro-batch, got k=2, m=0"):
        fthenb(2, 0, 0)
    with pytest.raises(ValueError, match=r"stage must be in \[0, 2\), got 2"):
        fthenb(2, 1, 2)
