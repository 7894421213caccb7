"""The time-to-target suite's workloads: what each trains (dataset, model, batch, budget in
epochs, validation and test points, metric, label noise, augmentation) and its data, split into
training, validation and test tensors the same way on every run.

``suite.py`` runs every candidate (``suite_candidates``) on each of these under the tuning
rules of ``suite_protocol``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # launch/ importable when only benchmarks/ is on sys.path
    sys.path.insert(0, str(ROOT))

from launch.data import load_dataset, steps_per_epoch  # noqa: E402

NOISE_SEED = 12345             # which training labels a noisy workload flips (fixed)


@dataclass(frozen=True)
class Workload:
    name: str
    dataset: str
    model: str
    batch_size: int
    epochs: int                    # budget = epochs x steps per epoch gradient evaluations
    evals: int                     # validation points, evenly spaced over the budget
    n_train: int | None            # None: all training examples but the validation tail
    n_val: int
    n_test: int | None = None
    metric: str = "accuracy"       # validation metric of the target: "accuracy" or "loss"
    label_noise: float = 0.0       # fraction of training labels flipped to another class
    augment: dict = field(default_factory=dict)   # image augmentation: pad, flip
    test_at: tuple[float, ...] = (0.5, 0.75, 0.9)  # test points besides the end (budget share)
    model_options: dict = field(default_factory=dict)
    data_options: dict = field(default_factory=dict)
    about: str = ""

    @property
    def higher_is_better(self) -> bool:
        return self.metric == "accuracy"


def workloads_for(quick: bool) -> dict[str, Workload]:
    """The workloads by name: the full suite's, or (``quick``) the CI profile's one."""
    if quick:  # CI: the same code path on tiny budgets, embedded data only
        return {"digits-mlp": Workload(
            "digits-mlp", "digits", "mlp", batch_size=64, epochs=2, evals=4,
            n_train=None, n_val=287, model_options=dict(hidden=(32,)),
            about="CI profile: tiny MLP, two epochs")}
    return {w.name: w for w in (
        Workload("digits-mlp", "digits", "mlp", batch_size=32, epochs=30, evals=30,
                 n_train=None, n_val=287, model_options=dict(hidden=(128, 64)),
                 about="MLP (128, 64) on scikit-learn's 8x8 digits"),
        Workload("fashion-2k", "fashion-mnist", "cnn", batch_size=64, epochs=40, evals=10,
                 n_train=2000, n_val=1000, n_test=5000, augment=dict(pad=1, flip=True),
                 model_options=dict(width=24, spatial=7),
                 about="generalization-bound: a wide CNN (width 24, 240k parameters) on 2,000 "
                       "Fashion-MNIST images, random 1-pixel crops and horizontal flips, 40 "
                       "epochs (training accuracy near 100 %, test accuracy well below)"),
        Workload("fashion-noisy", "fashion-mnist", "cnn", batch_size=128, epochs=5, evals=10,
                 n_train=20000, n_val=2000, n_test=5000, label_noise=0.3,
                 model_options=dict(width=16, spatial=7),
                 about="small CNN (two conv stages, width 16) on 20k Fashion-MNIST images, 30 % "
                       "of the training labels flipped to another class (validation and test "
                       "labels clean)"),
        Workload("shakespeare-char", "shakespeare", "transformer", batch_size=32, epochs=1,
                 evals=16, n_train=51200, n_val=400, n_test=2000, metric="loss",
                 model_options=dict(d_model=32, n_heads=2, n_layers=2),
                 data_options=dict(seq_len=64),
                 about="2-layer causal transformer (d_model 32) on 64-character windows of "
                       "Shakespeare, next-character cross-entropy"),
    )}


def load_workload_data(w: Workload) -> dict:
    """Train / validation / test tensors (no randomness except the fixed label flips)."""
    train, test = load_dataset(w.dataset, **w.data_options)
    n_all = len(train)
    n_train = w.n_train if w.n_train is not None else n_all - w.n_val
    if n_train + w.n_val > n_all:
        raise ValueError(f"{w.name}: n_train + n_val exceeds the {n_all} training examples")
    x, y = train.inputs[:n_train].clone(), train.targets[:n_train].clone()
    clean = y.clone()
    if w.label_noise:
        g = torch.Generator().manual_seed(NOISE_SEED)
        flip = torch.rand(n_train, generator=g) < w.label_noise
        shift = torch.randint(1, train.info.num_classes, (n_train,), generator=g)
        y = torch.where(flip, (y + shift) % train.info.num_classes, y)
    n_test = w.n_test if w.n_test is not None else len(test)
    return dict(info=train.info, train=(x, y), train_clean=(x, clean),
                fill=float(train.inputs.min()) if w.augment else 0.0,
                val=(train.inputs[n_all - w.n_val:].clone(), train.targets[n_all - w.n_val:].clone()),
                test=(test.inputs[:n_test].clone(), test.targets[:n_test].clone()))


def workload_sizes(w: Workload, data: dict) -> dict:
    n = int(data["train"][0].shape[0])
    per_epoch = steps_per_epoch(n, w.batch_size)
    sizes = dict(train=n, val=int(data["val"][0].shape[0]), test=int(data["test"][0].shape[0]),
                 steps_per_epoch=per_epoch, budget=per_epoch * w.epochs)
    if data["info"].kind == "text":
        sizes["chars_per_example"] = int(data["train"][0].shape[1])
    return sizes

