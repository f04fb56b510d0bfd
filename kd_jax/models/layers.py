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
# Convolution on XLA:CPU as chunked im2col or Winograd matmuls
# --------------------------------------------------------------------------------------------
# XLA:CPU's convolutions trail PyTorch's oneDNN, worst in training: forward + input and weight
# gradient of a 64->64 3x3 conv on 32x32x64 at batch 64 take 2.1 s on 2 cores (nearly all of it
# the weight gradient), PyTorch 0.18 s. A convolution is a matmul of its im2col patches with the
# kernel, but the patches are kh*kw times the input (150 MB there) and this machine moves memory
# at a few GB/s, so materialising them costs more than the matmul. Done a few images at a time
# (a `lax.scan` over the batch) the patches of one chunk stay in the L3 cache: the same layer
# trains in 0.28 s, its forward 82 -> 69 ms. 3x3 stride-1 layers (most of a ResNet's FLOPs) go
# further with Winograd F(2x2, 3x3), 2.25x fewer multiplies (see `_winograd_forward`).
# `python benchmarks/conv_layers.py` prints the table for every layer shape of the benchmark
# models (README, "Performance"); `conv_method` is the per-layer rule it supports. GPU/TPU keep
# XLA's convolution. KD_JAX_CONV=auto|native|im2col|winograd (default auto) overrides the rule,
# for benchmarks and tests.
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


