"""The strategy's options: one frozen, checked object that mirrors the Hydra config of the strategy."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from lightning_gpipe import GPipeStrategy
from lightning_gpipe.integration.config import GPipeConfig

CONF = Path(__file__).resolve().parents[1] / "conf" / "strategy" / "gpipe.yaml"


def test_the_hydra_config_names_every_option():
    """conf/strategy/gpipe.yaml sets every option a YAML value can hold (a timedelta cannot: ``timeout``)."""
    keys = set(yaml.safe_load(CONF.read_text())) - {"_target_"}
    fields = {f.name for f in dataclasses.fields(GPipeConfig)}
    assert keys == fields - {"timeout"}


def test_the_options_are_frozen_and_reach_the_strategy():
    strategy = GPipeStrategy(microbatches=3, balance=[2, 2], checkpoint="never", data_parallel_size=2)
    config = strategy.config
    assert (config.microbatches, config.balance, config.checkpoint) == (3, (2, 2), "never")
    assert (strategy.microbatches, strategy.checkpoint, strategy.data_parallel_size) == (3, "never", 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.microbatches = 4  # type: ignore[misc]
    assert GPipeConfig(timeout=timedelta(seconds=5)).timeout == timedelta(seconds=5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"observe_every_n_steps": -1}, r"GPipeStrategy\(observe_every_n_steps=-1\): need a whole number, 0 to turn it off"),
        ({"observe_every_n_steps": True}, r"GPipeStrategy\(observe_every_n_steps=True\): need a whole number"),
        ({"state_dict_type": "zip"}, r"GPipeStrategy\(state_dict_type='zip'\): choose one of full, sharded"),
        ({"gather_model": "yes"}, r"GPipeStrategy\(gather_model='yes'\): True, False, or None"),
        ({"data_parallel_size": 0}, r"GPipeStrategy\(data_parallel_size=0\): need a whole number of replicas"),
        ({"schedule": "zb"}, r"GPipeStrategy\(schedule='zb'\): choose one of gpipe, 1f1b, interleaved$"),
        ({"virtual_stages": 2}, r"GPipeStrategy\(virtual_stages=2\) gives each rank several model chunks, which only"
                                r" schedule='interleaved' runs; this one is schedule='gpipe'"),
        ({"schedule": "interleaved", "virtual_stages": 0}, r"GPipeStrategy\(virtual_stages=0\): need an integer from 1 to 32"),
        ({"schedule": "interleaved", "virtual_stages": 2.0}, r"GPipeStrategy\(virtual_stages=2.0\): need an integer"),
    ],
)  # fmt: skip
def test_bad_options_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GPipeConfig(**kwargs)


def test_interleaved_needs_several_stages_and_m_in_groups_of_k():
    from lightning_gpipe.integration.build import _check_interleaved

    with pytest.raises(ValueError, match=(
        r"GPipeStrategy\(schedule='interleaved'\) spreads the model's chunks over at least 2 stages; this run has 1"
        r" \(devices x nodes / data_parallel_size\): on one stage, train with schedule='1f1b'"
    )):  # fmt: skip
        _check_interleaved(1, GPipeConfig(schedule="interleaved"))
    with pytest.raises(ValueError, match=(
        r"GPipeStrategy\(schedule='interleaved'\): interleaved 1F1B takes micro-batches in groups of K: microbatches=6"
        " is not a multiple of K=4"
    )):  # fmt: skip
        _check_interleaved(4, GPipeConfig(schedule="interleaved", microbatches=6))
    _check_interleaved(2, GPipeConfig(schedule="interleaved", microbatches=6, virtual_stages=3))
    assert (GPipeConfig(schedule="interleaved").chunks, GPipeConfig(schedule="interleaved", virtual_stages=3).chunks,
            GPipeConfig(schedule="1f1b").chunks) == (2, 3, 1)  # fmt: skip
