"""Lightning checkpoints of a pipeline: one file gathered on global rank 0 or a sharded folder, loaded per stage.

Files are keyed by parameter name, so they resume with any K, M, balance and replica count, and a plain
Lightning run reads them (see :mod:`lightning_gpipe.checkpointing.state`)."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any, Optional, Union

import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch.optim import Optimizer

from lightning_gpipe.checkpointing.sharded import is_sharded, load_sharded, save_sharded
from lightning_gpipe.checkpointing.state import (
    merge_optimizer_states,
    optimizer_state_by_name,
    optimizer_state_for,
    parameter_names,
    unwrapped,
)
from lightning_gpipe.engine.rng import rank_random_state, set_rank_random_state
from lightning_gpipe.model.partition import stage_view
from lightning_gpipe.parallel.collectives import gather_pipeline

__all__ = ["module_state", "optimizer_state", "save", "load", "load_module_state", "load_optimizer_states"]


def _first_replica(strategy: Any, local: Any) -> list[Any]:
    """Every stage's ``local`` of the first replica on global rank 0 (``[]`` elsewhere; replicas are equal)."""
    topology = strategy.topology
    if topology.replica != 0:
        return []
    return gather_pipeline(local, topology)


def module_state(strategy: Any, kept: Any) -> dict[str, Any]:
    """The unpartitioned module's state dict on global rank 0 (empty elsewhere), or this stage's when sharded."""
    module = strategy.lightning_module
    shards = _shards(strategy)
    if shards is not None:  # shard="full": the parameters whole
        shards.gather()
    if strategy.topology.k > 1:  # Lightning calls this first when it builds a checkpoint, on every rank
        kept.saved.watch(module)
    with stage_view():
        local = module.state_dict()
    if strategy.config.state_dict_type == "sharded":
        return local
    full: dict[str, Any] = {}
    for part in _first_replica(strategy, local):
        full.update(part)
    for alias, name in strategy.tied_names.items():  # one tensor under every name, as on one device
        if alias in full and name in full:
            full[alias] = full[name]
    return full


def optimizer_state(strategy: Any, kept: Any, optimizer: Optimizer) -> dict[str, Any]:
    """The optimizer state of all stages on global rank 0 (empty elsewhere), named and in the unpartitioned
    module's order; when sharded, this stage's own, by parameter name."""
    optimizer = unwrapped(optimizer)
    shards = _shards(strategy)  # with shards, the replicas' parts gathered whole
    state = shards.state_dict() if shards is not None else None
    with shards.named() if shards is not None else nullcontext():
        local = optimizer_state_by_name(optimizer, strategy.lightning_module, strategy.tied_names, state)
    if strategy.config.state_dict_type == "sharded":
        return local
    states = _first_replica(strategy, local)
    if not states:
        return {}
    index = [unwrapped(o) for o in strategy.optimizers].index(optimizer)
    return merge_optimizer_states(states, kept.optimizer_layouts[index])


def save(
    strategy: Any, kept: Any, checkpoint: dict[str, Any], filepath: Union[str, Path], storage_options: Any
) -> None:
    """Write ``checkpoint``: global rank 0 the whole file, or every stage its own tensors of a sharded folder."""
    topology = strategy.topology
    kept.saved.take(checkpoint, topology, type(strategy.lightning_module).__name__)
    checkpoint["gpipe"] = {
        "k": topology.k,
        "data_parallel_size": topology.d,
        "balance": strategy.balance,
        "microbatches": strategy.config.microbatches,
        # Each stage's random stream, so dropout continues as if never interrupted (same K).
        "stage_random": _first_replica(strategy, kept.stage_random.state_dict()),
        "rank_random": rank_random_state(strategy.root_device),
        "optimizer_param_names": kept.optimizer_layouts,  # how optimizer_states numbers the parameters
    }
    if strategy.config.state_dict_type == "sharded":
        if storage_options is not None:
            raise TypeError(f"GPipeStrategy(state_dict_type='sharded') takes no storage_options, got {storage_options!r}")
        # Every replica writes its stage's tensors (the writer deduplicates them); the first replica's metadata.
        gather = partial(gather_pipeline, topology=topology)
        save_sharded(
            checkpoint, filepath, kept.optimizer_layouts, strategy.is_global_zero, strategy.barrier, gather,
            strategy.broadcast,
        )  # fmt: skip
    elif strategy.is_global_zero:  # Lightning's checkpoint IO writes to a temporary file, then renames it
        strategy.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)


