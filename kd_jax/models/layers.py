"""Building blocks shared by the model zoo: PyTorch-equivalent convolutions, linears, BatchNorm.

Conventions every model in `kd_jax.models` follows (a PyTorch converter relies on them):

- Activations are NHWC. Convolution kernels are HWIO (PyTorch OIHW → `w.transpose(2, 3, 1, 0)`),
  depthwise kernels are (kh, kw, 1, C) (PyTorch (C, 1, kh, kw), same transpose). Dense kernels are
  (in, out) (PyTorch `weight.T`).
- Padding is always explicit and symmetric, `((p, p), (p, p))`, exactly as PyTorch's `padding=p`,
  never Flax's "SAME" (which pads strided convolutions asymmetrically).
- BatchNorm mirrors `nn.BatchNorm2d` defaults: momentum 0.1 in PyTorch's sense (Flax 0.9),
  epsilon 1e-5, `scale`/`bias` params and `mean`/`var` in `batch_stats`. No `axis_name`: under
  `jax.jit` over a sharded batch the statistics are those of the global batch.
- Parameters are float32; `dtype` is the compute dtype.
- Every model has `conv` / `conv_groups` fields (the convolution algorithm of `cpu_conv` and
  the batch's data-parallel shards), handed to its blocks and `conv2d` layers by `conv_options`.
- Initializers reproduce the reference PyTorch definitions (PyTorch's default
  `kaiming_uniform_(a=sqrt(5))` where the reference keeps the default, Kaiming-normal fan-out where
  the reference re-initialises, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models import cpu_conv

Dtype = Any
Initializer = Callable[..., jax.Array]

# --------------------------------------------------------------------------------------------
# Initializers
# --------------------------------------------------------------------------------------------

# PyTorch's default for nn.Conv2d / nn.Linear weights: kaiming_uniform_(a=sqrt(5)), i.e.
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)). variance_scaling(1/3, fan_in, uniform) has the same bound.
torch_default_kernel_init: Initializer = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform"
)

# kaiming_normal_(mode="fan_out", nonlinearity="relu"): N(0, 2 / fan_out), untruncated.
# Also RepDistiller/WRN's `normal_(0, sqrt(2 / (k * k * out_channels)))`.
kaiming_normal_fan_out: Initializer = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def at_least_float32(x: jax.Array) -> jax.Array:
    """`x` upcast to float32 if narrower (bfloat16 logits, softmax inputs); float64 (the
    invariance tests' precision) is kept."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def torch_default_bias_init(fan_in: int) -> Initializer:
    """PyTorch's default bias init for Conv2d / Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def normal_init(stddev: float) -> Initializer:
    """Untruncated N(0, stddev²), as `tensor.normal_(0, stddev)`."""
    return nn.initializers.normal(stddev)


# --------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------


def _resolve_inits(kernel_init, bias_init, fan_in: int):
    """Named initializers ("torch", "zeros") -> callables; the torch bias bound needs fan_in."""
    if isinstance(kernel_init, str):
        if kernel_init != "torch":
            raise ValueError(f"unknown kernel_init {kernel_init!r}")
        kernel_init = torch_default_kernel_init
    if isinstance(bias_init, str):
        if bias_init == "torch":
            bias_init = torch_default_bias_init(fan_in)
        elif bias_init == "zeros":
            bias_init = nn.initializers.zeros
        else:
            raise ValueError(f"unknown bias_init {bias_init!r}")
    return kernel_init, bias_init


def conv_options(module: nn.Module) -> dict:
    """The `conv` / `conv_groups` fields of a model module, for its conv layers and blocks."""
    return {"conv": module.conv, "conv_groups": module.conv_groups}


def conv2d(
    features: int,
    kernel_size: int,
    *,
    in_features: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    dilation: int = 1,
    use_bias: bool = False,
    kernel_init: Initializer | str = "torch",
    bias_init: Initializer | str = "torch",
    dtype: Dtype = jnp.float32,
    conv: str = "auto",
    conv_groups: int = 1,
    name: str | None = None,
) -> nn.Conv:
    """An `nn.Conv` equal to `torch.nn.Conv2d(in, features, k, stride, padding, dilation,
    groups)`.

    `kernel_init`/`bias_init` = "torch" gives PyTorch's default initialisation (which needs
    `in_features` for the bias bound); pass an initializer to override. `conv` / `conv_groups`
    choose the convolution algorithm and the batch's data-parallel shards (`cpu_conv`).
    """
    fan_in = (in_features // groups) * kernel_size * kernel_size
    kernel_init, bias_init = _resolve_inits(kernel_init, bias_init, fan_in)
    return nn.Conv(
        features=features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        kernel_dilation=(dilation, dilation),
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=cpu_conv.conv_function(conv, conv_groups),
        name=name,
    )


def linear(
    features: int,
    *,
    in_features: int,
    use_bias: bool = True,
    kernel_init: Initializer | str = "torch",
    bias_init: Initializer | str = "torch",
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Dense:
    """An `nn.Dense` equal to `torch.nn.Linear(in_features, features)` (kernel = weight.T)."""
    kernel_init, bias_init = _resolve_inits(kernel_init, bias_init, in_features)
    return nn.Dense(
        features=features,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


BN_MOMENTUM = 0.9  # Flax's: running = 0.9·running + 0.1·batch (PyTorch's momentum 0.1)


def batch_norm(train: bool, *, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """`torch.nn.BatchNorm2d` defaults (momentum 0.1 → Flax 0.9, eps 1e-5, weight 1, bias 0)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def max_pool(x: jax.Array, kernel: int, stride: int, padding: int = 0) -> jax.Array:
    """`torch.nn.MaxPool2d(kernel, stride, padding)` on NHWC (padding acts as -inf)."""
    return nn.max_pool(
        x,
        window_shape=(kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
    )


def global_avg_pool(x: jax.Array) -> jax.Array:
    """`adaptive_avg_pool2d(x, 1).flatten(1)` on NHWC: [B, H, W, C] → [B, C]."""
    return jnp.mean(x, axis=(1, 2))
