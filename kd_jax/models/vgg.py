"""CIFAR VGG-8 / VGG-11 with BatchNorm, as RepDistiller / CMI / Fast-Datafree define them
(`models/vgg.py`, `vgg8_bn` = cfg "S", `vgg11_bn` = cfg "A"; the DFKD repos register them as
`vgg8` / `vgg11`).

Five conv blocks (3×3 conv with bias, BN, ReLU each); max-pool 2 after blocks 0, 1, 2, and after
block 3 **only when the input is 64 px high** (so on 32×32 CIFAR block 4 runs at 4×4, as in the
reference); then global average pool and `classifier` 512 → classes.

    cfg S (vgg8):  [64] [128] [256]      [512]      [512]
    cfg A (vgg11): [64] [128] [256, 256] [512, 512] [512, 512]

Init as the reference: convs N(0, 2/(k²·out)) bias 0, BN 1/0, classifier N(0, 0.01²) bias 0.

Module names mirror the PyTorch `nn.Sequential` indices (conv, BN, ReLU per conv, the block's last
ReLU dropped): `block{b}_{3j}` is the j-th conv of block b, `block{b}_{3j+1}` its BN; so
`block2.3.weight` → `block2_3/kernel`, `block2.4.running_mean` → batch_stats `block2_4/mean`.

Parameter counts (10 classes): vgg8 3,918,858; vgg11 9,231,114.
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
    normal_init,
)

CFGS = {
    "S": ((64,), (128,), (256,), (512,), (512,)),
    "A": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "B": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    "D": ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    "E": ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


class VGG(nn.Module):
    """Taps: `stage0`..`stage4` (post-ReLU outputs of block0..block4, before their pool),
    `pre_logits` [B, 512]."""

    cfg: Sequence[Sequence[int]] = CFGS["A"]
    num_classes: int = 10
    dtype: Any = jnp.float32
    conv: str = "auto"  # convolution algorithm (kd_jax.models.cpu_conv)
    conv_groups: int = 1  # data-parallel shards of the batch

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = {}
        x = jnp.asarray(x, self.dtype)
        h = x.shape[1]
        for b, widths in enumerate(self.cfg):
            for j, w in enumerate(widths):
                x = conv2d(
                    w,
                    3,
                    in_features=x.shape[-1],
                    padding=1,
                    use_bias=True,
                    kernel_init=kaiming_normal_fan_out,
                    bias_init="zeros",
                    dtype=self.dtype,
                    **conv_options(self),
                    name=f"block{b}_{3 * j}",
                )(x)
                x = batch_norm(train, dtype=self.dtype, name=f"block{b}_{3 * j + 1}")(x)
                x = nn.relu(x)
            feats[f"stage{b}"] = x
            if b < 3 or (b == 3 and h == 64):
                x = max_pool(x, 2, 2)
        x = global_avg_pool(x)
        feats["pre_logits"] = x
        logits = linear(
            self.num_classes,
            in_features=x.shape[-1],
            kernel_init=normal_init(0.01),
            bias_init="zeros",
            dtype=self.dtype,
            name="classifier",
        )(x)
        return at_least_float32(logits), feats


def vgg8(num_classes: int = 10, dtype: Any = jnp.float32, **kwargs) -> VGG:
    """VGG-8 with BN (RepDistiller `vgg8_bn`, cfg "S"; `cfg=` overrides it)."""
    kwargs.setdefault("cfg", CFGS["S"])
    return VGG(num_classes=num_classes, dtype=dtype, **kwargs)


def vgg11(num_classes: int = 10, dtype: Any = jnp.float32, **kwargs) -> VGG:
    """VGG-11 with BN (RepDistiller `vgg11_bn`, cfg "A"; `cfg=` overrides it)."""
    kwargs.setdefault("cfg", CFGS["A"])
    return VGG(num_classes=num_classes, dtype=dtype, **kwargs)
