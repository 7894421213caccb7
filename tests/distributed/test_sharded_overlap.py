"""``overlap_param_gather=True``: no read in a forward outruns its weights' all-gather.

Each run is compared bitwise with the same run without overlap. The attention and encoder-layer
models use the default bucket size, with a head sized so that an attention layer's
``out_proj.weight`` lies in another bucket than the layer's own parameters: a layer that waited
only for its own parameters would compute with the previous step's ``out_proj.weight``.

Run: torchrun --standalone --nproc_per_node=2 (and 3) -m pytest -q tests/distributed/test_sharded_overlap.py
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn
from test_sharded_support import agree_max, closure_for, local_batch, loss_fn, make_model

from neurooptima.distributed import ShardedNeuroOptima

STEPS = 3  # the first ends by laying out the buckets anew; the next forwards meet gathers in flight
HYPER = dict(lr=3e-3, weight_decay=0.01, sam_rho=0.0, lookahead_k=0, eps=1e-2)
WIDTH = 768
CAP = 25 * 2**20  # the default bucket_cap_mb, in bytes


def _full_bytes(numel: int, n: int) -> int:
    """A float32 parameter's share of a bucket: N padded chunks."""
    return n * math.ceil(numel / n) * 4


def _head_width(before: list[int], n: int) -> int:
    """Width of a head on 768 features whose gradients come first in backward, so that with the
    ``before`` gradients it fills the first bucket too far for one attention layer's
    ``in_proj_bias``: that layer's ``out_proj.weight`` closes the first bucket and its own
    ``in_proj`` parameters open the second."""
    used = sum(_full_bytes(k, n) for k in before)
    m = (CAP - used) // (4 * (WIDTH + 1))
    while used + _full_bytes(m, n) + _full_bytes(WIDTH * m, n) > CAP:
        m -= 1
    room = CAP - used - _full_bytes(m, n) - _full_bytes(WIDTH * m, n)
    assert room < _full_bytes(3 * WIDTH, n)
    return m


_ATTENTION = [3 * WIDTH * WIDTH, 3 * WIDTH, WIDTH * WIDTH, WIDTH]  # in_proj w, b; out_proj w, b


