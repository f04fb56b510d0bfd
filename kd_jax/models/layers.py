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
# Convolution on XLA:CPU as chunked im2col matmuls
# --------------------------------------------------------------------------------------------
# XLA:CPU's convolutions trail PyTorch's oneDNN, worst in training: forward + input and weight
# gradient of a 64->64 3x3 conv on 32x32x64 at batch 64 take 2.1 s on 2 cores (nearly all of it
# the weight gradient), PyTorch 0.18 s. A convolution is a matmul of its im2col patches with the
# kernel, but the patches are kh*kw times the input (150 MB there) and this machine moves memory
# at a few GB/s, so materialising them costs more than the matmul. Done a few images at a time
# (a `lax.scan` over the batch) the patches of one chunk stay in the L3 cache: the same layer
# trains in 0.28 s, its forward 82 -> 69 ms. `python benchmarks/conv_layers.py` prints the table
# for every layer shape of the benchmark models (README, "Performance").
# `conv_general_dilated` below therefore runs, on the CPU, every plain convolution's backward
# pass (input and weight gradient) and the forward of deep enough layers (kh*kw*C_in >= 256;
# shallower ones stay faster in XLA) as chunked im2col matmuls. GPU/TPU keep XLA's convolution.
# KD_JAX_CONV=auto|native|im2col (default auto) overrides the choice, for benchmarks and tests.
_NHWC = ("NHWC", "HWIO", "NHWC")
_CHUNK_BYTES = 4 << 20           # patches per chunk (2 and 8 MiB measured no better)
_MIN_CHUNK_ROWS = 512            # output pixels per matmul, so a big kernel is read rarely
_IM2COL_FORWARD_MIN_DEPTH = 256  # kh*kw*C_in from which the chunked forward beats XLA's


def _native_conv(x, w, strides, padding, precision):
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC,
                                        precision=precision)


def _out_hw(x_shape, w_shape, strides, padding):
    return tuple((n + sum(p) - k) // s + 1
                 for n, p, k, s in zip(x_shape[1:3], padding, w_shape[:2], strides))


def _patches(x, kernel_hw, strides, padding, out_hw):
    """(B, H, W, C) -> (B*H_out*W_out, kh*kw*C) im2col rows, columns in HWIO order (i, j, c)."""
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    b, c = x.shape[0], x.shape[-1]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    cols = [jax.lax.slice(xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c),
                          (1, sh, sw, 1)) for i in range(kh) for j in range(kw)]
    return (cols[0] if len(cols) == 1 else jnp.concatenate(cols, -1)).reshape(-1, kh * kw * c)


def _chunking(batch, out_hw, depth, itemsize):
    """(groups, n): the batch is cut into `groups` contiguous blocks (one per device, so a batch
    sharded over the devices is chunked where it lies) of chunks of n images."""
    groups = jax.device_count()
    if batch % groups:
        groups = 1
    rows = out_hw[0] * out_hw[1]
    n = max(_CHUNK_BYTES // (rows * depth * itemsize), -(-_MIN_CHUNK_ROWS // rows), 1)
    n = min(n, batch // groups)
    while (batch // groups) % n:
        n -= 1
    return groups, n


def _to_chunks(a, groups, n):  # (B, ...) -> (steps, groups, n, ...)
    return jnp.moveaxis(a.reshape(groups, a.shape[0] // (groups * n), n, *a.shape[1:]), 1, 0)


def _from_chunks(a):  # (steps, groups, n, ...) -> (B, ...)
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(-1, *a.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_im2col(x, w, strides, padding, precision, im2col_forward):
    if not im2col_forward:
        return _native_conv(x, w, strides, padding, precision)
    out_hw = _out_hw(x.shape, w.shape, strides, padding)
    groups, n = _chunking(x.shape[0], out_hw, w.shape[0] * w.shape[1] * w.shape[2],
                          x.dtype.itemsize)
    w_mat = w.reshape(-1, w.shape[-1])

    def chunk(xc):
        rows = _patches(xc.reshape(-1, *x.shape[1:]), w.shape[:2], strides, padding, out_hw)
        y = jnp.dot(rows, w_mat, precision=precision)
        return y.reshape(groups, n, *out_hw, w.shape[-1])

    return _from_chunks(jax.lax.map(chunk, _to_chunks(x, groups, n)))


def _conv_im2col_fwd(x, w, strides, padding, precision, im2col_forward):
    return _conv_im2col(x, w, strides, padding, precision, im2col_forward), (x, w)


def _conv_im2col_bwd(strides, padding, precision, im2col_forward, residuals, g):
    del im2col_forward  # both forwards have this backward
    x, w = residuals
    out_hw, depth = g.shape[1:3], w.shape[0] * w.shape[1] * w.shape[2]
    groups, n = _chunking(x.shape[0], out_hw, depth, x.dtype.itemsize)
    w_mat = w.reshape(depth, -1)

    def chunk(dw, xg):
        xc, gc = xg
        rows, rows_vjp = jax.vjp(
            lambda xc: _patches(xc.reshape(-1, *x.shape[1:]), w.shape[:2], strides, padding,
                                out_hw), xc)
        g_rows = gc.reshape(-1, w.shape[-1])
        # dW per device block (summed once at the end, not once per chunk across devices)
        dw = dw + jnp.einsum("gmk,gmo->gko", rows.reshape(groups, -1, depth),
                             g_rows.reshape(groups, -1, w.shape[-1]), precision=precision,
                             preferred_element_type=jnp.float32)
        dx = rows_vjp(jnp.dot(g_rows, w_mat.T, precision=precision).astype(rows.dtype))[0]
        return dw, dx

    dw0 = jnp.zeros((groups, depth, w.shape[-1]), jnp.float32)
    dw, dx = jax.lax.scan(chunk, dw0, (_to_chunks(x, groups, n), _to_chunks(g, groups, n)))
    return _from_chunks(dx).astype(x.dtype), dw.sum(0).reshape(w.shape).astype(w.dtype)


_conv_im2col.defvjp(_conv_im2col_fwd, _conv_im2col_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
    """`jax.lax.conv_general_dilated` (what `nn.Conv` calls), computed as chunked im2col matmuls
    on the CPU where that is faster (see above); the same convolution up to float rounding."""
    native = functools.partial(
        jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation,
        rhs_dilation, dimension_numbers, feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    mode = os.environ.get("KD_JAX_CONV", "auto")
    if mode not in ("auto", "native", "im2col"):
        raise ValueError(f"KD_JAX_CONV={mode!r}: expected auto, native or im2col")
    plain = (feature_group_count == 1 and preferred_element_type is None
             and not isinstance(padding, str) and lhs.ndim == 4
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not plain or mode == "native" or (mode == "auto" and jax.default_backend() != "cpu"):
        return native()
    if lhs.shape[0] == 0 or min(_out_hw(lhs.shape, rhs.shape, window_strides, padding)) <= 0:
        return native()  # an empty output: nothing to chunk (XLA returns the empty array)
    depth = rhs.shape[0] * rhs.shape[1] * rhs.shape[2]
    im2col_forward = mode == "im2col" or depth >= _IM2COL_FORWARD_MIN_DEPTH
    return _conv_im2col(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding),
                        precision, im2col_forward)


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
