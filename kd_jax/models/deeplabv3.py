"""DeepLabV3 (ASPP with image pooling) on ResNet and MobileNetV2 backbones: DFAD's NYUv2 pair.

`deeplabv3_resnet50` equals torchvision's `deeplabv3_resnet50(aux_loss=False)`: a ResNet-50
without `fc`, layer3/4 dilated (output stride 8; 16 dilates layer4 only), and `DeepLabHead`:
ASPP(2048 → 256: a 1×1 branch, three 3×3 branches at rates (12, 24, 36), an image-pooling branch
of a 1×1 conv on the global average upsampled back; concatenated, 1×1 projection, dropout 0.5),
a 3×3 conv + BN + ReLU, and a 1×1 conv to the classes; logits upsampled bilinearly
(`align_corners=False`) to the input size. `deeplabv3_mobilenetv2` is DFAD's student
(VainF/DeepLabV3Plus-Pytorch `deeplabv3_mobilenet`): VainF's MobileNetV2 `features[:-1]` (stem
+ 17 inverted residuals, 320 ch; the last 1×1 conv to 1280 dropped) with strides turned into
dilations past the output stride, the same head with projection dropout 0.1. VainF's
MobileNetV2 pads unlike torchvision's (`VainFMobileNetV2`): its 3×3 stride-2 stem conv is
unpadded, and each inverted residual zero-pads its *input* by the depthwise dilation, then runs
its convs unpadded, so the expansion's 1×1 conv + BN + ReLU6 turns the padded border into
ReLU6(BN(0)); block widths are int(c·width_mult). `vainf_padding=False` gives torchvision's
padding instead (the SegMNIST variant). Output stride 16 uses ASPP rates (6, 12, 18) (both
references do). All convs are bias-free except the classifier; BN after every other conv.
Logits parity with both references (reduced widths): tests/test_convert_torch.py.

Parameter counts (`tests/test_models.py`), computed from the reference definitions:
deeplabv3_resnet50 39,638,869 at 21 classes (+ torchvision's aux FCNHead(1024) of 2,365,205 =
42,004,074, the count its weights table gives), 39,636,813 at 13; deeplabv3_mobilenetv2 5,113,877 at 21,
5,111,821 at 13.

Small variants for the offline SegMNIST benchmark (64×64×1, 11 classes; not references):
`deeplabv3_resnet_small` (BasicBlock ResNet (1, 1, 1, 1) × widths (16, 32, 64, 128), ASPP 64)
and `deeplabv3_mobilenetv2_small` (torchvision-padded MobileNetV2 width 0.5, one block per
stage, ASPP 32), both at output stride 8 with ASPP rates (2, 4, 6) (their 8×8 maps).

Module names follow torchvision's state_dict with `.<digit>` folded (the zoo's conversion
rule; `kd_jax.tools.convert_torch` renames VainF's `backbone.{low,high}_level_features` and
`classifier.classifier`): `backbone/...`, `classifier_0/convs_{0..3}_{0,1}`,
`classifier_0/convs_4_{1,2}` (pooling branch), `classifier_0/project_{0,1}`, `classifier_1`
(3×3), `classifier_2` (BN), `classifier_4` (1×1 to classes).

Taps: the backbone's (`stage1`.. ), `aspp` (after the projection), `head` (the 256-ch map the
classifier consumes) and `pre_logits` = `head` averaged over space [B, 256]. Logits are
[B, H, W, C] float32 at the input's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models import mobilenetv2, resnet_imagenet
from kd_jax.models.layers import (
    at_least_float32,
    batch_norm,
    conv2d,
    conv_options,
    global_avg_pool,
    kaiming_normal_fan_out,
)


def aspp_rates(output_stride: int) -> tuple[int, int, int]:
    """ASPP dilation rates of DeepLabV3 at an output stride (8 or 16)."""
    if output_stride not in (8, 16):
        raise ValueError(f"DeepLabV3 output_stride={output_stride}: use 8 or 16")
    return (12, 24, 36) if output_stride == 8 else (6, 12, 18)


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` on NHWC (no antialias)."""
    if x.shape[1:3] == tuple(size):
        return x
    return jax.image.resize(
        x, (x.shape[0], *size, x.shape[-1]), method="bilinear", antialias=False
    ).astype(x.dtype)


