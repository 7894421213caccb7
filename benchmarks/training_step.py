"""What every benchmark run shares: the training step (which counts the gradient evaluations it
spends), the learning-rate schedule and the image augmentation.

The step drives an optimizer the way its users do. A two-pass optimizer driven by
``first_step()`` / ``second_step()`` (pytorch_optimizer's SAM) gets its two backward passes
here; every other optimizer gets ``step(closure)``, and the closure counts its calls, so a
NeuroOptima step that decides by itself whether it needs a second pass (SAM every k-th step,
SAM from step T on) is charged exactly what it evaluated. Passes after the first freeze
BatchNorm's running statistics (``frozen_batchnorm_stats``): a batch is counted once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as nnf

from neurooptima import frozen_batchnorm_stats


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy; for text over every next-character position."""
    return nnf.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor,
               y: torch.Tensor, two_pass: bool = False) -> tuple[float, int]:
    """One optimizer step on the batch (x, y): (first-pass loss, gradient evaluations)."""
    if two_pass:
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.first_step()
        model.zero_grad(set_to_none=True)
        with frozen_batchnorm_stats(model):
            loss_fn(model(x), y).backward()
        opt.second_step()
        return float(loss.detach()), 2
    calls: list[float] = []

    def closure() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        if calls:
            with frozen_batchnorm_stats(model):
                loss = loss_fn(model(x), y)
        else:
            loss = loss_fn(model(x), y)
        loss.backward()
        calls.append(float(loss.detach()))
        return loss

    opt.step(closure)
    if not calls:
        raise RuntimeError(f"{type(opt).__name__}.step(closure) never called the closure")
    return calls[0], len(calls)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor of the 0-based ``step`` of ``total``: linear warm-up over
    ``warmup`` steps to 1, then cosine decay towards 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def warmup_steps(total: int, fraction: float = 0.05) -> int:
    return max(1, round(fraction * total))


def augment(x: torch.Tensor, pad: int, flip: bool, fill: float,
            generator: torch.Generator) -> torch.Tensor:
    """Random crop after padding each side by ``pad`` pixels of value ``fill`` (the background),
    and a horizontal flip of half the images; draws from ``generator`` only."""
    n, _, h, w = x.shape
    if pad:
        padded = nnf.pad(x, (pad, pad, pad, pad), value=fill)
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
        x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        x = torch.where(mirror[:, None, None, None], x.flip(-1), x)
    return x
