"""The configuration advisor's arithmetic, on hand-made profiles with exact expected numbers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from _model import SlowAtFirst
from torch import nn

from lightning_gpipe.advisor import (
    Advice,
    AdvisorError,
    Candidate,
    Link,
    ModelProfile,
    Prediction,
    advise,
    candidate_balance,
    microbatch_choices,
    predict,
)
from lightning_gpipe.advisor.choose import TIE, parse_budget
from lightning_gpipe.advisor.measure import measure_floor, profile_model
from lightning_gpipe.model.profile import LayerCosts


def hand_profile(slots: float = 2.0) -> ModelProfile:
    """Four equal layers, batch 4, measured at 2 and 4 rows. Per layer: at 2 rows forward 0.1 s and backward 0.2 s,
    at 4 rows 0.2 s and 0.3 s; 10 parameter bytes; 2 saved-activation bytes and 1 output byte per row; the model's
    input 1 byte per row; 1 ms of optimizer step per byte of parameters."""
    small = LayerCosts([0.3] * 4, [10] * 4, [4] * 4, [0.1] * 4, [2] * 4, 2)
    large = LayerCosts([0.5] * 4, [10] * 4, [8] * 4, [0.2] * 4, [4] * 4, 4)
    return ModelProfile(4, (small, large), 1.0, slots, 0.001)


def test_times_are_measured_interpolated_or_scaled_from_the_nearest_size():
    profile = hand_profile()
    assert profile.times(2) == ([0.1] * 4, pytest.approx([0.2] * 4))
    forward, backward = profile.times(3)  # halfway between 2 and 4 rows
    assert forward == pytest.approx([0.15] * 4) and backward == pytest.approx([0.25] * 4)
    forward, backward = profile.times(8)  # twice the largest
    assert forward == pytest.approx([0.4] * 4) and backward == pytest.approx([0.6] * 4)
    forward, backward = profile.times(1)  # half the smallest
    assert forward == pytest.approx([0.05] * 4) and backward == pytest.approx([0.1] * 4)


def test_fthenb_without_rematerialization_step_bubble_and_memory():
    # Stage 0: F0 0-0.2, F1 0.2-0.4. Stage 1 (each message 10 ms later): F0 0.21-0.41, F1 0.41-0.61, B1 0.61-1.01,
    # B0 1.01-1.41. Stage 0: B1 1.02-1.42, B0 1.42-1.82. Then the optimizer: 20 parameter bytes x 1 ms.
    prediction = predict(hand_profile(), Candidate(2, "never", "gpipe", (2, 2)), 2, Link(0.01, 0.0))
    assert prediction.step_s == pytest.approx(1.84)
    assert prediction.samples_per_s == pytest.approx(4 / 1.84)
    assert prediction.bubble == pytest.approx(1 - 2.4 / (2 * 1.82))
    # 20 parameter bytes x (weights, gradients, 2 Adam slots) + 2 micro-batches x 2 layers x 2 bytes x 2 rows.
    assert prediction.state_bytes == (80.0, 80.0)
    assert prediction.peak_bytes == (96.0, 96.0)


def test_fthenb_rematerialized_recomputes_forwards_and_keeps_inputs():
    # Every backward runs its forward again first (0.2 + 0.4): stage 1 B1 0.61-1.21, B0 1.21-1.81; stage 0 B1
    # 1.22-1.82, B0 1.82-2.42. Memory: 2 inputs of 2 rows x 1 byte held, plus one micro-batch's 8 bytes recomputed.
    prediction = predict(hand_profile(), Candidate(2, "always", "gpipe", (2, 2)), 2, Link(0.01, 0.0))
    assert prediction.step_s == pytest.approx(2.44)
    assert prediction.peak_bytes == (92.0, 92.0)


def test_one_f_one_b_holds_fewer_microbatches_on_later_stages():
    # M=4 (1 row each): stage 0 has 2 forwards in flight, stage 1 one; a micro-batch's stage holds 2 x 2 x 1 bytes.
    prediction = predict(hand_profile(slots=0.0), Candidate(4, "never", "1f1b", (2, 2)), 2)
    assert prediction.peak_bytes == (40.0 + 8.0, 40.0 + 4.0)


def test_messages_cost_by_their_bytes_on_each_boundary():
    # Per micro-batch of 4 rows the boundary after layer 1 carries 4 bytes: 1 + 4 x 0.5 = 3 s each way.
    free = predict(hand_profile(), Candidate(1, "never", "gpipe", (2, 2)), 2)
    costly = predict(hand_profile(), Candidate(1, "never", "gpipe", (2, 2)), 2, Link(1.0, 0.5))
    assert costly.step_s - free.step_s == pytest.approx(2 * 3.0)


def test_no_action_takes_less_than_the_pipelines_floor():
    # Stages of 2 layers at 2 rows: forward 0.2 s, backward 0.4 s. A floor of 0.3 s lifts the forwards only.
    # Stage 0: F0 0-0.3, F1 0.3-0.6. Stage 1: F0 0.31-0.61, F1 0.61-0.91, B1 0.91-1.31, B0 1.31-1.71. Stage 0:
    # B1 1.32-1.72, B0 1.72-2.12; then the optimizer's 0.02 s. With a floor of 0.5 s every action takes 0.5 s.
    candidate, link = Candidate(2, "never", "gpipe", (2, 2)), Link(0.01, 0.0)

    def floored(floor: float) -> Prediction:
        return predict(dataclasses.replace(hand_profile(), floor_s=floor), candidate, 2, link)

    assert floored(0.3).step_s == pytest.approx(2.14)
    assert floored(0.5).step_s == pytest.approx(0.5 * 6 + 0.01 * 2 + 0.02)  # 6 slots, 2 messages
    assert floored(0.1).step_s == pytest.approx(predict(hand_profile(), candidate, 2, link).step_s)  # below all


def test_the_floor_is_the_executors_time_per_action_on_layers_that_cost_nothing():
    """One stage alone: no messages, the executor's own time per action (tens of microseconds here)."""
    floor = measure_floor(0, 1, torch.device("cpu"))
    assert floor is not None and 0.0 < floor < 0.05, floor


