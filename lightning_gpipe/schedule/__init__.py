"""The schedule layer, pure Python (no ``torch.distributed``): which stage does what, in which order, and how work
is divided into stages and micro-batches."""

from lightning_gpipe.schedule.actions import CHECKPOINT_MODES, Action, Phase, Schedule, checkpoint_stop
from lightning_gpipe.schedule.gpipe import GPipe, clock_cycles, fthenb
from lightning_gpipe.schedule.interleaved import Interleaved1F1B, interleaved_one_f_one_b
from lightning_gpipe.schedule.one_f_one_b import OneFOneB, one_f_one_b
from lightning_gpipe.schedule.simulate import Timing, simulate
from lightning_gpipe.schedule.split import optimal_split, stage_owners, uniform_split

#: The schedules ``GPipeStrategy(schedule=...)`` takes, by name.
SCHEDULES = {"gpipe": GPipe, "1f1b": OneFOneB, "interleaved": Interleaved1F1B}

__all__ = [
    "Action", "Phase", "Schedule", "SCHEDULES", "GPipe", "OneFOneB", "Interleaved1F1B", "fthenb", "one_f_one_b",
    "interleaved_one_f_one_b", "clock_cycles", "simulate", "Timing",
    "checkpoint_stop", "CHECKPOINT_MODES", "optimal_split", "stage_owners", "uniform_split",
]  # fmt: skip
