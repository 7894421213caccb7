"""lr=None is each param group's rule's own learning rate: Adan's 3e-2, Lion's and Lion-Adan's
1e-3 (the suite's rates), so a Lion user never trains at Adan's rate unasked."""

from __future__ import annotations

import pytest
import torch

from neurooptima import NeuroOptima

# Written out here, not imported: the documented values (README options table, docstring).
RULE_LR = {"adan": 3e-2, "lion": 1e-3, "lion_adan": 1e-3}


def _params(n: int = 2) -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.randn(3)) for _ in range(n)]


@pytest.mark.parametrize("update", sorted(RULE_LR))
def test_default_lr_is_the_rules(update):
    optimizer = NeuroOptima(_params(), update=update)
    assert optimizer.param_groups[0]["lr"] == RULE_LR[update]


def test_a_group_with_its_own_rule_gets_its_rules_lr():
    a, b, c = _params(3)
    optimizer = NeuroOptima([dict(params=[a]), dict(params=[b], update="lion"),
                             dict(params=[c], update="lion", lr=5e-4)])
    assert [g["lr"] for g in optimizer.param_groups] == [3e-2, 1e-3, 5e-4]
    d = torch.nn.Parameter(torch.randn(2))
    optimizer.add_param_group(dict(params=[d], update="lion_adan"))
    assert optimizer.param_groups[-1]["lr"] == 1e-3


def test_lion_default_step_moves_each_weight_by_its_lr():
    """The first Lion step without decay moves every weight by exactly lr (sign update)."""
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    optimizer = NeuroOptima([p], update="lion", weight_decay=0.0, sam_rho=0)  # the rule alone
    p.grad = torch.tensor([0.5, -0.25, 2.0])
    before = p.detach().clone()
    optimizer.step()
    torch.testing.assert_close(before - p.detach(), torch.full((3,), 1e-3) * p.grad.sign(),
                               rtol=0, atol=1e-7)


def test_lr_none_set_into_a_group_is_resolved_at_the_next_step():
    p = torch.nn.Parameter(torch.randn(3))
    optimizer = NeuroOptima([p], lr=0.1)
    optimizer.param_groups[0]["update"] = "lion"
    optimizer.param_groups[0].update(lr=None, betas=None)  # the rule's own, both
    p.grad = torch.ones(3)
    optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_state_dict_saves_the_resolved_lr():
    optimizer = NeuroOptima(_params(), update="lion")
    assert optimizer.state_dict()["param_groups"][0]["lr"] == 1e-3


def test_scheduler_starts_from_the_resolved_lr():
    optimizer = NeuroOptima(_params(), update="lion")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    assert optimizer.param_groups[0]["initial_lr"] == 1e-3
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_bad_lr_still_names_the_argument():
    with pytest.raises(ValueError, match="lr must be >= 0"):
        NeuroOptima(_params(), lr=-1.0)


def test_deepspeed_config_entry_without_lr_takes_the_rules():
    pytest.importorskip("deepspeed")
    from neurooptima.distributed.deepspeed import EngineNeuroOptima, split_config

    _, kwargs = split_config({"optimizer": {"type": "NeuroOptima",
                                            "params": {"update": "lion"}}})
    assert "lr" not in kwargs
    optimizer = EngineNeuroOptima(_params(), **kwargs)
    assert optimizer.param_groups[0]["lr"] == 1e-3


def test_launcher_without_lr_takes_the_rules():
    import argparse

    from launch.optimizers import add_optimizer_args, neurooptima_kwargs

    parser = argparse.ArgumentParser()
    add_optimizer_args(parser)
    kwargs = neurooptima_kwargs(parser.parse_args(["--update", "lion"]))
    assert "lr" not in kwargs
    assert NeuroOptima(_params(), **kwargs).param_groups[0]["lr"] == 1e-3
    assert neurooptima_kwargs(parser.parse_args(["--lr", "0.02"]))["lr"] == 0.02