def test_a_balance_that_does_not_cover_the_model_is_refused():
    with pytest.raises(ValueError, match=r"balance \[3, 2\] for 2 stages of a 4-layer model: need 2 counts summing"):
        predict(hand_profile(), Candidate(2, "never", "gpipe", (3, 2)), 2)


def test_link_fit_is_the_least_squares_line_kept_non_negative():
    assert Link.fit([0, 100], [1.0, 2.0]) == Link(1.0, 0.01)
    assert Link.fit([0, 100, 200], [1.0, 1.0, 1.0]) == Link(1.0, 0.0)
    assert Link.fit([0, 100], [2.0, 1.0]) == Link(1.5, 0.0)  # noise that would make bytes free is no slope
    with pytest.raises(ValueError, match=r"at least two message sizes, got sizes \[64, 64\]"):
        Link.fit([64, 64], [1.0, 1.0])


def test_microbatch_choices():
    assert microbatch_choices(128, 4) == [1, 2, 4, 8, 16, 32]
    assert microbatch_choices(128, 4, chunks=2) == [4, 8, 16, 32]  # interleaved: multiples of K
    assert microbatch_choices(12, 2) == [1, 2, 4, 8]
    assert microbatch_choices(128, 16) == [1, 2, 4, 8, 16, 32, 64]  # up to 4K
    assert microbatch_choices(3, 4, chunks=2) == []


def test_candidate_balance_splits_the_profile_at_the_candidates_size():
    small = LayerCosts([0.1, 0.1, 0.1, 0.7], [0] * 4, [0] * 4, [0.05, 0.05, 0.05, 0.2], [1] * 4, 1)
    large = LayerCosts([0.4, 0.4, 0.4, 0.4], [0, 0, 0, 400], [0, 0, 0, 8], [0.2] * 4, [2] * 4, 2)
    profile = ModelProfile(2, (small, large), 1.0, 2.0)
    assert candidate_balance("time", profile, 2, "never", 2) == (3, 1)  # 1 row: the last layer is slow
    assert candidate_balance("time", profile, 1, "never", 2) == (2, 2)  # 2 rows: all equal
    assert candidate_balance("memory", profile, 1, "never", 2) == (3, 1)
    assert candidate_balance([1, 3], profile, 1, "never", 2) == (1, 3)


def test_advice_chooses_the_fastest_that_fits_and_says_why():
    candidates = [Candidate(m, c, "gpipe", (2, 2)) for m in (1, 2, 4) for c in ("never", "always")]
    advice = advise(hand_profile(), 2, candidates, budget=95, link=Link(0.01, 0.0))
    assert [p.candidate.label for p in advice.predictions[:2]] == ["M=4 never gpipe", "M=2 never gpipe"]
    assert advice.chosen.candidate == Candidate(4, "always", "gpipe", (2, 2))  # "never" holds 96 bytes
    table = advice.table().splitlines()
    assert table[2] == "| 2 | 4 | never | gpipe | [2, 2] | 2.6 | 1540.0 | 0.21 | 96 B, 96 B | over budget (96 B > 95 B) |"
    assert table[5] == "| 2 | 4 | always | gpipe | [2, 2] | 2.0 | 2040.0 | 0.21 | 88 B, 88 B | chosen: the fastest that fits |"
    assert table[6].endswith("| 1.20x slower than the choice |")