class AttentionNet(nn.Module):
    """Three attention layers and a head; the first layer's weights span two buckets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(31)
        self.layers = nn.ModuleList(nn.MultiheadAttention(WIDTH, 12, batch_first=True)
                                    for _ in range(3))
        width = _head_width(2 * _ATTENTION + _ATTENTION[2:], dist.get_world_size())
        self.head = nn.Linear(WIDTH, width)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x, x, x, need_weights=False)[0]
        return self.head(x)

    def split(self):
        """(parameter read without its module being called, the reader's own parameters)"""
        first = self.layers[0]
        return first.out_proj.weight, [first.in_proj_weight, first.in_proj_bias]


class EncoderNet(nn.Module):
    """nn.TransformerEncoderLayer(768, 12, 3072) and a head; the layer spans two buckets."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(32)
        self.layer = nn.TransformerEncoderLayer(WIDTH, 12, 3072, dropout=0.0, batch_first=True)
        before = [p.numel() for name, p in self.layer.named_parameters() if "in_proj" not in name]
        self.head = nn.Linear(WIDTH, _head_width(before, dist.get_world_size()))

    def forward(self, x):
        return self.head(self.layer(x))

    def split(self):
        attention = self.layer.self_attn
        return attention.out_proj.weight, [attention.in_proj_weight, attention.in_proj_bias]


class TinyGPT(nn.Module):
    """GPT-style: embeddings, a causal pre-norm block, and a head whose weight the model reads
    itself instead of calling the head (as custom modules do)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(33)
        self.wte = nn.Embedding(40, 32)
        self.wpe = nn.Parameter(torch.randn(6, 32) * 0.02)
        self.block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True,
                                                norm_first=True)
        self.ln_f = nn.LayerNorm(32)
        self.head = nn.Linear(32, 40)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe[:idx.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
        x = self.ln_f(self.block(x, src_mask=mask, is_causal=True))
        return nn.functional.linear(x, self.head.weight, self.head.bias)


def _batch(model, step, rank, n):
    gen = torch.Generator().manual_seed(500 + step)
    per = 2
    if isinstance(model, TinyGPT):
        idx = torch.randint(0, 40, (per * n, 6), generator=gen)
        return idx[rank * per:(rank + 1) * per], None
    x = torch.randn(per * n, 4, WIDTH, generator=gen)
    return x[rank * per:(rank + 1) * per], None


def _loss(model, x):
    out = model(x)
    if isinstance(model, TinyGPT):
        return nn.functional.cross_entropy(out.reshape(-1, 40), x.roll(-1, 1).reshape(-1))
    return out.pow(2).mean()


def _run(model_cls, overlap, bucket_cap_mb):
    rank, n = dist.get_rank(), dist.get_world_size()
    model = model_cls()
    optimizer = ShardedNeuroOptima(model.parameters(), module=model, bucket_cap_mb=bucket_cap_mb,
                                   overlap_param_gather=overlap, **HYPER)
    losses = []
    for step in range(STEPS):
        x, _ = _batch(model, step, rank, n)
        optimizer.zero_grad()
        loss = _loss(model, x)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
        if overlap and step == 1:
            assert optimizer._weights._pending  # the next forward meets gathers in flight
    x, _ = _batch(model, STEPS, rank, n)
    model.eval()  # the encoder layer's fast path reads every weight inside its own forward
    with torch.no_grad():
        evaluated = model(x)
    return losses, evaluated, model.state_dict(), optimizer


@pytest.mark.parametrize("model_cls, bucket_cap_mb", [
    (AttentionNet, 25), (EncoderNet, 25), (TinyGPT, 0.001)],
    ids=["attention", "encoder_layer", "gpt_reads_child_weight"])
def test_overlap_is_bitwise_the_plain_run(world, model_cls, bucket_cap_mb):
    off_losses, off_eval, off_state, off_opt = _run(model_cls, False, bucket_cap_mb)
    if model_cls is not TinyGPT:  # the case the subtree wait exists for
        read, own = off_opt._module.split()
        assert all(off_opt._slots[read][0] is not off_opt._slots[p][0] for p in own)
    on_losses, on_eval, on_state, _ = _run(model_cls, True, bucket_cap_mb)
    assert all(torch.equal(a, b) for a, b in zip(on_losses, off_losses))
    # Inference: torch's encoder layer takes its fused fast path only without module hooks, so
    # with overlap (hooks attached) it computes the same function unfused, to rounding.
    assert ((on_eval - off_eval).norm() / off_eval.norm()).item() <= 1e-6
    assert all(torch.equal(on_state[k], off_state[k]) for k in off_state)


def _train(model, optimizer, steps, after_step):
    rank, n = dist.get_rank(), dist.get_world_size()
    for step in steps:
        optimizer.step(closure_for(model, optimizer, *local_batch(step, rank, n)))
        after_step()


def test_in_place_edit_after_step_is_refused_or_kept_after_wait(world):
    """Weight clipping right after step(): with the gathers in flight it is refused on every
    rank, naming the parameter; after wait_for_weights() it is kept, as without overlap."""
    clip = 0.05
    runs = []
    for overlap in (False, True):
        model = make_model(6)
        optimizer = ShardedNeuroOptima(model.parameters(), module=model, bucket_cap_mb=0.001,
                                       overlap_param_gather=overlap, **HYPER)

        def clamp(model=model, optimizer=optimizer):
            optimizer.wait_for_weights()
            with torch.no_grad():
                for p in model.parameters():
                    p.clamp_(-clip, clip)
        _train(model, optimizer, range(STEPS), clamp)
        runs.append(model)
    assert max(p.abs().max().item() for p in runs[1].parameters()) <= torch.tensor(clip).item()
    assert all(torch.equal(a, b) for a, b in zip(runs[0].parameters(), runs[1].parameters()))

    model = make_model(6)
    optimizer = ShardedNeuroOptima(model.parameters(), module=model, bucket_cap_mb=0.001,
                                   overlap_param_gather=True, **HYPER)
    _train(model, optimizer, range(2), lambda: None)
    assert optimizer._weights._pending
    with torch.no_grad():
        model.fc1.weight.clamp_(-clip, clip)  # lands in the weights of before the step
    x, y = local_batch(2, *world)
    try:
        loss_fn(model, x, y)
        message = ""
    except RuntimeError as error:
        message = str(error)
    assert agree_max(0.0 if "fc1.weight changed in place after step()" in message
                     and "wait_for_weights()" in message else 1.0) == 0.0, message


def test_submodule_state_dict_waits(world):
    rank, n = world
    model = make_model(7)
    optimizer = ShardedNeuroOptima(model.parameters(), module=model, bucket_cap_mb=0.001,
                                   overlap_param_gather=True, **HYPER)
    _train(model, optimizer, range(2), lambda: None)
    assert optimizer._weights._pending
    early = {k: v.clone() for k, v in model.fc2.state_dict().items()}
    optimizer.wait_for_weights()
    assert all(torch.equal(early[k], v) for k, v in model.fc2.state_dict().items())


def test_functional_call_with_the_models_own_parameters_waits(world):
    rank, n = world
    model = TinyGPT()
    optimizer = ShardedNeuroOptima(model.parameters(), module=model, bucket_cap_mb=0.001,
                                   overlap_param_gather=True, **HYPER)
    for step in range(2):
        optimizer.zero_grad()
        _loss(model, _batch(model, step, rank, n)[0]).backward()
        optimizer.step()
    assert optimizer._weights._pending
    x = _batch(model, 2, rank, n)[0]
    with torch.no_grad():
        out = torch.func.functional_call(model, dict(model.named_parameters()), (x,))
        optimizer.wait_for_weights()
        assert torch.equal(out, model(x))


@pytest.mark.four_ranks
def test_overlap_on_a_mesh_is_bitwise_the_plain_run(world):
    from torch.distributed.device_mesh import init_device_mesh

    rank, n = world
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    runs = []
    for overlap in (False, True):
        model = TinyGPT()
        optimizer = ShardedNeuroOptima(model.parameters(), module=model, device_mesh=mesh,
                                       bucket_cap_mb=0.001, overlap_param_gather=overlap,
                                       **HYPER)
        for step in range(STEPS):
            optimizer.zero_grad()
            _loss(model, _batch(model, step, rank, n)[0]).backward()
            optimizer.step()
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_compiled_forward_is_bitwise_the_plain_run(world):
    """torch.compile: the waits run at every call (never traced away); a module of the user's
    own waits for its whole subtree, so the head read by the model itself is current too."""
    rank, n = world
    runs = []
    for overlap in (False, True):
        model = TinyGPT()
        optimizer = ShardedNeuroOptima(model.parameters(), module=model, bucket_cap_mb=0.001,
                                       overlap_param_gather=overlap, **HYPER)
        compiled = torch.compile(model, backend="aot_eager")
        for step in range(STEPS):
            x = _batch(model, step, rank, n)[0]
            optimizer.zero_grad()
            nn.functional.cross_entropy(compiled(x).reshape(-1, 40),
                                        x.roll(-1, 1).reshape(-1)).backward()
            optimizer.step()
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