def load(strategy: Any, path: Union[str, Path], weights_only: Optional[bool], default: Any) -> dict[str, Any]:
    """Read a checkpoint for this stage: a sharded folder's own tensors, or a file memory-mapped (``default``:
    Lightning's own loading, for other checkpoint IO)."""
    module = strategy.lightning_module
    if is_sharded(path):
        names = list(parameter_names(module, strategy.tied_names).values())  # a tied parameter's state by its name
        return load_sharded(path, module.state_dict(), names, weights_only=weights_only)
    if type(strategy.checkpoint_io) is TorchCheckpointIO and Path(path).is_file():
        # Memory-mapped on the CPU: each rank reads only its own stage's tensors, not K copies of the model.
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    return default(path, weights_only=weights_only)


def load_module_state(strategy: Any, kept: Any, checkpoint: Mapping[str, Any], strict: bool) -> None:
    """This stage's entries of the whole module's state dict (all of it before the module is partitioned)."""
    module, shards = strategy.lightning_module, _shards(strategy)
    if shards is not None:  # the whole parameters to load into, then this replica's share of them
        shards.gather()
    own = module.state_dict()
    state = checkpoint["state_dict"]
    if kept.balance is not None:  # partitioned: keep this stage's entries only
        state = {key: value for key, value in state.items() if key in own}
    module.load_state_dict(state, strict=strict)
    if shards is not None:
        shards.refresh()


def load_optimizer_states(strategy: Any, kept: Any, run: Any, checkpoint: Mapping[str, Any]) -> None:
    """The optimizers' state by parameter name, then the random streams: the last of the training state Lightning
    restores (loops, precision, optimizers, schedulers)."""
    saved_states = checkpoint["optimizer_states"]
    if len(saved_states) != len(strategy.optimizers):
        raise ValueError(
            f"the checkpoint holds {len(saved_states)} optimizer states, configure_optimizers returned"
            f" {len(strategy.optimizers)}: return as many optimizers as the run that saved it"
        )
    # Saved by GPipeStrategy, the names come with the checkpoint; a plain Lightning run numbered its
    # parameters as configure_optimizers builds them on the whole module.
    layouts = checkpoint.get("gpipe", {}).get("optimizer_param_names") or kept.optimizer_layouts
    shards = None if run is None else run.shards
    for optimizer, saved, layout in zip(strategy.optimizers, saved_states, layouts):
        with shards.named() if shards is not None else nullcontext():
            state = optimizer_state_for(optimizer, strategy.lightning_module, saved, layout, strategy.tied_names)
        optimizer.load_state_dict(state)
    if shards is not None:  # this replica's part of the state, loaded whole
        shards.shard_state()
    _optimizers_to_device(strategy.optimizers, strategy.root_device)
    _restore_random(strategy, run)


def _shards(strategy: Any) -> Any:
    run = strategy._run
    return None if run is None else run.shards


def _restore_random(strategy: Any, run: Any) -> None:
    """Put the random streams where the saving run had them, last, right before the data is first iterated."""
    restored, run.restored = run.restored, None
    if restored is None:
        return
    topology = strategy.topology
    set_rank_random_state(restored["rank_random"], strategy.root_device)
    if restored["k"] == topology.k and restored["balance"] == strategy.balance:
        run.executor.random.load_state_dict(restored["stage_random"][topology.stage])
    else:
        rank_zero_info(
            f"GPipeStrategy: the checkpoint was saved with {restored['k']} stages (balance {restored['balance']}),"
            f" this run has {topology.k} (balance {strategy.balance}): training continues from the same state,"
            " but random draws inside the stages (dropout) differ from an uninterrupted run"
        )
