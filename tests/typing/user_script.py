"""A user's training script, type-checked with ``mypy --strict`` by tests/test_typing.py.

The learning rate below is a string on purpose: with NeuroOptima's ``py.typed`` marker
installed, mypy reads its annotations and must report the argument type.
"""

import torch
from torch import nn

from neurooptima import NeuroOptima

model = nn.Linear(4, 1)
optimizer = NeuroOptima(model.parameters(), lr="0.1", weight_decay=0.01)
x, y = torch.randn(8, 4), torch.randn(8, 1)


def closure() -> torch.Tensor:
    optimizer.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    torch.autograd.backward(loss)
    return loss


optimizer.step(closure)
