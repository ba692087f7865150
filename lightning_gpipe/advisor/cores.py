"""A schedule's timeline on a CPU whose processes outnumber its cores: :func:`~lightning_gpipe.schedule.simulate`'s
ideal machine, except that the ranks computing at the same moment share the cores, and a rank woken by a message
first waits for one. Pure arithmetic, as the rest of the cost model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from lightning_gpipe.schedule import Phase, Schedule
from lightning_gpipe.schedule.actions import Action
from lightning_gpipe.schedule.simulate import Timing

__all__ = ["share_cores"]

_Key = tuple[Phase, int, int]  # (phase, stage, micro-batch)


def share_cores(
    schedule: Schedule, k: int, m: int, forward: Sequence[float], backward: Sequence[float],
    cpu_share: Sequence[float], send: Sequence[float], cores: float, wait: Sequence[float],
) -> Timing:  # fmt: skip
    """Run ``schedule`` for ``k`` ranks and ``m`` micro-batches, stage s's forward costing ``forward[s]`` and its
    backward ``backward[s]`` seconds alone on a core, ``cpu_share[s]`` of which is CPU work. The rest waits on a
    device or a clock and holds no core. An action runs its other time first, then its CPU work; the actions in
    their CPU work at a moment share ``cores`` cores evenly (at most one each).

    A message across boundary b takes ``send[b]``; an action that receives one from another rank first waits
    ``wait[s]`` more for a core, as a process woken on a busy CPU does. A re-materialized forward's backward runs
    its forward again first."""
    stages = k * schedule.stages_per_rank
    if not (len(forward) == len(backward) == len(cpu_share) == len(wait) == stages and len(send) == stages - 1):
        raise ValueError(f"costs for {stages} stages and {stages - 1} boundaries needed")
    orders = [schedule.actions(k, m, r) for r in range(k)]
    position, free = [0] * k, [0.0] * k
    done: dict[_Key, float] = {}
    recomputed: set[_Key] = set()
    spans: dict[tuple[int, Action], tuple[float, float]] = {}
    running: dict[int, list] = {}  # rank -> [other seconds left, CPU seconds left, start, key, action]
    now = 0.0
    while any(position[r] < len(orders[r]) for r in range(k)):
        starts = []
        for r in range(k):
            if r in running or position[r] >= len(orders[r]):
                continue
            ready = _ready(orders[r][position[r]], r, k, done, recomputed, forward, backward, cpu_share, send, wait)
            if ready is None:
                continue
            at, other, cpu, key = ready
            at = max(at, free[r])
            if at <= now:
                running[r] = [other, cpu, now, key, orders[r][position[r]]]
            else:
                starts.append(at)
        computing = sum(1 for run in running.values() if run[0] <= 0.0)
        rate = min(1.0, cores / computing) if computing else 1.0
        events = [now + (run[0] if run[0] > 0.0 else run[1] / rate) for run in running.values()] + starts
        if not events:
            stuck = {r: orders[r][position[r]] for r in range(k) if position[r] < len(orders[r])}
            raise ValueError(f"{schedule.name} cannot finish for k={k}, m={m}: each rank's next action waits: {stuck}")
        step = min(events) - now
        now += step
        for r in list(running):
            run = running[r]
            if run[0] > 0.0:
                run[0] = _left(run[0] - step, now)
            else:
                run[1] = _left(run[1] - step * rate, now)
            if run[0] == run[1] == 0.0:
                _, _, start, key, action = running.pop(r)
                done[key] = free[r] = now
                if action.recompute:
                    recomputed.add((Phase.FORWARD, key[1], key[2]))
                spans[(r, Action(action.phase, action.i, chunk=action.chunk))] = (start, now)
                position[r] += 1
    return Timing(k, m, spans)


def _left(seconds: float, now: float) -> float:
    """Seconds left, rounding what floating point leaves of a finished segment to 0."""
    return seconds if seconds > 1e-12 * (1.0 + now) else 0.0


def _ready(
    action: Action, r: int, k: int, done: dict[_Key, float], recomputed: set[_Key], forward: Sequence[float],
    backward: Sequence[float], cpu_share: Sequence[float], send: Sequence[float], wait: Sequence[float],
) -> Optional[tuple[float, float, float, _Key]]:  # fmt: skip
    """When ``action`` of rank ``r`` may start (its inputs only), its seconds holding no core (the wait for one
    included) and its CPU seconds; None while an input is missing."""
    stage = action.chunk * k + r
    if action.phase is Phase.FORWARD:
        needs = [(Phase.FORWARD, stage - 1, action.i)] if stage > 0 else []
        seconds = forward[stage]
    else:
        needs = [(Phase.FORWARD, stage, action.i)]
        needs += [(Phase.BACKWARD, stage + 1, action.i)] if stage < len(forward) - 1 else []
        again = forward[stage] if (Phase.FORWARD, stage, action.i) in recomputed else 0.0
        seconds = backward[stage] + again
    if any(need not in done for need in needs):
        return None
    remote = [need for need in needs if need[1] % k != r]
    at = max([0.0] + [done[need] + (send[min(need[1], stage)] if need in remote else 0.0) for need in needs])
    cpu = cpu_share[stage] * seconds
    return at, seconds - cpu + (wait[stage] if remote else 0.0), cpu, (action.phase, stage, action.i)
