"""ImageNet ResNet-18/34/50 equal to torchvision's `resnet18/34/50` (ResNet v1.5).

7×7 stride-2 stem conv (64) + BN + ReLU + 3×3 stride-2 max-pool (padding 1), four stages of
BasicBlocks (18/34) or Bottlenecks (50) with the stride on the 3×3 conv (v1.5), a 1×1 conv + BN
`downsample` when the shape changes, global average pool, `fc` → classes.

Init as torchvision: convs Kaiming-normal fan-out (ReLU gain), BN 1/0, fc PyTorch default;
`zero_init_residual=False`.

Module names mirror torchvision's state_dict with `.<digit>` folded into the parent name:
`conv1, bn1, layer{1-4}_{i}/{conv1, bn1, conv2, bn2, [conv3, bn3], downsample_0 (conv),
downsample_1 (bn)}, fc`.

Parameter counts (1000 classes): resnet18 11,689,512; resnet34 21,797,672; resnet50 25,557,032.
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
    kaiming_normal_fan_out,
    linear,
    max_pool,
)


def _conv(features, k, *, in_features, stride=1, padding=0, dilation=1, dtype, name, **options):
    return conv2d(
        features,
        k,
        in_features=in_features,
        stride=stride,
        padding=padding,
        dilation=dilation,
        kernel_init=kaiming_normal_fan_out,
        dtype=dtype,
        name=name,
        **options,
    )


class BasicBlock(nn.Module):
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1
    dilation: int = 1  # of both 3x3 convs (torchvision has none; kd_jax's small DeepLabV3)
    expansion = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        inp = x.shape[-1]
        out = _conv(
            self.planes,
            3,
            in_features=inp,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            dtype=self.dtype,
            **conv_options(self),
            name="conv1",
        )(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = _conv(
            self.planes,
            3,
            in_features=self.planes,
            padding=self.dilation,
            dilation=self.dilation,
            dtype=self.dtype,
            **conv_options(self),
            name="conv2",
        )(out)
        out = batch_norm(train, dtype=self.dtype, name="bn2")(out)
        identity = x
        if self.stride != 1 or inp != self.planes:
            identity = _conv(
                self.planes,
                1,
                in_features=inp,
                stride=self.stride,
                dtype=self.dtype,
                **conv_options(self),
                name="downsample_0",
            )(x)
            identity = batch_norm(train, dtype=self.dtype, name="downsample_1")(identity)
        return nn.relu(out + identity)


class Bottleneck(nn.Module):
    planes: int
    stride: int = 1
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1
    dilation: int = 1  # of the 3x3 conv (torchvision's `replace_stride_with_dilation`)
    expansion = 4

    @nn.compact
    def __call__(self, x, train: bool = False):
        inp = x.shape[-1]
        width = self.planes  # base_width 64, groups 1
        outp = self.planes * self.expansion
        out = _conv(
            width, 1, in_features=inp, dtype=self.dtype, **conv_options(self), name="conv1"
        )(x)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(out))
        out = _conv(
            width,
            3,
            in_features=width,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            dtype=self.dtype,
            **conv_options(self),
            name="conv2",
        )(out)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(out))
        out = _conv(
            outp, 1, in_features=width, dtype=self.dtype, **conv_options(self), name="conv3"
        )(out)
        out = batch_norm(train, dtype=self.dtype, name="bn3")(out)
        identity = x
        if self.stride != 1 or inp != outp:
            identity = _conv(
                outp,
                1,
                in_features=inp,
                stride=self.stride,
                dtype=self.dtype,
                **conv_options(self),
                name="downsample_0",
            )(x)
            identity = batch_norm(train, dtype=self.dtype, name="downsample_1")(identity)
        return nn.relu(out + identity)


class ResNetImageNet(nn.Module):
    """Taps: `stem` (after max-pool), `stage1`..`stage4`, `pre_logits` [B, 512·expansion]."""

    layers: Sequence[int] = (2, 2, 2, 2)
    bottleneck: bool = False
    num_classes: int = 1000
    dtype: Any = jnp.float32
    widths: Sequence[int] = (64, 128, 256, 512)  # stage `planes`; the stem has widths[0]
    conv: str = "auto"  # convolution algorithm (kd_jax.models.cpu_conv)
    conv_groups: int = 1  # data-parallel shards of the batch
    # torchvision's `replace_stride_with_dilation` of layer2..4 (DeepLabV3's output stride 8:
    # (False, True, True); 16: (False, False, True)); `include_top=False` drops `fc` and returns
    # (stage4 map, taps) — the DeepLabV3 backbone.
    replace_stride_with_dilation: Sequence[bool] = (False, False, False)
    include_top: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        block = Bottleneck if self.bottleneck else BasicBlock
        feats = {}
        x = jnp.asarray(x, self.dtype)
        x = _conv(
            self.widths[0],
            7,
            in_features=x.shape[-1],
            stride=2,
            padding=3,
            dtype=self.dtype,
            **conv_options(self),
            name="conv1",
        )(x)
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        x = max_pool(x, 3, 2, padding=1)
        feats["stem"] = x
        dilate = (False, *self.replace_stride_with_dilation)
        dilation = 1
        for stage, (planes, n, stride) in enumerate(
            zip(self.widths, self.layers, (1, 2, 2, 2)), start=1
        ):
            previous = dilation  # torchvision's _make_layer: the first block keeps the old one
            if dilate[stage - 1]:
                dilation, stride = dilation * stride, 1
            for i in range(n):
                x = block(
                    planes,
                    stride if i == 0 else 1,
                    dtype=self.dtype,
                    **conv_options(self),
                    dilation=previous if i == 0 else dilation,
                    name=f"layer{stage}_{i}",
                )(x, train)
            feats[f"stage{stage}"] = x
        if not self.include_top:
            feats["pre_logits"] = global_avg_pool(x)
            return x, feats
        x = global_avg_pool(x)
        feats["pre_logits"] = x
        logits = linear(self.num_classes, in_features=x.shape[-1], dtype=self.dtype, name="fc")(x)
        return at_least_float32(logits), feats


def _resnet(layers, bottleneck, num_classes, dtype, kwargs) -> ResNetImageNet:
    # `layers=` / `widths=` in kwargs override the paper sizes (reduced test variants).
    kwargs.setdefault("layers", layers)
    return ResNetImageNet(bottleneck=bottleneck, num_classes=num_classes, dtype=dtype, **kwargs)


def resnet18(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs) -> ResNetImageNet:
    return _resnet((2, 2, 2, 2), False, num_classes, dtype, kwargs)


def resnet34(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs) -> ResNetImageNet:
    return _resnet((3, 4, 6, 3), False, num_classes, dtype, kwargs)


def resnet50(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs) -> ResNetImageNet:
    return _resnet((3, 4, 6, 3), True, num_classes, dtype, kwargs)
