"""Bad input: one test per invalid argument, each error naming the argument and its range."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neurooptima import NeuroOptima

# (keyword arguments, words the ValueError must contain: the argument and its accepted range)
INVALID = {
    "lr_negative": (dict(lr=-1e-3), ["lr", ">= 0"]),
    "lr_nan": (dict(lr=math.nan), ["lr", "finite"]),
    "lr_inf": (dict(lr=math.inf), ["lr", "finite"]),
    "lr_string": (dict(lr="0.1"), ["lr", "real number"]),
    "eps_negative": (dict(eps=-1e-8), ["eps", ">= 0"]),
    "weight_decay_negative": (dict(weight_decay=-0.01), ["weight_decay", ">= 0"]),
    "sam_rho_negative": (dict(sam_rho=-0.05), ["sam_rho", ">= 0"]),
    "sam_eta_negative": (dict(sam_eta=-0.01), ["sam_eta", ">= 0"]),
    "betas0_one": (dict(betas=(1.0, 0.999)), ["betas[0]", "[0, 1)"]),
    "betas1_negative": (dict(betas=(0.9, -0.1)), ["betas[1]", "[0, 1)"]),
    "betas2_above_one": (dict(betas=(0.9, 0.9, 1.5)), ["betas[2]", "[0, 1)"]),
    "betas_length_1": (dict(betas=(0.9,)), ["betas", "length 2 or 3"]),
    "betas_length_4": (dict(betas=(0.9, 0.9, 0.9, 0.9)), ["betas", "length 2 or 3"]),
    "betas_length_3_lion": (dict(update="lion", betas=(0.9, 0.99, 0.9)), ["betas", "length 2"]),
    "betas_length_3_lion_adan": (dict(update="lion_adan", betas=(0.9, 0.9, 0.9)),
                                 ["betas", "length 2"]),
    "betas_not_tuple": (dict(betas=0.9), ["betas", "tuple"]),
    "beta_diff_one": (dict(beta_diff=1.0), ["beta_diff", "[0, 1)"]),
    "lookahead_k_negative": (dict(lookahead_k=-1), ["lookahead_k", ">= 0"]),
    "lookahead_k_float": (dict(lookahead_k=2.5), ["lookahead_k", "integer"]),
    "lookahead_alpha_zero": (dict(lookahead_alpha=0.0), ["lookahead_alpha", "(0, 1]"]),
    "lookahead_alpha_above_one": (dict(lookahead_alpha=1.5), ["lookahead_alpha", "(0, 1]"]),
    "lookahead_alpha_negative": (dict(lookahead_alpha=-0.5), ["lookahead_alpha", "(0, 1]"]),
    "update_unknown": (dict(update="adam"), ["update", "'adan'", "'lion'", "'lion_adan'"]),
    "max_grad_norm_zero": (dict(max_grad_norm=0.0), ["max_grad_norm", "> 0"]),
    "max_grad_norm_negative": (dict(max_grad_norm=-1.0), ["max_grad_norm", "> 0"]),
    "max_grad_norm_string": (dict(max_grad_norm="1"), ["max_grad_norm", "real number"]),
    "no_prox_not_bool": (dict(no_prox="yes"), ["no_prox", "True or False"]),
    "sam_adaptive_not_bool": (dict(sam_adaptive=1), ["sam_adaptive", "True or False"]),
    "maximize_not_bool": (dict(maximize=None), ["maximize", "True or False"]),
    "foreach_not_bool": (dict(foreach="auto"), ["foreach", "True, False or None"]),
}


def params():
    return nn.Linear(3, 2).parameters()


@pytest.mark.parametrize("kwargs,words", INVALID.values(), ids=INVALID.keys())
def test_invalid_argument_is_named(kwargs, words):
    with pytest.raises(ValueError) as info:
        NeuroOptima(params(), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize("kwargs,words", [INVALID["lr_negative"], INVALID["betas0_one"],
                                          INVALID["lookahead_alpha_zero"],
                                          INVALID["update_unknown"]],
                         ids=["lr", "betas", "lookahead_alpha", "update"])
def test_invalid_argument_in_a_param_group_is_named(kwargs, words):
    model = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    groups = [dict(params=model[0].parameters()), dict(params=model[1].parameters(), **kwargs)]
    with pytest.raises(ValueError) as info:
        NeuroOptima(groups)
    for word in words:
        assert word in str(info.value)
    optimizer = NeuroOptima(model[0].parameters())
    with pytest.raises(ValueError) as info:
        optimizer.add_param_group(dict(params=model[1].parameters(), **kwargs))
    assert words[0] in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(lookahead_k=None), dict(lookahead_k=0), dict(sam_rho=0.0),
                                    dict(lr=0.0), dict(eps=0.0), dict(lookahead_alpha=1.0),
                                    dict(betas=(0.0, 0.0)), dict(betas=(0.9, 0.9, 0.9)),
                                    dict(max_grad_norm=1), dict(update="lion", betas=(0.9, 0.99))])
def test_boundary_values_are_accepted(kwargs):
    NeuroOptima(params(), **kwargs)


def test_lookahead_disabled_allocates_nothing():
    model = nn.Linear(3, 2)
    for k in (None, 0):
        optimizer = NeuroOptima(model.parameters(), lookahead_k=k)
        assert all(len(optimizer.state[p]) == 0 for p in model.parameters())


def test_sparse_gradients_raise_a_clear_error():
    embedding = nn.Embedding(10, 3, sparse=True)
    optimizer = NeuroOptima(embedding.parameters(), sam_rho=0.0)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.step()


def test_sparse_gradients_raise_in_the_sam_first_pass_too():
    embedding = nn.Embedding(10, 3, sparse=True)
    optimizer = NeuroOptima(embedding.parameters(), sam_rho=0.05)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        optimizer.first_step()


def test_complex_parameters_raise_a_clear_error():
    z = torch.zeros(3, dtype=torch.complex64, requires_grad=True)
    with pytest.raises(ValueError, match="complex parameters.*view_as_real"):
        NeuroOptima([z])
    optimizer = NeuroOptima([torch.zeros(2, requires_grad=True)])
    with pytest.raises(ValueError, match="complex parameters"):
        optimizer.add_param_group(dict(params=[z]))
