"""MobileNetV2 equal to torchvision's `mobilenet_v2` (width 1.0, round_nearest 8).

Stem 3×3 stride-2 conv (32) + BN + ReLU6, 17 inverted-residual blocks (t, c, n, s) =
(1,16,1,1) (6,24,2,2) (6,32,3,2) (6,64,4,2) (6,96,3,1) (6,160,3,2) (6,320,1,1), a 1×1 conv to
1280 + BN + ReLU6, global average pool, dropout 0.2 (`classifier_0`), `classifier_1` → classes.

Init as torchvision: convs Kaiming-normal fan-out, BN 1/0, classifier N(0, 0.01²) bias 0.

Module names mirror torchvision's state_dict with `.<digit>` folded into the parent name:
`features_0_0` (stem conv) / `features_0_1` (BN); blocks `features_{1..17}/conv_*`, where a block
with expansion 1 has `conv_0_0` (dw conv), `conv_0_1` (BN), `conv_1` (pw-linear conv), `conv_2`
(BN) and a block with expansion 6 has `conv_0_0`/`conv_0_1` (pw expand), `conv_1_0`/`conv_1_1`
(dw), `conv_2` (pw-linear), `conv_3` (BN); `features_18_0`/`features_18_1`; `classifier_1`.

Training with `dropout_rate > 0` needs a `"dropout"` rng: `apply(..., rngs={"dropout": key})`.

Parameter count (1000 classes): 3,504,872.
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
    normal_init,
)

INVERTED_RESIDUAL_SETTING = (
    # t, c, n, s
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)

# stages whose last block is a named tap (stage1..4: strides 4, 8, 16 and the 96-ch stage)
STAGE_TAPS = (16, 24, 32, 96)


def block_plan(setting, output_stride):
    """Per inverted residual of `setting` ((t, c, n, s) stages): (t, c, stride, dilation,
    last block of its stage). Strides past `output_stride` (the stem's 2 counted) become
    dilations; a stage's first block keeps the previous dilation, as torchvision / VainF do."""
    current_stride, dilation = 2, 1
    for t, c, n, s in setting:
        previous = dilation
        if current_stride == output_stride:
            stride, dilation = 1, dilation * s
        else:
            stride, current_stride = s, current_stride * s
        for i in range(n):
            yield t, c, (stride if i == 0 else 1), (previous if i == 0 else dilation), i == n - 1


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """torchvision's `_make_divisible`: round to a multiple of `divisor`, never down by >10%."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv(features, k, *, in_features, stride=1, groups=1, dilation=1, dtype, name, **options):
    return conv2d(
        features,
        k,
        in_features=in_features,
        stride=stride,
        padding=(k - 1) // 2 * dilation,
        groups=groups,
        dilation=dilation,
        kernel_init=kaiming_normal_fan_out,
        dtype=dtype,
        name=name,
        **options,
    )


class InvertedResidual(nn.Module):
    out_planes: int
    stride: int
    expand_ratio: int
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1
    dilation: int = 1  # of the depthwise conv (padding = dilation: DeepLabV3's output stride)

    @nn.compact
    def __call__(self, x, train: bool = False):
        inp = x.shape[-1]
        hidden = int(round(inp * self.expand_ratio))
        use_res = self.stride == 1 and inp == self.out_planes
        out = x
        idx = 0
        if self.expand_ratio != 1:
            out = _conv(
                hidden, 1, in_features=inp, dtype=self.dtype, **conv_options(self), name="conv_0_0"
            )(out)
            out = nn.relu6(batch_norm(train, dtype=self.dtype, name="conv_0_1")(out))
            idx = 1
        out = _conv(
            hidden,
            3,
            in_features=hidden,
            stride=self.stride,
            groups=hidden,
            dilation=self.dilation,
            dtype=self.dtype,
            **conv_options(self),
            name=f"conv_{idx}_0",
        )(out)
        out = nn.relu6(batch_norm(train, dtype=self.dtype, name=f"conv_{idx}_1")(out))
        out = _conv(
            self.out_planes,
            1,
            in_features=hidden,
            dtype=self.dtype,
            **conv_options(self),
            name=f"conv_{idx + 1}",
        )(out)
        out = batch_norm(train, dtype=self.dtype, name=f"conv_{idx + 2}")(out)
        return x + out if use_res else out


class MobileNetV2(nn.Module):
    """Taps: `stage1` [B,H/2,W/2,16], `stage2` (/4, 24), `stage3` (/8, 32), `stage4` (/16, 96),
    `stage5` (/32, 1280, after the last 1×1 conv), `pre_logits` [B, 1280]."""

    num_classes: int = 1000
    width_mult: float = 1.0
    dropout_rate: float = 0.2
    dtype: Any = jnp.float32
    # torchvision's `inverted_residual_setting` (t, c, n, s) and an optional `last_channel`
    # override of 1280·max(1, width_mult): reduced variants for tests.
    inverted_residual_setting: Any = INVERTED_RESIDUAL_SETTING
    last_channel: int | None = None
    conv: str = "auto"  # convolution algorithm (kd_jax.models.cpu_conv)
    conv_groups: int = 1  # data-parallel shards of the batch
    # DeepLabV3 backbone (VainF/DFAD's `mobilenet_v2(output_stride=...)`): once the stride
    # reaches `output_stride`, later strides become dilations (a stage's first block keeps the
    # previous dilation); `include_top=False` stops after the last inverted residual (320 ch),
    # without `features_18` and the classifier, and returns (that map, taps).
    output_stride: int = 32
    include_top: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = {}
        x = jnp.asarray(x, self.dtype)
        inp = make_divisible(32 * self.width_mult)
        last = self.last_channel or make_divisible(1280 * max(1.0, self.width_mult))
        x = _conv(
            inp,
            3,
            in_features=x.shape[-1],
            stride=2,
            dtype=self.dtype,
            **conv_options(self),
            name="features_0_0",
        )(x)
        x = nn.relu6(batch_norm(train, dtype=self.dtype, name="features_0_1")(x))
        plan = block_plan(self.inverted_residual_setting, self.output_stride)
        for idx, (t, c, stride, dilation, stage_end) in enumerate(plan, start=1):
            x = InvertedResidual(
                make_divisible(c * self.width_mult),
                stride,
                t,
                dtype=self.dtype,
                **conv_options(self),
                dilation=dilation,
                name=f"features_{idx}",
            )(x, train)
            if stage_end and c in STAGE_TAPS:
                feats[f"stage{len(feats) + 1}"] = x
        idx += 1  # the 1x1 conv after the last block
        if not self.include_top:
            feats["pre_logits"] = global_avg_pool(x)
            return x, feats
        x = _conv(
            last,
            1,
            in_features=x.shape[-1],
            dtype=self.dtype,
            **conv_options(self),
            name=f"features_{idx}_0",
        )(x)
        x = nn.relu6(batch_norm(train, dtype=self.dtype, name=f"features_{idx}_1")(x))
        feats["stage5"] = x
        x = global_avg_pool(x)
        feats["pre_logits"] = x
        if self.dropout_rate > 0:
            x = nn.Dropout(self.dropout_rate, deterministic=not train, name="classifier_0")(x)
        logits = linear(
            self.num_classes,
            in_features=last,
            kernel_init=normal_init(0.01),
            bias_init="zeros",
            dtype=self.dtype,
            name="classifier_1",
        )(x)
        return at_least_float32(logits), feats


def mobilenet_v2(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs) -> MobileNetV2:
    return MobileNetV2(num_classes=num_classes, dtype=dtype, **kwargs)