def _chunking(batch, out_hw, depth, itemsize, chunk_bytes=None):
    """(groups, n): the batch is cut into `groups` contiguous blocks (one per device, so a batch
    sharded over the devices is chunked where it lies) of chunks of n images, each with about
    `chunk_bytes` of (rows x depth) patches."""
    groups = jax.device_count()
    if batch % groups:
        groups = 1
    rows = out_hw[0] * out_hw[1]
    n = max((chunk_bytes or _CHUNK_BYTES) // (rows * depth * itemsize),
            -(-_MIN_CHUNK_ROWS // rows), 1)
    n = min(n, batch // groups)
    while (batch // groups) % n:
        n -= 1
    return groups, n


def _accumulation_dtype(dtype):
    """The weight gradient's running sum over chunks: float32 for bfloat16/float32 inputs, float64
    for float64 ones (a float32 sum would cut a float64 gradient to ~1e-7)."""
    return jnp.promote_types(dtype, jnp.float32)


def _to_chunks(a, groups, n):  # (B, ...) -> (steps, groups, n, ...)
    return jnp.moveaxis(a.reshape(groups, a.shape[0] // (groups * n), n, *a.shape[1:]), 1, 0)


def _from_chunks(a):  # (steps, groups, n, ...) -> (B, ...)
    a = jnp.moveaxis(a, 0, 1)
    return a.reshape(-1, *a.shape[3:])


# Winograd F(2x2, 3x3) (Lavin & Gray 2016) for 3x3 stride-1 pad-1 convolutions: each 2x2 output
# tile is A^T [(G w G^T) * (B^T d B)] A of its 4x4 input tile d, so the tiles of a chunk take 16
# matmuls of depth C_in (one per tile position) where im2col takes one of depth 9 C_in for 4x as
# many rows: 2.25x fewer multiplies, in the forward and in both gradients. The transforms only
# add, subtract and halve; tests check the result against float64 next to XLA's.
# Measured per 3x3 layer, batch 64, im2col -> Winograd (ms, forward / training pass): 64ch@32²
# 69 -> 67 / 228 -> 227, 128ch@16² 51 -> 36 / 173 -> 151, 256ch@8² 45 -> 29 / 130 -> 118; on
# 4x4 maps (4 tiles per image) the transforms cost more than they save.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINOGRAD_MIN_HW = 64           # output pixels per image (8x8) from which Winograd wins
_WINOGRAD_MIN_CHANNELS = 64     # C_in and C_out; 32->32 at 16²: training 35 -> 60 ms, stem: worse
_WINOGRAD_CHUNK_BYTES = 8 << 20  # transformed input tiles per chunk (4 and 16 MiB: slower)


def winograd_fits(x_shape, w_shape, strides, padding) -> bool:
    """Whether F(2x2, 3x3) computes this convolution: 3x3, stride 1, pad 1, even H and W."""
    h, w = x_shape[1:3]
    return (tuple(w_shape[:2]) == (3, 3) and tuple(strides) == (1, 1)
            and tuple(map(tuple, padding)) == ((1, 1), (1, 1)) and h % 2 == 0 and w % 2 == 0)


def _winograd_kernel(w):
    """(3, 3, C, O) -> (16, C, O): G w G^T for every (C, O) pair."""
    g = jnp.asarray(_WINOGRAD_G, w.dtype)
    return jnp.einsum("ai,ijco,bj->abco", g, w, g).reshape(16, *w.shape[2:])


def _winograd_tiles(xc):
    """(m, H, W, C) -> (16, m*H/2*W/2, C): B^T d B of every 4x4 input tile (stride 2, pad 1)."""
    m, h, w, c = xc.shape
    xp = jnp.pad(xc, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d = [[jax.lax.slice(xp, (0, i, j, 0), (m, i + h - 1, j + w - 1, c), (1, 2, 2, 1))
          for j in range(4)] for i in range(4)]

    def bt(r):  # B^T along one tile axis
        return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]

    cols = [bt([d[i][j] for i in range(4)]) for j in range(4)]      # cols[j][a]
    v = [bt([cols[j][a] for j in range(4)]) for a in range(4)]      # v[a][b]
    return jnp.stack([v[a][b] for a in range(4) for b in range(4)]).reshape(16, -1, c)


def _winograd_output(m_tiles, shape):
    """(16, m*H/2*W/2, O) -> (m, H, W, O): A^T M A of every tile, tiles put back in place."""
    m, h, w, o = shape
    mt = m_tiles.reshape(4, 4, m, h // 2, w // 2, o)

    def at(r):  # A^T along one tile axis
        return [r[0] + r[1] + r[2], r[1] - r[2] - r[3]]

    rows = [at([mt[a, b] for a in range(4)]) for b in range(4)]     # rows[b][p]
    y = [jnp.stack(at([rows[b][p] for b in range(4)]), 3) for p in range(2)]  # (m, h/2, w/2, 2, o)
    return jnp.stack(y, 2).reshape(m, h, w, o)


def _winograd_grad_tiles(g):
    """(m, H, W, O) -> (16, m*H/2*W/2, O): A g A^T of every 2x2 tile of an output gradient (the
    transpose of `_winograd_output`)."""
    m, h, w, o = g.shape
    gt = [[g[:, p::2, q::2] for q in range(2)] for p in range(2)]

    def a(r):  # A = (A^T)^T along one tile axis: 2 -> 4
        return [r[0], r[0] + r[1], r[0] - r[1], -r[1]]

    cols = [a([gt[p][q] for p in range(2)]) for q in range(2)]       # cols[q][a]
    mt = [a([cols[q][i] for q in range(2)]) for i in range(4)]       # mt[a][b]
    return jnp.stack([mt[i][j] for i in range(4) for j in range(4)]).reshape(16, -1, o)


def _winograd_tiles_transpose(dv, shape):
    """(16, m*H/2*W/2, C) -> (m, H, W, C): the transpose of `_winograd_tiles`: B dv B^T per tile,
    the overlapping 4x4 tiles (stride 2) added back in place, the padding cut off."""
    m, h, w, c = shape
    h2, w2 = h // 2, w // 2
    dv = dv.reshape(4, 4, m, h2, w2, c)

    def b(r):  # B = (B^T)^T along one tile axis
        return [r[0], r[1] - r[2] + r[3], r[1] + r[2] - r[0], -r[3]]

    cols = [b([dv[i, j] for i in range(4)]) for j in range(4)]       # cols[j][r]
    d = [b([cols[j][r] for j in range(4)]) for r in range(4)]         # d[r][s], tile offsets
    # padded pixel (2a + r, 2b + s), r, s in {0, 1}: from tiles (a, b), (a-1, b), (a, b-1),
    # (a-1, b-1) at offsets (r, s), (r+2, s), (r, s+2), (r+2, s+2); tile indices a < h2 + 1.
    def shifted(t, di, dj):  # t[a - di, b - dj] on the (h2+1, w2+1) grid, zero outside
        return jnp.pad(t, ((0, 0), (di, 1 - di), (dj, 1 - dj), (0, 0)))

    planes = [[shifted(d[r][s], 0, 0) + shifted(d[r + 2][s], 1, 0)
               + shifted(d[r][s + 2], 0, 1) + shifted(d[r + 2][s + 2], 1, 1)
               for s in range(2)] for r in range(2)]                  # (m, h2+1, w2+1, c)
    xp = jnp.stack([jnp.stack(planes[r], 3) for r in range(2)], 2)   # (m, h2+1, 2, w2+1, 2, c)
    return xp.reshape(m, h + 2, w + 2, c)[:, 1:h + 1, 1:w + 1]


def _winograd_forward(x, w, precision):
    """3x3 stride-1 pad-1 convolution (see `winograd_fits`), chunked over the batch like the
    im2col convolution (one block of chunks per device)."""
    b, h, wd, c = x.shape
    groups, n = _chunking(b, (h, wd), 4 * c, x.dtype.itemsize, _WINOGRAD_CHUNK_BYTES)
    u = _winograd_kernel(w)

    def chunk(xc):
        xc = xc.reshape(-1, h, wd, c)
        mt = jnp.einsum("ktc,kco->kto", _winograd_tiles(xc), u, precision=precision)
        return _winograd_output(mt, (*xc.shape[:3], w.shape[-1])).reshape(
            groups, n, h, wd, w.shape[-1])

    return _from_chunks(jax.lax.map(chunk, _to_chunks(x, groups, n)))


def _winograd_backward(x, w, g, precision):
    """(dx, dW) of `_winograd_forward`: with V = B^T d B of the input tiles and
    M = A g A^T of the output-gradient tiles (the transpose of the output transform),
    dU = sum over tiles of V (x) M (one matmul per tile position, contracting over tiles) and
    dd = B (M U^T) B^T overlap-added (the transpose of the tile transform); dW = G^T dU G."""
    b, h, wd, c = x.shape
    o = w.shape[-1]
    groups, n = _chunking(b, (h, wd), 4 * max(c, o), x.dtype.itemsize, _WINOGRAD_CHUNK_BYTES)
    u, u_vjp = jax.vjp(_winograd_kernel, w)

    def chunk(du, xg):
        xc, gc = xg
        xc = xc.reshape(-1, h, wd, c)
        v, mg = _winograd_tiles(xc), _winograd_grad_tiles(gc.reshape(-1, h, wd, o))
        # dU per device block (summed once at the end, not once per chunk across devices)
        du = du + jnp.einsum("kgtc,kgto->gkco", v.reshape(16, groups, -1, c),
                             mg.reshape(16, groups, -1, o), precision=precision,
                             preferred_element_type=du.dtype)
        dx = _winograd_tiles_transpose(
            jnp.einsum("kto,kco->ktc", mg, u, precision=precision).astype(v.dtype), xc.shape)
        return du, dx.reshape(groups, n, h, wd, c)

    du0 = jnp.zeros((groups, 16, c, o), _accumulation_dtype(x.dtype))
    du, dx = jax.lax.scan(chunk, du0, (_to_chunks(x, groups, n), _to_chunks(g, groups, n)))
    return _from_chunks(dx), u_vjp(du.sum(0).astype(u.dtype))[0]


def _im2col_forward(x, w, strides, padding, precision):
    out_hw = _out_hw(x.shape, w.shape, strides, padding)
    groups, n = _chunking(x.shape[0], out_hw, w.shape[0] * w.shape[1] * w.shape[2],
                          x.dtype.itemsize)
    w_mat = w.reshape(-1, w.shape[-1])

    def chunk(xc):
        rows = _patches(xc.reshape(-1, *x.shape[1:]), w.shape[:2], strides, padding, out_hw)
        y = jnp.dot(rows, w_mat, precision=precision)
        return y.reshape(groups, n, *out_hw, w.shape[-1])

    return _from_chunks(jax.lax.map(chunk, _to_chunks(x, groups, n)))


def _im2col_backward(x, w, g, strides, padding, precision):
    """(dx, dW): dW = patches^T g per chunk, dx = col2im(g W^T) (the vjp of the patches)."""
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
                             preferred_element_type=dw.dtype)
        dx = rows_vjp(jnp.dot(g_rows, w_mat.T, precision=precision).astype(rows.dtype))[0]
        return dw, dx

    dw0 = jnp.zeros((groups, depth, w.shape[-1]), _accumulation_dtype(x.dtype))
    dw, dx = jax.lax.scan(chunk, dw0, (_to_chunks(x, groups, n), _to_chunks(g, groups, n)))
    return _from_chunks(dx), dw.sum(0).reshape(w.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv_chunked(x, w, strides, padding, precision, method):
    """The convolution by `method` (see `conv_method`): "winograd" (forward and both gradients),
    "im2col" (likewise), or "im2col-backward" (XLA's forward, both gradients by im2col)."""
    if method == "im2col-backward":
        return _native_conv(x, w, strides, padding, precision)
    if method == "winograd":
        return _winograd_forward(x, w, precision)
    return _im2col_forward(x, w, strides, padding, precision)


def _conv_chunked_fwd(x, w, strides, padding, precision, method):
    return _conv_chunked(x, w, strides, padding, precision, method), (x, w)


def _conv_chunked_bwd(strides, padding, precision, method, residuals, g):
    x, w = residuals
    if method == "winograd":
        dx, dw = _winograd_backward(x, w, g, precision)
    else:
        dx, dw = _im2col_backward(x, w, g, strides, padding, precision)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv_chunked.defvjp(_conv_chunked_fwd, _conv_chunked_bwd)


def _conv_mode() -> str:
    mode = os.environ.get("KD_JAX_CONV", "auto")
    if mode not in ("auto", "native", "im2col", "winograd"):
        raise ValueError(f"KD_JAX_CONV={mode!r}: expected auto, native, im2col or winograd")
    return mode


def conv_method(x_shape, w_shape, strides, padding, dtype=jnp.float32) -> str:
    """How `conv_general_dilated` computes a plain NHWC/HWIO convolution here: "native" (XLA's
    convolution), "im2col-backward" (XLA's forward, chunked im2col gradients), "im2col" or
    "winograd" (forward and gradients). KD_JAX_CONV=native|im2col|winograd forces one, where the
    shape allows; auto (the default) is the rule measured in benchmarks/conv_layers.py. Winograd
    is float32/64 only: its transforms in bfloat16 would round each of their sums."""
    mode = _conv_mode()
    if mode == "native" or (mode == "auto" and jax.default_backend() != "cpu"):
        return "native"
    if x_shape[0] == 0 or min(_out_hw(x_shape, w_shape, strides, padding)) <= 0:
        return "native"  # an empty output: nothing to chunk (XLA returns the empty array)
    fits = (winograd_fits(x_shape, w_shape, strides, padding)
            and jnp.dtype(dtype) in (jnp.float32, jnp.float64))
    if mode == "winograd" and fits:
        return "winograd"
    if mode != "auto":
        return "im2col"
    if (fits and x_shape[1] * x_shape[2] >= _WINOGRAD_MIN_HW
            and min(w_shape[2:]) >= _WINOGRAD_MIN_CHANNELS):
        return "winograd"
    depth = w_shape[0] * w_shape[1] * w_shape[2]
    return "im2col" if depth >= _IM2COL_FORWARD_MIN_DEPTH else "im2col-backward"


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None):
    """`jax.lax.conv_general_dilated` (what `nn.Conv` calls), computed as chunked im2col or
    Winograd matmuls on the CPU where that is faster (see above); the same convolution up to
    float rounding."""
    native = functools.partial(
        jax.lax.conv_general_dilated, lhs, rhs, window_strides, padding, lhs_dilation,
        rhs_dilation, dimension_numbers, feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    plain = (feature_group_count == 1 and preferred_element_type is None
             and not isinstance(padding, str) and lhs.ndim == 4
             and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
             and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC))
    if not plain:
        _conv_mode()  # a bad KD_JAX_CONV fails whatever the convolution
        return native()
    strides, padding = tuple(window_strides), tuple(tuple(p) for p in padding)
    method = conv_method(lhs.shape, rhs.shape, strides, padding, jnp.result_type(lhs, rhs))
    if method == "native":
        return native()
    return _conv_chunked(lhs, rhs, strides, padding, precision, method)


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
