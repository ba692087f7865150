"""Interleaved 1F1B (Megatron-LM): each rank holds v model chunks that are not neighbours in the model (rank r
holds chunks r, r + K, ..., r + (v-1)K of the K*v), so a micro-batch crosses the ranks v times and the pipeline
fills and drains in chunk-sized steps: the bubble shrinks by about v, at v times the messages."""

from __future__ import annotations

from dataclasses import dataclass

from lightning_gpipe.schedule.actions import Action, Phase, Rematerialized, check_km

__all__ = ["Interleaved1F1B", "interleaved_one_f_one_b", "check_interleaved"]


@dataclass(frozen=True)
class Interleaved1F1B(Rematerialized):
    """Interleaved 1F1B (`interleaved_one_f_one_b`) over ``virtual_stages`` chunks per rank, with re-materialization
    by ``checkpoint`` as `GPipe`. The user's loss runs once per micro-batch, on the last rank's last chunk."""

    virtual_stages: int = 2
    name = "interleaved"
    loss_per_microbatch = True

    @property
    def stages_per_rank(self) -> int:  # type: ignore[override]
        return self.virtual_stages

    def order(self, k: int, m: int, stage: int) -> list[Action]:
        return interleaved_one_f_one_b(k, m, stage, self.virtual_stages)

    def forwards(self, k: int, m: int, stage: int) -> list[Action]:
        """The forwards alone, as evaluation runs them, for any ``m``: in groups of K micro-batches (the last may
        hold fewer), each group through chunk 0, then chunk 1, ..., as in training."""
        check_km(k, m, stage)
        groups = [range(start, min(start + k, m)) for start in range(0, m, k)]
        return [Action(Phase.FORWARD, i, chunk=c) for group in groups for c in range(self.virtual_stages) for i in group]


def check_interleaved(k: int, m: int, v: int) -> None:
    """Raise unless ``v`` chunks per rank and ``m`` micro-batches suit the interleaved order over ``k`` ranks."""
    if not isinstance(v, int) or v < 1:
        raise ValueError(f"virtual_stages={v!r}: need an integer of at least 1")
    if m % k:
        raise ValueError(
            f"interleaved 1F1B takes micro-batches in groups of K: microbatches={m} is not a multiple of K={k}"
        )


def interleaved_one_f_one_b(k: int, m: int, rank: int, v: int) -> list[Action]:
    """Interleaved 1F1B's order for ``rank`` of ``k`` with ``m`` micro-batches (a multiple of ``k``) and ``v`` chunks
    per rank, as Megatron-LM orders it.

    The rank's forwards run in groups of K micro-batches: group g runs chunk 0 on micro-batches gK .. gK+K-1, then
    chunk 1 on the same ones, up to chunk v-1; its backwards take the same groups with the chunks in reverse.
    Warm-up: ``2(K-1-rank) + (v-1)K`` forwards (all of them when M = K), then one forward and one backward
    alternately, then the remaining backwards:

    ```
    k=2, m=2, v=2 (M = K: every forward first)
    rank 0   F0 F1 F0c1 F1c1 B0c1 B1c1 B0 B1
    rank 1   F0 F1 F0c1 F1c1 B0c1 B1c1 B0 B1
    k=2, m=4, v=2
    rank 0   F0 F1 F0c1 F1c1 F2 B0c1 F3 B1c1 F2c1 B0 F3c1 B1 B2c1 B3c1 B2 B3
    rank 1   F0 F1 F0c1 B0c1 F1c1 B1c1 F2 B0 F3 B1 F2c1 B2c1 F3c1 B3c1 B2 B3
    ```
    """
    check_km(k, m, rank)
    check_interleaved(k, m, v)
    total = m * v

    def step(n: int, phase: Phase) -> Action:
        group, within = divmod(n, k * v)
        chunk = within // k
        if phase is Phase.BACKWARD:
            chunk = v - 1 - chunk
        return Action(phase, group * k + within % k, chunk=chunk)

    warmup = total if m == k else min(2 * (k - 1 - rank) + (v - 1) * k, total)
    order = [step(n, Phase.FORWARD) for n in range(warmup)]
    for n in range(total - warmup):  # steady state: the next forward, then the oldest backward
        order += [step(warmup + n, Phase.FORWARD), step(n, Phase.BACKWARD)]
    order += [step(n, Phase.BACKWARD) for n in range(total - warmup, total)]
    return order
