"""ShardedNeuroOptima's lr=None is each group's rule's rate, as NeuroOptima's."""

from __future__ import annotations

from test_sharded_support import make_model

from neurooptima.distributed import ShardedNeuroOptima


def test_default_lr_is_the_rules_per_group():
    model = make_model()
    optimizer = ShardedNeuroOptima([dict(params=list(model.fc1.parameters())),
                                    dict(params=list(model.fc2.parameters()), update="lion"),
                                    dict(params=[model.gain], update="lion_adan")])
    assert [g["lr"] for g in optimizer.param_groups] == [3e-2, 1e-3, 1e-3]
