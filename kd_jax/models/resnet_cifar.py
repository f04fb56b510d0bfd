"""CIFAR ResNet-18/34 of DAFL / CMI / Fast-Datafree (`datafree/models/classifiers/resnet.py`).

3×3 stride-1 stem conv (64) + BN + ReLU, no max-pool, four stages of BasicBlocks with 64/128/256/512
channels (strides 1, 2, 2, 2), a 1×1 conv + BN shortcut when the shape changes, global average
pool, `linear` 512 → classes. The reference keeps PyTorch's default initialisation, and so does
this port.

Module names mirror the PyTorch state_dict with `.<digit>` folded into the parent name:
`conv1, bn1, layer{1-4}_{i}/{conv1, bn1, conv2, bn2, shortcut_0 (conv), shortcut_1 (bn)}, linear`.

Parameter counts (10 classes): ResNet-18 11,173,962; ResNet-34 21,282,122.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import (
    at_least_float32,
    batch_norm,
    conv2d,
    conv_options,
    global_avg_pool,
    linear,
)


class BasicBlock(nn.Module):
    """conv3×3(stride)-BN-ReLU-conv3×3-BN (+ shortcut) - ReLU; expansion 1."""

    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_planes = x.shape[-1]
        out = conv2d(
            self.planes,
            3,
            in_features=in_planes,
            stride=self.stride,
            padding=1,
            dtype=self.dtype,
            **conv_options(self),
            name="conv1",
        )(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = conv2d(
            self.planes,
            3,
            in_features=self.planes,
            padding=1,
            dtype=self.dtype,
            **conv_options(self),
            name="conv2",
        )(out)
        out = batch_norm(train, dtype=self.dtype, name="bn2")(out)
        shortcut = x
        if self.stride != 1 or in_planes != self.planes:
            shortcut = conv2d(
                self.planes,
                1,
                in_features=in_planes,
                stride=self.stride,
                dtype=self.dtype,
                **conv_options(self),
                name="shortcut_0",
            )(x)
            shortcut = batch_norm(train, dtype=self.dtype, name="shortcut_1")(shortcut)
        return nn.relu(out + shortcut)


class ResNetCifar(nn.Module):
    """Taps: `stage1`..`stage4` (block-stage outputs, NHWC), `pre_logits` [B, 512]."""

    num_blocks: Sequence[int] = (2, 2, 2, 2)
    num_classes: int = 10
    dtype: Any = jnp.float32
    widths: Sequence[int] = (64, 128, 256, 512)  # stage widths; the stem has widths[0]
    conv: str = "auto"  # convolution algorithm (kd_jax.models.cpu_conv)
    conv_groups: int = 1  # data-parallel shards of the batch

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = {}
        x = jnp.asarray(x, self.dtype)
        x = conv2d(
            self.widths[0],
            3,
            in_features=x.shape[-1],
            padding=1,
            dtype=self.dtype,
            **conv_options(self),
            name="conv1",
        )(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        for stage, (planes, n, stride) in enumerate(
            zip(self.widths, self.num_blocks, (1, 2, 2, 2)), start=1
        ):
            for i in range(n):
                x = BasicBlock(
                    planes,
                    stride if i == 0 else 1,
                    dtype=self.dtype,
                    **conv_options(self),
                    name=f"layer{stage}_{i}",
                )(x, train)
            feats[f"stage{stage}"] = x
        x = global_avg_pool(x)
        feats["pre_logits"] = x
        logits = linear(self.num_classes, in_features=x.shape[-1], dtype=self.dtype, name="linear")(
            x
        )
        return at_least_float32(logits), feats


def resnet18_cifar(num_classes: int = 10, dtype: Any = jnp.float32, **kwargs) -> ResNetCifar:
    """`num_blocks=` / `widths=` override (2, 2, 2, 2) / (64, 128, 256, 512)."""
    kwargs.setdefault("num_blocks", (2, 2, 2, 2))
    return ResNetCifar(num_classes=num_classes, dtype=dtype, **kwargs)


def resnet34_cifar(num_classes: int = 10, dtype: Any = jnp.float32, **kwargs) -> ResNetCifar:
    """`num_blocks=` / `widths=` override (3, 4, 6, 3) / (64, 128, 256, 512)."""
    kwargs.setdefault("num_blocks", (3, 4, 6, 3))
    return ResNetCifar(num_classes=num_classes, dtype=dtype, **kwargs)
