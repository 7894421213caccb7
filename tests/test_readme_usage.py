"""The README: the usage loop verbatim in its quick start, trained here on sklearn digits to
>= 90 % accuracy; at most 250 lines, with ``pip install`` and the quick start in the first 40."""

from __future__ import annotations

import inspect
import re
import textwrap
from pathlib import Path

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"
EPOCHS = 20
BATCH = 32


def readme_usage(model, loss_fn, data_loader):
    from neurooptima import NeuroOptima
    optimizer = NeuroOptima(model.parameters(), lr=1e-3, weight_decay=0.01, sam_rho=0.05,
                            lookahead_k=5, lookahead_alpha=0.5, betas=(0.9, 0.999), eps=1e-8)
    for input, target in data_loader:
        def closure():
            optimizer.zero_grad()
            loss = loss_fn(model(input), target)
            loss.backward()
            return loss
        loss = optimizer.step(closure)


def readme_block() -> str:
    text = README.read_text(encoding="utf-8")
    usage = text.split("## Quick start", 1)[1]
    match = re.search(r"```python\n(.*?)```", usage, flags=re.S)
    assert match, "README.md has no python block under '## Quick start'"
    return match.group(1)


def test_code_here_is_in_the_readme_quick_start():
    source = inspect.getsource(readme_usage)
    body = textwrap.dedent(source.split("\n", 1)[1])
    assert body in readme_block()


def test_readme_is_short_and_starts_with_install_and_quick_start():
    lines = README.read_text(encoding="utf-8").splitlines()
    # The benchmark block's three charts take about 20 of these lines, its table of the three
    # questions one per workload.
    assert len(lines) <= 280, f"README.md has {len(lines)} lines"
    head = lines[:40]
    assert any("pip install" in line for line in head)
    start = head.index("## Quick start")
    assert "```python" in lines[start:40]


def digits_split():
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=0, stratify=digits.target)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return (as_x(x_train), torch.tensor(y_train), as_x(x_test), torch.tensor(y_test))


def epochs_of_batches(x, y, epochs, batch, seed):
    """A data loader spanning several shuffled epochs, so the block runs once as written."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), batch):
            idx = order[start:start + batch]
            yield x[idx], y[idx]


def test_readme_usage_trains_digits_to_90_percent():
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = digits_split()
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    before = [p.detach().clone() for p in model.parameters()]
    readme_usage(model, nn.CrossEntropyLoss(),
                 epochs_of_batches(x_train, y_train, EPOCHS, BATCH, seed=0))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).double().mean().item()
    assert accuracy >= 0.90, f"test accuracy {accuracy:.3f}"
