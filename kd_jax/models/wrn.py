"""Wide ResNets WRN-16-1, 16-2, 40-1, 40-2 of ZSKT / CMI / Fast-Datafree (`wresnet.py`).

Zagoruyko & Komodakis's pre-activation WRN as used by the DFKD benchmarks: 3×3 stem conv (16),
three groups of `n = (depth - 4) / 6` pre-activation BasicBlocks with 16k/32k/64k channels
(strides 1, 2, 2), final BN + ReLU, global average pool (8×8 on CIFAR), `fc` → classes.

A block is `bn1-relu-conv1(stride)-bn2-relu-[dropout]-conv2` added to the shortcut; when the
channel count changes the shortcut is a 1×1 `convShortcut` applied to the *pre-activated* input
relu(bn1(x)), otherwise it is the raw input (exactly the reference's `equalInOut` logic).

Init as the reference: convs N(0, 2/(k²·out)), BN 1/0, fc weight PyTorch default, fc bias 0.

Module names mirror the PyTorch state_dict (`block1.layer.0.bn1.weight` →
`block1/layer_0/bn1/scale`): `conv1, block{1-3}/layer_{i}/{bn1, conv1, bn2, conv2, convShortcut},
bn1, fc`.

Parameter counts (10 classes): WRN-16-1 175,066; WRN-16-2 691,674; WRN-40-1 563,930;
WRN-40-2 2,243,546; on 1-channel 32×32 input WRN-10-1 77,562 and WRN-10-1-half 19,714.
"""

from __future__ import annotations

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
)


class WRNBlock(nn.Module):
    out_planes: int
    stride: int = 1
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        in_planes = x.shape[-1]
        equal_in_out = in_planes == self.out_planes
        o = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        if not equal_in_out:
            x = o  # the reference's shortcut sees the pre-activated input
        out = conv2d(
            self.out_planes,
            3,
            in_features=in_planes,
            stride=self.stride,
            padding=1,
            kernel_init=kaiming_normal_fan_out,
            dtype=self.dtype,
            **conv_options(self),
            name="conv1",
        )(o)
        out = nn.relu(batch_norm(train, dtype=self.dtype, name="bn2")(out))
        if self.dropout_rate > 0:
            out = nn.Dropout(self.dropout_rate, deterministic=not train)(out)
        out = conv2d(
            self.out_planes,
            3,
            in_features=self.out_planes,
            padding=1,
            kernel_init=kaiming_normal_fan_out,
            dtype=self.dtype,
            **conv_options(self),
            name="conv2",
        )(out)
        if equal_in_out:
            shortcut = x
        else:
            shortcut = conv2d(
                self.out_planes,
                1,
                in_features=in_planes,
                stride=self.stride,
                kernel_init=kaiming_normal_fan_out,
                dtype=self.dtype,
                **conv_options(self),
                name="convShortcut",
            )(x)
        return shortcut + out


class NetworkBlock(nn.Module):
    """A group of `nb_layers` WRN blocks; children `layer_0 .. layer_{n-1}`."""

    nb_layers: int
    out_planes: int
    stride: int
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i in range(self.nb_layers):
            x = WRNBlock(
                self.out_planes,
                self.stride if i == 0 else 1,
                self.dropout_rate,
                dtype=self.dtype,
                **conv_options(self),
                name=f"layer_{i}",
            )(x, train)
        return x


class WideResNet(nn.Module):
    """Taps: `stage1`..`stage3` (group outputs, before the final BN-ReLU), `pre_logits` [B, 64k]."""

    depth: int = 40
    widen_factor: int = 2
    num_classes: int = 10
    dropout_rate: float = 0.0
    dtype: Any = jnp.float32
    base_width: int = 16  # stem width; groups have base·k, 2·base·k, 4·base·k channels
    conv: str = "auto"  # convolution algorithm (kd_jax.models.cpu_conv)
    conv_groups: int = 1  # data-parallel shards of the batch

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4, got {self.depth}")
        n = (self.depth - 4) // 6
        k = self.widen_factor
        feats = {}
        x = jnp.asarray(x, self.dtype)
        b = self.base_width
        x = conv2d(
            b,
            3,
            in_features=x.shape[-1],
            padding=1,
            kernel_init=kaiming_normal_fan_out,
            dtype=self.dtype,
            **conv_options(self),
            name="conv1",
        )(x)
        for g, (planes, stride) in enumerate(
            zip((b * k, 2 * b * k, 4 * b * k), (1, 2, 2)), start=1
        ):
            x = NetworkBlock(
                n,
                planes,
                stride,
                self.dropout_rate,
                dtype=self.dtype,
                **conv_options(self),
                name=f"block{g}",
            )(x, train)
            feats[f"stage{g}"] = x
        x = nn.relu(batch_norm(train, dtype=self.dtype, name="bn1")(x))
        x = global_avg_pool(x)
        feats["pre_logits"] = x
        logits = linear(
            self.num_classes,
            in_features=x.shape[-1],
            bias_init="zeros",
            dtype=self.dtype,
            name="fc",
        )(x)
        return at_least_float32(logits), feats


def _wrn(depth: int, widen: int, base_width: int = 16, suffix: str = ""):
    def make(
        num_classes: int = 10, dtype: Any = jnp.float32, dropout_rate: float = 0.0, **kwargs
    ) -> WideResNet:
        # `depth=` / `widen_factor=` / `base_width=` override the paper sizes (test variants).
        kwargs.setdefault("depth", depth)
        kwargs.setdefault("widen_factor", widen)
        kwargs.setdefault("base_width", base_width)
        return WideResNet(num_classes=num_classes, dropout_rate=dropout_rate, dtype=dtype, **kwargs)

    make.__name__ = f"wrn{depth}_{widen}{suffix}"
    make.__doc__ = f"WRN-{depth}-{widen}{suffix.replace('_', '-')} (stem width {base_width})."
    return make


# The offline benchmark's small ResNet pair (MNIST at 32×32×1 on 2 CPU cores): one block per
# group; the student halves every width, as LeNet-5-half does LeNet-5's.
wrn10_1 = _wrn(10, 1)
wrn10_1_half = _wrn(10, 1, base_width=8, suffix="_half")
wrn16_1 = _wrn(16, 1)
wrn16_2 = _wrn(16, 2)
wrn40_1 = _wrn(40, 1)
wrn40_2 = _wrn(40, 2)
