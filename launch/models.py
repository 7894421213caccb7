"""Models for training runs: MLP, small CNN, small ResNet, character-level transformer.

``build_model(name, info, **options)`` sizes a model from a ``data.DatasetInfo``. Image models
take inputs ``N x C x H x W`` and return ``N x classes``; the transformer takes ``N x T`` token
ids and returns ``N x T x vocab`` logits (next-character prediction, causal attention).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .data import DatasetInfo

__all__ = ["MODELS", "MLP", "SmallCNN", "SmallResNet", "CharTransformer", "build_model"]


class MLP(nn.Module):
    """Flatten, then ``len(hidden)`` ReLU layers and a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, ...] = (128, 64)
                 ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv-ReLU-maxpool stages, average pooling to ``spatial`` x ``spatial`` (1: global),
    two linear layers."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32,
                 spatial: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(spatial), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(2 * width * spatial ** 2, 4 * width), nn.ReLU(),
                                  nn.Linear(4 * width, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BatchNorm layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet with one BasicBlock per stage; stages after the first halve the resolution."""

    def __init__(self, in_channels: int, num_classes: int,
                 widths: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, stride=1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(cin, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


class CharTransformer(nn.Module):
    """A decoder-only (causal) transformer over characters, pre-norm, learned positions."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int = 128, n_heads: int = 4,
                 n_layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of n_heads ({n_heads})")
        self.seq_len = seq_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.position = nn.Parameter(torch.zeros(seq_len, d_model))
        nn.init.normal_(self.position, std=1.0 / math.sqrt(d_model))
        layer = nn.TransformerEncoderLayer(d_model, n_heads, dim_feedforward=4 * d_model,
                                           dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        # The nested-tensor fast path is for padding masks, which a causal LM never has.
        self.blocks = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)
        self.register_buffer("causal_mask", nn.Transformer.generate_square_subsequent_mask(
            seq_len), persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        if t > self.seq_len:
            raise ValueError(f"sequence length {t} exceeds the model's seq_len {self.seq_len}")
        h = self.embed(ids) + self.position[:t]
        h = self.blocks(h, mask=self.causal_mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


def _flat_features(info: DatasetInfo) -> int:
    return math.prod(info.input_shape)


def _need_image(name: str, info: DatasetInfo) -> None:
    if info.kind != "image":
        raise ValueError(f"model {name!r} needs an image dataset; {info.name!r} is {info.kind} "
                         f"(use --model transformer)")


def build_model(name: str, info: DatasetInfo, **options) -> nn.Module:
    """A fresh model ``name`` (one of ``MODELS``) sized for ``info``; options go to its class."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}")
    if name == "transformer":
        if info.kind != "text":
            raise ValueError(f"model 'transformer' needs a text dataset; {info.name!r} is "
                             f"{info.kind} (use --dataset shakespeare)")
        return CharTransformer(info.num_classes, info.input_shape[0], **options)
    _need_image(name, info)
    if name == "mlp":
        return MLP(_flat_features(info), info.num_classes, **options)
    return MODELS[name](info.input_shape[0], info.num_classes, **options)


MODELS = {"mlp": MLP, "cnn": SmallCNN, "resnet": SmallResNet, "transformer": CharTransformer}
