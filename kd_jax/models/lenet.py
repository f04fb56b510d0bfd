"""LeNet-5 and LeNet-5-half: DAFL's MNIST teacher/student pair.

Reference: huawei-noah/Efficient-Computing, Data-Efficient-Model-Compression/DAFL/lenet.py
(Chen et al., "Data-Free Learning of Student Networks", ICCV 2019). Input 32×32×1 (MNIST resized
to 32). PyTorch module names `conv1, conv2, conv3, fc1, fc2` are kept; PyTorch default init.

    conv1 1→c1 5×5, ReLU, maxpool 2 → conv2 c1→c2 5×5, ReLU, maxpool 2 → conv3 c2→c3 5×5, ReLU
    → flatten (1×1 spatial, so NCHW/NHWC flatten orders agree) → fc1 c3→f, ReLU → fc2 f→classes

LeNet-5: (6, 16, 120, 84), 61,706 params at 10 classes. LeNet-5-half: (3, 8, 60, 42), 15,738.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import at_least_float32, conv2d, conv_options, linear, max_pool


class LeNet5(nn.Module):
    """LeNet-5 with configurable widths `(conv1, conv2, conv3, fc1)`.

    Taps: `stage1` [B,14,14,c1], `stage2` [B,5,5,c2], `stage3` [B,1,1,c3] (all post-ReLU,
    post-pool where there is one), `pre_logits` [B, fc1] (post-ReLU fc1 output).
    """

    num_classes: int = 10
    widths: tuple[int, int, int, int] = (6, 16, 120, 84)
    dtype: Any = jnp.float32
    conv: str = "auto"  # convolution algorithm (kd_jax.models.cpu_conv)
    conv_groups: int = 1  # data-parallel shards of the batch

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BatchNorm or dropout
        c1, c2, c3, f1 = self.widths
        feats = {}
        x = jnp.asarray(x, self.dtype)
        x = conv2d(
            c1,
            5,
            in_features=x.shape[-1],
            use_bias=True,
            dtype=self.dtype,
            **conv_options(self),
            name="conv1",
        )(x)
        x = max_pool(nn.relu(x), 2, 2)
        feats["stage1"] = x
        x = conv2d(
            c2,
            5,
            in_features=c1,
            use_bias=True,
            dtype=self.dtype,
            **conv_options(self),
            name="conv2",
        )(x)
        x = max_pool(nn.relu(x), 2, 2)
        feats["stage2"] = x
        x = conv2d(
            c3,
            5,
            in_features=c2,
            use_bias=True,
            dtype=self.dtype,
            **conv_options(self),
            name="conv3",
        )(x)
        x = nn.relu(x)
        if x.shape[1:3] != (1, 1):
            raise ValueError(
                f"LeNet5 expects 32x32 inputs (conv3 output must be 1x1, got {x.shape[1:3]} "
                f"from an input of that size); resize MNIST's 28x28 to 32x32 as DAFL does"
            )
        feats["stage3"] = x
        x = x.reshape(x.shape[0], -1)
        x = linear(f1, in_features=c3, dtype=self.dtype, name="fc1")(x)
        x = nn.relu(x)
        feats["pre_logits"] = x
        logits = linear(self.num_classes, in_features=f1, dtype=self.dtype, name="fc2")(x)
        return at_least_float32(logits), feats


def lenet5(num_classes: int = 10, dtype: Any = jnp.float32, **kwargs) -> LeNet5:
    """LeNet-5; `widths=` overrides (6, 16, 120, 84) (reduced test variants)."""
    kwargs.setdefault("widths", (6, 16, 120, 84))
    return LeNet5(num_classes=num_classes, dtype=dtype, **kwargs)


def lenet5_half(num_classes: int = 10, dtype: Any = jnp.float32, **kwargs) -> LeNet5:
    """LeNet-5-half; `widths=` overrides (3, 8, 60, 42)."""
    kwargs.setdefault("widths", (3, 8, 60, 42))
    return LeNet5(num_classes=num_classes, dtype=dtype, **kwargs)
