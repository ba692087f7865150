"""Weights tied across stages: a parameter used by layers on several stages lives on each of them.

GPT-2 ties its input embedding to its output head, which sit on the first and the last stage. Each of those
stages keeps the parameter; the copies start equal (the first stage's value, broadcast), and after every
backward that ends an accumulation window their gradients are summed over a process group of just those
stages' ranks, so each copy takes the same optimizer step as the one parameter of single-device training.
Global-norm clipping counts the sum once (on the first of its stages), and checkpoints name it once, by the
name single-device training gives it: its first name in ``named_parameters()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gpipe.model.partition import stage_layers
from lightning_gpipe.parallel.topology import Topology

__all__ = ["Tie", "TiedGradients", "find_ties", "names_by_parameter", "tied_names"]


@dataclass(frozen=True)
class Tie:
    """One parameter used by layers on more than one stage."""

    name: str  # its name on the whole module: the first that ``named_parameters()`` gives
    names: tuple[str, ...]  # every name it has on the whole module, ``name`` first
    stages: tuple[int, ...]  # the stages whose layers use it, in order


def find_ties(module: nn.Module, seq: nn.Sequential, balance: Sequence[int], k: Optional[int] = None) -> list[Tie]:
    """The parameters of ``seq`` that layers on different ranks share, in ``named_parameters()`` order; a tie's
    ``stages`` are those ranks (stage s of ``balance`` runs on rank s % ``k``, by default one stage per rank).

    ``module`` is whole (every layer present), as before the pipeline cuts it.
    """
    k = len(balance) if k is None else k
    names = names_by_parameter(module)
    stages: dict[int, set[int]] = {}
    layers = list(seq._modules.values())
    for stage in range(len(balance)):
        for index in stage_layers(balance, stage):
            for p in layers[index].parameters():
                stages.setdefault(id(p), set()).add(stage % k)
    ties, seen = [], set()
    for name, p in module.named_parameters():
        if len(stages.get(id(p), ())) > 1 and id(p) not in seen:
            seen.add(id(p))
            ties.append(Tie(name, tuple(names[id(p)]), tuple(sorted(stages[id(p)]))))
    return ties


def names_by_parameter(module: nn.Module) -> dict[int, list[str]]:
    """Every name of each parameter of ``module``, by the parameter's identity, in ``named_parameters()`` order."""
    names: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return names


def tied_names(ties: Sequence[Tie]) -> dict[str, str]:
    """Every other name of a tied parameter, mapped to the name single-device training gives it."""
    return {alias: tie.name for tie in ties for alias in tie.names[1:]}


class TiedGradients:
    """The tied parameters of this rank's stage, with a process group per tie of the ranks whose stages use it.

    Every rank must build it, with the same ties: creating a process group takes every rank of the world.
    """

    def __init__(
        self, ties: Sequence[Tie], topology: Topology, parameters: Mapping[str, Tensor],
        groups: dict[tuple[int, ...], dist.ProcessGroup],
    ) -> None:  # fmt: skip
        """``parameters`` by the names ties give; ``groups`` caches process groups by their ranks across runs."""
        self._mine: list[tuple[Tensor, dist.ProcessGroup, int]] = []  # parameter, its group, the first stage's rank
        for replica in range(topology.d):
            for tie in ties:
                ranks = tuple(topology.rank_of(stage, replica) for stage in tie.stages)
                if ranks not in groups:
                    groups[ranks] = dist.new_group(list(ranks))
                if replica == topology.replica and topology.stage in tie.stages:
                    self._mine.append((parameters[tie.name], groups[ranks], ranks[0]))
        self._counted_here = {id(p) for p, _, first in self._mine if first == topology.rank}

    def __bool__(self) -> bool:
        return bool(self._mine)

    def counted_here(self, p: Tensor) -> bool:
        """Whether this stage counts ``p``'s gradient in a global norm: every untied parameter, and a tied one on
        the first of its stages only."""
        return not any(p is q for q, _, _ in self._mine) or id(p) in self._counted_here

    def synchronize(self) -> None:
        """Make every copy equal to the first stage's."""
        with torch.no_grad():
            for p, group, first in self._mine:
                dist.broadcast(p.data, first, group=group)

    def sum_gradients(self) -> None:
        """Sum each tied parameter's gradient over its stages; a copy without a gradient adds nothing, and the
        parameter keeps none if no copy had one."""
        for p, group, _ in self._mine:
            g = p.grad
            flat = torch.cat([g.reshape(-1) if g is not None else p.new_zeros(p.numel()), p.new_ones(1) * (g is not None)])
            dist.all_reduce(flat, group=group)
            if flat[-1] == 0:
                continue
            summed = flat[:-1].view_as(p)
            if g is None:
                p.grad = summed.clone()
            else:
                g.copy_(summed)
