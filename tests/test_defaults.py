"""One set of defaults: every front that takes NeuroOptima's options defaults them alike."""

from __future__ import annotations

import inspect

from neurooptima import NeuroOptima


def test_sharded_optimizer_defaults_are_neurooptimas():
    from neurooptima.distributed import ShardedNeuroOptima

    ours = inspect.signature(NeuroOptima).parameters
    sharded = inspect.signature(ShardedNeuroOptima).parameters
    for name, param in ours.items():
        if name != "params":
            assert sharded[name].default == param.default, name


def test_launcher_defaults_are_neurooptimas():
    from launch.optimizers import DEFAULT_LR

    assert DEFAULT_LR["neurooptima"] == inspect.signature(NeuroOptima).parameters["lr"].default
