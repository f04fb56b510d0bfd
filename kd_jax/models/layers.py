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
- Initializers reproduce the reference PyTorch definitions (PyTorch's default
  `kaiming_uniform_(a=sqrt(5))` where the reference keeps the default, Kaiming-normal fan-out where
  the reference re-initialises, ...).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

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
# Convolution with a matmul weight-gradient (XLA:CPU)
# --------------------------------------------------------------------------------------------
# XLA:CPU computes a convolution's *weight* gradient (the batch-and-space reduction) far slower
# than its forward pass or input gradient: ~1.8 s of a 1.8 s backward for a 64->64 3x3 conv on
# 32x32x64 at batch 64 on 2 cores. The same gradient as one matmul of the im2col patches with
# the output gradient is 3-4x faster there (benchmarks/conv_grad.py, per layer shape).
# `conv_general_dilated` below keeps XLA's forward and input gradient and swaps in the matmul
# weight gradient on the CPU for layers big enough to profit (measured: a win from
# H_out*W_out*C_in >= 16,384, a loss below). GPU/TPU keep XLA's convolution untouched.
# KD_JAX_CONV_GRAD=native|matmul|auto (default auto) overrides the choice, for benchmarking.
_MATMUL_GRAD_MIN_WORK = 16_384
_NHWC = ("NHWC", "HWIO", "NHWC")


def _native_conv(x, w, strides, padding, precision):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                        precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_matmul_grad(x, w, strides, padding, precision):
    return _native_conv(x, w, strides, padding, precision)


def _conv_matmul_grad_fwd(x, w, strides, padding, precision):
    return _native_conv(x, w, strides, padding, precision), (x, w)


def _conv_matmul_grad_bwd(strides, padding, precision, residuals, g):
    x, w = residuals
    kh, kw, c, o = w.shape
    (sh, sw), (b, ho, wo, _) = strides, g.shape
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    # im2col: column (i, j, c) of a patch row is xp[n, i + sh*y, j + sw*x, c] (HWIO order).
    cols = [jax.lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                          (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
    patches = (cols[0] if len(cols) == 1 else jnp.concatenate(cols, -1)).reshape(-1, kh * kw * c)
    dw = jnp.dot(patches.T, g.reshape(-1, o), precision=precision).reshape(w.shape)
    _, input_vjp = jax.vjp(lambda x: _native_conv(x, w, strides, padding, precision), x)
    return input_vjp(g)[0], dw.astype(w.dtype)


_conv_matmul_grad.defvjp(_conv_matmul_grad_fwd, _conv_matmul_grad_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
    """`jax.lax.conv_general_dilated` (what `nn.Conv` calls) with the matmul weight gradient
    where it is faster (see above); identical forward, gradients equal up to float rounding."""
    native = functools.partial(
        jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation,
        rhs_dilation, dimension_numbers, feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    mode = os.environ.get("KD_JAX_CONV_GRAD", "auto")
    if mode not in ("auto", "native", "matmul"):
        raise ValueError(f"KD_JAX_CONV_GRAD={mode!r}: expected auto, native or matmul")
    plain = (feature_group_count == 1 and preferred_element_type is None
             and not isinstance(padding, str) and lhs.ndim == 4
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not plain or mode == "native":
        return native()
    if mode == "auto":
        if jax.default_backend() != "cpu":
            return native()
        out_hw = [(n + sum(p) - k) // s + 1 for n, p, k, s in
                  zip(lhs.shape[1:3], padding, rhs.shape[:2], window_strides)]
        if out_hw[0] * out_hw[1] * lhs.shape[-1] < _MATMUL_GRAD_MIN_WORK:
            return native()
    return _conv_matmul_grad(lhs, rhs, tuple(window_strides),
                             tuple(tuple(p) for p in padding), precision)


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


def conv2d(
    features: int,
    kernel_size: int,
    *,
    in_features: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    use_bias: bool = False,
    kernel_init: Initializer | str = "torch",
    bias_init: Initializer | str = "torch",
    dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> nn.Conv:
    """An `nn.Conv` equal to `torch.nn.Conv2d(in, features, k, stride, padding, groups=groups)`.

    `kernel_init`/`bias_init` = "torch" gives PyTorch's default initialisation (which needs
    `in_features` for the bias bound); pass an initializer to override.
    """
    fan_in = (in_features // groups) * kernel_size * kernel_size
    kernel_init, bias_init = _resolve_inits(kernel_init, bias_init, fan_in)
    return nn.Conv(
        features=features,
        kernel_size=(kernel_size, kernel_size),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        feature_group_count=groups,
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=bias_init,
        dtype=dtype,
        param_dtype=jnp.float32,
        conv_general_dilated=conv_general_dilated,
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


def batch_norm(train: bool, *, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.BatchNorm:
    """`torch.nn.BatchNorm2d` defaults (momentum 0.1 → Flax 0.9, eps 1e-5, weight 1, bias 0)."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=0.9,
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