class ASPP(nn.Module):
    """torchvision's `ASPP(in_channels, atrous_rates, out_channels)`."""

    rates: Sequence[int]
    channels: int = 256
    dropout_rate: float = 0.5
    dtype: Any = jnp.float32
    kernel_init: Any = "torch"
    conv: str = "auto"
    conv_groups: int = 1

    def _conv(self, features, k, in_features, name, dilation=1):
        return conv2d(
            features,
            k,
            in_features=in_features,
            padding=dilation if k == 3 else 0,
            dilation=dilation,
            kernel_init=self.kernel_init,
            dtype=self.dtype,
            conv=self.conv,
            conv_groups=self.conv_groups,
            name=name,
        )

    @nn.compact
    def __call__(self, x, train: bool = False):
        inp, ch = x.shape[-1], self.channels

        def bn_relu(y, name):
            return nn.relu(batch_norm(train, dtype=self.dtype, name=name)(y))

        branches = [bn_relu(self._conv(ch, 1, inp, "convs_0_0")(x), "convs_0_1")]
        for i, rate in enumerate(self.rates, start=1):
            y = self._conv(ch, 3, inp, f"convs_{i}_0", dilation=rate)(x)
            branches.append(bn_relu(y, f"convs_{i}_1"))
        i = len(self.rates) + 1
        pooled = jnp.mean(x, axis=(1, 2), keepdims=True)  # AdaptiveAvgPool2d(1)
        pooled = bn_relu(self._conv(ch, 1, inp, f"convs_{i}_1")(pooled), f"convs_{i}_2")
        branches.append(jnp.broadcast_to(pooled, (*x.shape[:3], ch)))  # bilinear from 1×1
        y = jnp.concatenate(branches, axis=-1)
        y = bn_relu(self._conv(ch, 1, y.shape[-1], "project_0")(y), "project_1")
        if self.dropout_rate > 0:
            y = nn.Dropout(self.dropout_rate, deterministic=not train, name="project_3")(y)
        return y


class DeepLabV3(nn.Module):
    """`backbone` (a zoo classifier built with `include_top=False`) + ASPP head; see the module
    docstring. Training with dropout needs a `"dropout"` rng."""

    backbone: nn.Module
    output_stride: int = 8
    num_classes: int = 21
    aspp_channels: int = 256
    dropout_rate: float = 0.5
    head_kernel_init: Any = "torch"  # torchvision: PyTorch default; VainF: Kaiming normal
    rates: Sequence[int] | None = None  # ASPP rates; None: `aspp_rates(output_stride)`
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        size = x.shape[1:3]
        x = jnp.asarray(x, self.dtype)
        x, feats = self.backbone(x, train)
        feats = {k: v for k, v in feats.items() if k != "pre_logits"}
        ch = self.aspp_channels
        y = ASPP(
            tuple(self.rates or aspp_rates(self.output_stride)),
            ch,
            self.dropout_rate,
            dtype=self.dtype,
            kernel_init=self.head_kernel_init,
            conv=self.conv,
            conv_groups=self.conv_groups,
            name="classifier_0",
        )(x, train)
        feats["aspp"] = y
        y = conv2d(
            ch,
            3,
            in_features=ch,
            padding=1,
            kernel_init=self.head_kernel_init,
            dtype=self.dtype,
            conv=self.conv,
            conv_groups=self.conv_groups,
            name="classifier_1",
        )(y)
        y = nn.relu(batch_norm(train, dtype=self.dtype, name="classifier_2")(y))
        feats["head"] = y
        feats["pre_logits"] = global_avg_pool(y)
        y = conv2d(
            self.num_classes,
            1,
            in_features=ch,
            use_bias=True,
            kernel_init=self.head_kernel_init,
            dtype=self.dtype,
            conv=self.conv,
            conv_groups=self.conv_groups,
            name="classifier_4",
        )(y)
        return at_least_float32(resize_bilinear(y, size)), feats


_DILATE = {8: (False, True, True), 16: (False, False, True)}


def _resnet_backbone(output_stride, dtype, conv, conv_groups, **kwargs):
    aspp_rates(output_stride)
    return resnet_imagenet.ResNetImageNet(
        replace_stride_with_dilation=_DILATE[output_stride],
        include_top=False,
        dtype=dtype,
        conv=conv,
        conv_groups=conv_groups,
        **kwargs,
    )