def test_a_tie_within_five_percent_goes_to_the_fewest_microbatches():
    """Predictions within TIE (5%) of the fastest that fits cannot be told apart by the model, whose left-out costs
    grow with M: the fewest micro-batches win, the fastest of them; beyond 5% the fastest wins."""
    assert TIE == 0.05

    def prediction(m: int, checkpoint: str, samples_per_s: float, peak: float = 10.0) -> Prediction:
        candidate = Candidate(m, checkpoint, "gpipe", (1, 1))
        return Prediction(candidate, 1 / samples_per_s, samples_per_s, 0.0, (peak,), (peak,))

    ranked = (prediction(16, "never", 110.0, peak=99.0), prediction(8, "never", 100.0), prediction(4, "always", 95.5),
              prediction(4, "never", 95.2), prediction(2, "never", 94.9), prediction(1, "never", 50.0))  # fmt: skip
    advice = Advice(ranked, budget=20.0, k=2)
    assert advice.chosen is ranked[2]  # M=16 is over budget; M=2 is beyond 5% of M=8
    assert [advice.reason(p) for p in ranked] == [
        "over budget (99 B > 20 B)",
        "1.05x faster than the choice: a tie, with more micro-batches",
        "chosen: the fewest micro-batches within 5% of the fastest that fits",
        "1.00x slower than the choice",
        "1.01x slower than the choice",
        "1.91x slower than the choice",
    ]
    alone = Advice(ranked[1:2] + ranked[5:], budget=20.0, k=2)
    assert alone.chosen is ranked[1] and alone.reason(ranked[1]) == "chosen: the fastest that fits"


def test_advice_refuses_when_nothing_fits_naming_the_smallest_peak_and_the_budget():
    advice = advise(hand_profile(), 2, [Candidate(2, "never", "gpipe", (2, 2))], budget=50)
    with pytest.raises(AdvisorError) as raised:
        advice.chosen
    assert str(raised.value) == (
        "no candidate fits the memory budget of 50 B per rank: the smallest predicted peak is 96 B (M=2 never gpipe)."
        " Raise memory_budget, use more stages, or re-materialize (checkpoint='always')"
    )


def test_parse_budget():
    assert parse_budget("2GiB") == 2 * 2**30
    assert parse_budget("512 MiB") == 512 * 2**20
    assert parse_budget(1000) == 1000
    assert parse_budget("1.5KiB") == 1536
    for bad in ("lots", "-1GiB", 0, True):
        with pytest.raises(ValueError, match="memory_budget="):
            parse_budget(bad)


def test_profile_model_measures_each_size_and_the_bytes_per_row():
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)]
    optimizer = torch.optim.Adam([p for layer in layers for p in layer.parameters()])
    profile = profile_model(layers, torch.randn(8, 8), [2, 8, 4], torch.device("cpu"), [optimizer], repeats=1, passes=1)
    assert [m.rows for m in profile.measured] == [2, 4, 8]
    assert profile.batch == 8 and profile.input_bytes_per_row == 8 * 4
    assert profile.per_row("output_bytes") == [16 * 4, 16 * 4, 4 * 4]
    assert profile.param_bytes == [(8 * 16 + 16) * 4, 0, (16 * 4 + 4) * 4]
    assert profile.optimizer_slots == 2.0 and profile.optimizer_s_per_byte > 0
    assert all(f > 0 for m in profile.measured for f in m.forward)
    with pytest.raises(ValueError, match=r"sizes from 1 to the batch's 8 samples"):
        profile_model(layers, torch.randn(8, 8), [16], torch.device("cpu"), [optimizer])


def test_a_slow_spell_over_the_first_pass_slows_no_size():
    """Each pass measures every micro-batch size, and each layer and size keeps its fastest pass: a spell over the
    whole first pass (both sizes) biases neither. Measured size after size, the spell would have covered both passes
    of the first size and made its micro-batches look slower than the second's."""
    layer = SlowAtFirst(slow=10)  # per size and pass: a warm-up, 2 timed runs, the metering, the next input
    profile = profile_model([layer], torch.randn(4, 4), [2, 4], torch.device("cpu"), [], repeats=2, passes=2)
    assert layer.calls == 20
    assert [costs.seconds[0] < 0.03 for costs in profile.measured] == [True, True], profile.measured


def test_contention_slows_the_cpu_bound_share_of_every_cost():
    """Two processes per core: a layer that kept the CPU busy half the time it was profiled takes 1.5 times as long;
    the executor's per-action time, the optimizer step and the fixed step cost (all CPU work) twice as long."""
    half = LayerCosts([0.3] * 4, [10] * 4, [4] * 4, [0.1] * 4, [2] * 4, 2, cpu_share=[0.5] * 4)
    profile = ModelProfile(2, (half,), 1.0, 0.0, 0.001, step_s=0.5, action_s={"never": 0.01}, contention=2.0)
    forward, backward = profile.times(2)
    assert forward == pytest.approx([0.15] * 4) and backward == pytest.approx([0.3] * 4)
    alone = dataclasses.replace(profile, contention=1.0)
    candidate = Candidate(1, "never", "gpipe", (4,))
    # One stage, one micro-batch: forward + backward + 2 actions, then the optimizer (40 bytes) and the step cost.
    assert predict(alone, candidate, 1).step_s == pytest.approx(0.4 + 0.8 + 0.02 + 0.04 + 0.5)
    assert predict(profile, candidate, 1).step_s == pytest.approx(0.6 + 1.2 + 0.04 + 0.08 + 1.0)
    idle = dataclasses.replace(profile, measured=(dataclasses.replace(half, cpu_share=[0.0] * 4),))
    assert idle.times(2) == alone.times(2)  # timed waits that hold no CPU do not slow down
