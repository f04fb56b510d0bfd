"""The model zoo: Flax Linen classifiers by name.

    model = create_model("resnet18_cifar", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, *model_input_shape("resnet18_cifar"))))
    logits, features = model.apply(variables, x, train=False)
    (logits, features), updates = model.apply(variables, x, train=True, mutable=["batch_stats"])

Every model takes NHWC float images and returns `(logits, features)`: `logits` [B, C] float32
(segmentation models, `SEGMENTATION_MODELS`: [B, H, W, C] at the input's resolution),
`features` a dict of named taps — stage outputs (`stage1`, `stage2`, … NHWC; VGG counts from
`stage0`) and `pre_logits`, the pooled [B, D] vector the final linear layer consumes.

`dtype` is the compute dtype (e.g. `jnp.bfloat16`); parameters stay float32. `conv` chooses
the convolution algorithm (`kd_jax.models.cpu_conv`: chunked matmuls on XLA:CPU, XLA's own
convolution elsewhere). Parameter counts equal the reference PyTorch definitions (see each
module's docstring and `tests/test_models.py`).

Naming convention for PyTorch weight conversion: a Flax module path is the PyTorch state_dict key
with every `.<digit>` folded into the preceding name (`layer1.0.conv1.weight` →
`layer1_0/conv1/kernel`, `features.1.conv.0.0.weight` → `features_1/conv_0_0/kernel`), except
LeNet, whose names are DAFL's `conv1..3, fc1, fc2`. Leaves: conv/linear `weight` → `kernel`
(OIHW → HWIO, Linear weight.T), `bias` → `bias`, BN/LN `weight` → `scale`, BN `running_mean` /
`running_var` → `batch_stats` `mean` / `var`; `num_batches_tracked` has no counterpart.
`kd_jax.tools.convert_torch` implements this rule (PyTorch checkpoint → teacher workdir).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models import (
    cpu_conv,
    deeplabv3,
    generator,
    lenet,
    mobilenetv2,
    resnet_cifar,
    resnet_imagenet,
    vgg,
    vit,
    wrn,
)


class ModelSpec(NamedTuple):
    constructor: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # default (H, W, C) of the benchmark inputs
    description: str


_MNIST = (32, 32, 1)
_CIFAR = (32, 32, 3)
_IMAGENET = (224, 224, 3)
_NYUV2 = (256, 256, 3)  # DFAD's NYUv2 protocol
_SEGMNIST = (64, 64, 1)  # the offline segmentation benchmark (kd_jax.data.segmnist)

_REGISTRY: dict[str, ModelSpec] = {
    "lenet5": ModelSpec(lenet.lenet5, _MNIST, "DAFL LeNet-5 (MNIST resized to 32x32)"),
    "lenet5_half": ModelSpec(lenet.lenet5_half, _MNIST, "DAFL LeNet-5-half"),
    "resnet18_cifar": ModelSpec(
        resnet_cifar.resnet18_cifar, _CIFAR, "DAFL/CMI/Fast-Datafree CIFAR ResNet-18"
    ),
    "resnet34_cifar": ModelSpec(
        resnet_cifar.resnet34_cifar, _CIFAR, "DAFL/CMI/Fast-Datafree CIFAR ResNet-34"
    ),
    "wrn10_1": ModelSpec(
        wrn.wrn10_1, _MNIST, "WideResNet-10-1 (offline benchmark's ResNet teacher)"
    ),
    "wrn10_1_half": ModelSpec(
        wrn.wrn10_1_half, _MNIST, "WideResNet-10-1 at half width (its student)"
    ),
    "wrn16_1": ModelSpec(wrn.wrn16_1, _CIFAR, "WideResNet-16-1 (CMI/Fast-Datafree)"),
    "wrn16_2": ModelSpec(wrn.wrn16_2, _CIFAR, "WideResNet-16-2 (CMI/Fast-Datafree)"),
    "wrn40_1": ModelSpec(wrn.wrn40_1, _CIFAR, "WideResNet-40-1 (CMI/Fast-Datafree)"),
    "wrn40_2": ModelSpec(wrn.wrn40_2, _CIFAR, "WideResNet-40-2 (CMI/Fast-Datafree)"),
    "vgg8": ModelSpec(vgg.vgg8, _CIFAR, "CIFAR VGG-8 with BN (RepDistiller vgg8_bn)"),
    "vgg11": ModelSpec(vgg.vgg11, _CIFAR, "CIFAR VGG-11 with BN (RepDistiller vgg11_bn)"),
    "resnet18": ModelSpec(resnet_imagenet.resnet18, _IMAGENET, "torchvision ResNet-18"),
    "resnet34": ModelSpec(resnet_imagenet.resnet34, _IMAGENET, "torchvision ResNet-34"),
    "resnet50": ModelSpec(resnet_imagenet.resnet50, _IMAGENET, "torchvision ResNet-50 (v1.5)"),
    "mobilenet_v2": ModelSpec(mobilenetv2.mobilenet_v2, _IMAGENET, "torchvision MobileNetV2"),
    "vit_b16": ModelSpec(vit.vit_b16, _IMAGENET, "ViT-B/16 (timm / DINO layout)"),
    "vit_s16": ModelSpec(vit.vit_s16, _IMAGENET, "ViT-S/16 (timm / DINO layout)"),
    # Segmentation: logits [B, H, W, C]; `output_stride=8|16` as a keyword.
    "deeplabv3_resnet50": ModelSpec(
        deeplabv3.deeplabv3_resnet50, _NYUV2, "torchvision DeepLabV3-ResNet50 (no aux head)"
    ),
    "deeplabv3_mobilenetv2": ModelSpec(
        deeplabv3.deeplabv3_mobilenetv2, _NYUV2, "DFAD's DeepLabV3-MobileNetV2 (VainF)"
    ),
    "deeplabv3_resnet_small": ModelSpec(
        deeplabv3.deeplabv3_resnet_small, _SEGMNIST, "small DeepLabV3-ResNet (SegMNIST teacher)"
    ),
    "deeplabv3_mobilenetv2_small": ModelSpec(
        deeplabv3.deeplabv3_mobilenetv2_small,
        _SEGMNIST,
        "small DeepLabV3-MobileNetV2 (SegMNIST student)",
    ),
}

SEGMENTATION_MODELS = frozenset(n for n in _REGISTRY if n.startswith("deeplabv3"))


def list_models() -> list[str]:
    """Registered model names, sorted."""
    return sorted(_REGISTRY)


def _spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def create_model(
    name: str,
    num_classes: int,
    dtype: Any = jnp.float32,
    conv: str = "auto",
    conv_groups: int = 1,
    **kwargs,
) -> nn.Module:
    """Build the registered model `name` with `num_classes` outputs and compute `dtype`.

    `conv` (`config.model.conv`, one of `cpu_conv.CONV_CHOICES`) chooses the convolution
    algorithm; `conv_groups` is the number of data-parallel shards of a training batch (the mesh
    size), which the CPU convolutions chunk separately. Extra keyword arguments go to the model
    (e.g. `dropout_rate=` for WRN / MobileNetV2, `img_size=` for ViTs). Raises ValueError for an
    unknown name, listing the known ones, or an unknown `conv`.
    """
    spec = _spec(name)
    cpu_conv.check_conv(conv)
    return spec.constructor(
        num_classes=num_classes, dtype=dtype, conv=conv, conv_groups=int(conv_groups), **kwargs
    )


def model_input_shape(name: str) -> tuple[int, int, int]:
    """The default input (H, W, C) of model `name`: 32x32x1 LeNets, 32x32x3 CIFAR nets,
    224x224x3 ImageNet nets."""
    return _spec(name).input_shape


def model_description(name: str) -> str:
    return _spec(name).description


def create_generator(name: str, image_size: int, channels: int, latent_dim: int, **kwargs):
    """A registered image generator (`kd_jax.models.generator`, e.g. "dcgan")."""
    return generator.create_generator(name, image_size, channels, latent_dim, **kwargs)


def list_generators() -> list[str]:
    return generator.list_generators()


__all__ = [
    "SEGMENTATION_MODELS",
    "create_generator",
    "list_generators",
    "create_model",
    "list_models",
    "model_input_shape",
    "model_description",
    "ModelSpec",
]