class VainFInvertedResidual(nn.Module):
    """VainF's `InvertedResidual`: the block zero-pads its *input* by the depthwise conv's
    dilation and runs every conv unpadded, so the expansion's 1×1 conv + BN + ReLU6 also covers
    the border (which then holds ReLU6(BN(0)), not the zeros of torchvision's padding)."""

    out_planes: int
    stride: int
    expand_ratio: int
    dilation: int = 1
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    def _conv(self, features, k, in_features, name, stride=1, groups=1):
        return conv2d(
            features,
            k,
            in_features=in_features,
            stride=stride,
            groups=groups,
            dilation=self.dilation if k == 3 else 1,
            kernel_init=kaiming_normal_fan_out,
            dtype=self.dtype,
            name=name,
            **conv_options(self),
        )

    @nn.compact
    def __call__(self, x, train: bool = False):
        inp = x.shape[-1]
        hidden = int(round(inp * self.expand_ratio))
        d = self.dilation
        out = jnp.pad(x, ((0, 0), (d, d), (d, d), (0, 0)))  # fixed_padding(3, dilation)
        idx = 0
        if self.expand_ratio != 1:
            out = self._conv(hidden, 1, inp, "conv_0_0")(out)
            out = nn.relu6(batch_norm(train, dtype=self.dtype, name="conv_0_1")(out))
            idx = 1
        out = self._conv(hidden, 3, hidden, f"conv_{idx}_0", self.stride, hidden)(out)
        out = nn.relu6(batch_norm(train, dtype=self.dtype, name=f"conv_{idx}_1")(out))
        out = self._conv(self.out_planes, 1, hidden, f"conv_{idx + 1}")(out)
        out = batch_norm(train, dtype=self.dtype, name=f"conv_{idx + 2}")(out)
        return x + out if self.stride == 1 and inp == self.out_planes else out


class VainFMobileNetV2(nn.Module):
    """VainF's `mobilenet_v2(output_stride=...)` as its `deeplabv3_mobilenet` uses it:
    features[0:-1] (no 1×1 conv to 1280), an *unpadded* 3×3 stride-2 stem, `VainFInvertedResidual`
    blocks, block widths int(c·width_mult) (the stem's rounded to 8), strides past the output
    stride turned into dilations (a stage's first block keeps the previous dilation). Same
    variable names and taps as `mobilenetv2.MobileNetV2(include_top=False)`; returns
    (320-ch map, taps)."""

    width_mult: float = 1.0
    inverted_residual_setting: Any = mobilenetv2.INVERTED_RESIDUAL_SETTING
    output_stride: int = 8
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    @nn.compact
    def __call__(self, x, train: bool = False):
        feats = {}
        x = jnp.asarray(x, self.dtype)
        inp = mobilenetv2.make_divisible(32 * self.width_mult)
        x = conv2d(
            inp,
            3,
            in_features=x.shape[-1],
            stride=2,
            kernel_init=kaiming_normal_fan_out,
            dtype=self.dtype,
            name="features_0_0",
            **conv_options(self),
        )(x)
        x = nn.relu6(batch_norm(train, dtype=self.dtype, name="features_0_1")(x))
        plan = mobilenetv2.block_plan(self.inverted_residual_setting, self.output_stride)
        for idx, (t, c, stride, dilation, stage_end) in enumerate(plan, start=1):
            x = VainFInvertedResidual(
                int(c * self.width_mult),
                stride,
                t,
                dilation=dilation,
                dtype=self.dtype,
                **conv_options(self),
                name=f"features_{idx}",
            )(x, train)
            if stage_end and c in mobilenetv2.STAGE_TAPS:
                feats[f"stage{len(feats) + 1}"] = x
        feats["pre_logits"] = global_avg_pool(x)
        return x, feats


def _mobilenet_backbone(output_stride, dtype, conv, conv_groups, vainf=False, **kwargs):
    aspp_rates(output_stride)
    if vainf:
        return VainFMobileNetV2(
            output_stride=output_stride, dtype=dtype, conv=conv, conv_groups=conv_groups, **kwargs
        )
    return mobilenetv2.MobileNetV2(
        output_stride=output_stride,
        include_top=False,
        dropout_rate=0.0,
        dtype=dtype,
        conv=conv,
        conv_groups=conv_groups,
        **kwargs,
    )


def deeplabv3_resnet50(
    num_classes: int = 21,
    dtype: Any = jnp.float32,
    conv: str = "auto",
    conv_groups: int = 1,
    output_stride: int = 8,
    dropout_rate: float = 0.5,
    aspp_channels: int = 256,
    rates: Sequence[int] | None = None,
    **backbone,
) -> DeepLabV3:
    """torchvision's `deeplabv3_resnet50(aux_loss=False)`; `backbone` kwargs (`layers=`,
    `widths=`), `aspp_channels=` and `rates=` shrink it for tests (tests/test_convert_torch.py's
    reduced-width parity fixture)."""
    backbone.setdefault("layers", (3, 4, 6, 3))
    return DeepLabV3(
        _resnet_backbone(output_stride, dtype, conv, conv_groups, bottleneck=True, **backbone),
        output_stride=output_stride,
        num_classes=num_classes,
        aspp_channels=aspp_channels,
        rates=rates,
        dropout_rate=dropout_rate,
        dtype=dtype,
        conv=conv,
        conv_groups=conv_groups,
    )


def deeplabv3_mobilenetv2(
    num_classes: int = 21,
    dtype: Any = jnp.float32,
    conv: str = "auto",
    conv_groups: int = 1,
    output_stride: int = 8,
    dropout_rate: float = 0.1,
    aspp_channels: int = 256,
    rates: Sequence[int] | None = None,
    vainf_padding: bool = True,
    **backbone,
) -> DeepLabV3:
    """DFAD's student (VainF `deeplabv3_mobilenet`); `backbone` kwargs (`width_mult=`,
    `inverted_residual_setting=`) shrink the MobileNetV2. `vainf_padding=False` swaps VainF's
    backbone (`VainFMobileNetV2`: unpadded stem, blocks padding their input) for torchvision's
    `MobileNetV2` padding, same variables (the SegMNIST student)."""
    return DeepLabV3(
        _mobilenet_backbone(
            output_stride, dtype, conv, conv_groups, vainf=vainf_padding, **backbone
        ),
        output_stride=output_stride,
        num_classes=num_classes,
        aspp_channels=aspp_channels,
        dropout_rate=dropout_rate,
        head_kernel_init=kaiming_normal_fan_out,
        rates=rates,
        dtype=dtype,
        conv=conv,
        conv_groups=conv_groups,
    )


def deeplabv3_resnet_small(
    num_classes: int = 11, dtype: Any = jnp.float32, output_stride: int = 8, **kwargs
) -> DeepLabV3:
    """SegMNIST teacher: BasicBlock ResNet (1, 1, 1, 1) × (16, 32, 64, 128), ASPP 64."""
    conv, groups = kwargs.pop("conv", "auto"), kwargs.pop("conv_groups", 1)
    return DeepLabV3(
        _resnet_backbone(
            output_stride,
            dtype,
            conv,
            groups,
            layers=(1, 1, 1, 1),
            widths=(16, 32, 64, 128),
            bottleneck=False,
        ),
        output_stride=output_stride,
        num_classes=num_classes,
        aspp_channels=kwargs.pop("aspp_channels", 64),
        rates=kwargs.pop("rates", SMALL_RATES),
        dropout_rate=kwargs.pop("dropout_rate", 0.1),
        dtype=dtype,
        conv=conv,
        conv_groups=groups,
        **kwargs,
    )


SMALL_RATES = (2, 4, 6)  # 8x8 maps of 64 px inputs: (12, 24, 36) would see only the centre tap

SMALL_MOBILENET_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 1, 2),
    (6, 32, 1, 2),
    (6, 64, 1, 2),
    (6, 96, 1, 1),
    (6, 160, 1, 2),
    (6, 320, 1, 1),
)


def deeplabv3_mobilenetv2_small(
    num_classes: int = 11, dtype: Any = jnp.float32, output_stride: int = 8, **kwargs
) -> DeepLabV3:
    """SegMNIST student: MobileNetV2 width 0.5 with one block per stage, ASPP 32."""
    return deeplabv3_mobilenetv2(
        num_classes,
        dtype,
        conv=kwargs.pop("conv", "auto"),
        conv_groups=kwargs.pop("conv_groups", 1),
        output_stride=output_stride,
        aspp_channels=kwargs.pop("aspp_channels", 32),
        rates=kwargs.pop("rates", SMALL_RATES),
        vainf_padding=kwargs.pop("vainf_padding", False),
        width_mult=0.5,
        inverted_residual_setting=SMALL_MOBILENET_SETTING,
        **kwargs,
    )
