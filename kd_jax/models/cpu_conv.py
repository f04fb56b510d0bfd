"""Convolutions as chunked im2col or Winograd matmuls, for XLA:CPU.

XLA:CPU's convolutions, above all their weight gradients, are several times slower than
PyTorch's oneDNN. A convolution is a matmul of its im2col patches with the kernel; computed a
few images at a time (a loop over the batch) the patches of one chunk stay in the CPU cache, and
3x3 stride-1 layers take Winograd F(2x2, 3x3), 2.25x fewer multiplies. Both are the same
convolution up to float rounding (tests/test_models.py); README's "Performance" section has the
timings and `benchmarks/conv_layers.py` the per-layer table behind `conv_method`'s rule.

`config.model.conv` picks the algorithm (`CONV_CHOICES`): "auto" is the per-layer rule on the
CPU and XLA's own convolution elsewhere, "xla" XLA's everywhere, "im2col" / "winograd" force one
(where the shape allows). `groups` is the number of data-parallel shards of the batch: each
shard is chunked where it lies and the weight gradient summed across shards once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

CONV_CHOICES = ("auto", "xla", "im2col", "winograd")

_NHWC = ("NHWC", "HWIO", "NHWC")
_CHUNK_BYTES = 4 << 20  # im2col patches per chunk (fits the L3 cache)
_MIN_CHUNK_ROWS = 512  # output pixels per matmul, so a big kernel is read rarely
_IM2COL_FORWARD_MIN_DEPTH = 256  # kh*kw*C_in from which the chunked forward beats XLA's


def check_conv(value: str) -> str:
    """`value` if it is one of `CONV_CHOICES`, else a ValueError naming `config.model.conv`."""
    if value not in CONV_CHOICES:
        raise ValueError(f"config.model.conv={value!r}: use one of {list(CONV_CHOICES)}")
    return value


def _xla_conv(x, w, strides, padding, precision):
    return jax.lax.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=_NHWC, precision=precision
    )


def _out_hw(x_shape, w_shape, strides, padding):
    return tuple(
        (n + sum(p) - k) // s + 1 for n, p, k, s in zip(x_shape[1:3], padding, w_shape[:2], strides)
    )


def _patches(x, kernel_hw, strides, padding, out_hw):
    """(B, H, W, C) -> (B*H_out*W_out, kh*kw*C) im2col rows, columns in HWIO order (i, j, c)."""
    (kh, kw), (sh, sw), (ho, wo) = kernel_hw, strides, out_hw
    b, c = x.shape[0], x.shape[-1]
    xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
    cols = [
        jax.lax.slice(
            xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)
        )
        for i in range(kh)
        for j in range(kw)
    ]
    return (cols[0] if len(cols) == 1 else jnp.concatenate(cols, -1)).reshape(-1, kh * kw * c)


def _chunking(batch, out_hw, depth, itemsize, groups, chunk_bytes=_CHUNK_BYTES):
    """(groups, n): the batch is cut into `groups` contiguous blocks (one per data shard; one
    block if the batch does not divide) of chunks of n images, each with about `chunk_bytes` of
    (rows x depth) patches."""
    if batch % groups:
        groups = 1
    rows = out_hw[0] * out_hw[1]
    n = max(chunk_bytes // (rows * depth * itemsize), -(-_MIN_CHUNK_ROWS // rows), 1)
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
# many rows. The transforms only add, subtract and halve.
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))
_WINOGRAD_MIN_HW = 64  # output pixels per image (8x8) from which Winograd wins
_WINOGRAD_MIN_CHANNELS = 64  # C_in and C_out from which Winograd wins
_WINOGRAD_CHUNK_BYTES = 8 << 20  # transformed input tiles per chunk


def winograd_fits(x_shape, w_shape, strides, padding) -> bool:
    """Whether F(2x2, 3x3) computes this convolution: 3x3, stride 1, pad 1, even H and W."""
    h, w = x_shape[1:3]
    return (
        tuple(w_shape[:2]) == (3, 3)
        and tuple(strides) == (1, 1)
        and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
        and h % 2 == 0
        and w % 2 == 0
    )


def _winograd_kernel(w):
    """(3, 3, C, O) -> (16, C, O): G w G^T for every (C, O) pair."""
    g = jnp.asarray(_WINOGRAD_G, w.dtype)
    return jnp.einsum("ai,ijco,bj->abco", g, w, g).reshape(16, *w.shape[2:])


def winograd_tiles(xc):
    """(m, H, W, C) -> (16, m*H/2*W/2, C): B^T d B of every 4x4 input tile (stride 2, pad 1)."""
    m, h, w, c = xc.shape
    xp = jnp.pad(xc, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d = [
        [
            jax.lax.slice(xp, (0, i, j, 0), (m, i + h - 1, j + w - 1, c), (1, 2, 2, 1))
            for j in range(4)
        ]
        for i in range(4)
    ]

    def bt(r):  # B^T along one tile axis
        return [r[0] - r[2], r[1] + r[2], r[2] - r[1], r[1] - r[3]]

    cols = [bt([d[i][j] for i in range(4)]) for j in range(4)]  # cols[j][a]
    v = [bt([cols[j][a] for j in range(4)]) for a in range(4)]  # v[a][b]
    return jnp.stack([v[a][b] for a in range(4) for b in range(4)]).reshape(16, -1, c)


def winograd_output(m_tiles, shape):
    """(16, m*H/2*W/2, O) -> (m, H, W, O): A^T M A of every tile, tiles put back in place."""
    m, h, w, o = shape
    mt = m_tiles.reshape(4, 4, m, h // 2, w // 2, o)

    def at(r):  # A^T along one tile axis
        return [r[0] + r[1] + r[2], r[1] - r[2] - r[3]]

    rows = [at([mt[a, b] for a in range(4)]) for b in range(4)]  # rows[b][p]
    y = [jnp.stack(at([rows[b][p] for b in range(4)]), 3) for p in range(2)]  # (m, h/2, w/2, 2, o)
    return jnp.stack(y, 2).reshape(m, h, w, o)


def winograd_grad_tiles(g):
    """(m, H, W, O) -> (16, m*H/2*W/2, O): A g A^T of every 2x2 tile of an output gradient (the
    transpose of `winograd_output`)."""
    m, h, w, o = g.shape
    gt = [[g[:, p::2, q::2] for q in range(2)] for p in range(2)]

    def a(r):  # A = (A^T)^T along one tile axis: 2 -> 4
        return [r[0], r[0] + r[1], r[0] - r[1], -r[1]]

    cols = [a([gt[p][q] for p in range(2)]) for q in range(2)]  # cols[q][a]
    mt = [a([cols[q][i] for q in range(2)]) for i in range(4)]  # mt[a][b]
    return jnp.stack([mt[i][j] for i in range(4) for j in range(4)]).reshape(16, -1, o)


def winograd_tiles_transpose(dv, shape):
    """(16, m*H/2*W/2, C) -> (m, H, W, C): the transpose of `winograd_tiles`: B dv B^T per tile,
    the overlapping 4x4 tiles (stride 2) added back in place, the padding cut off."""
    m, h, w, c = shape
    h2, w2 = h // 2, w // 2
    dv = dv.reshape(4, 4, m, h2, w2, c)

    def b(r):  # B = (B^T)^T along one tile axis
        return [r[0], r[1] - r[2] + r[3], r[1] + r[2] - r[0], -r[3]]

    cols = [b([dv[i, j] for i in range(4)]) for j in range(4)]  # cols[j][r]
    d = [b([cols[j][r] for j in range(4)]) for r in range(4)]  # d[r][s], tile offsets

    # padded pixel (2a + r, 2b + s), r, s in {0, 1}: from tiles (a, b), (a-1, b), (a, b-1),
    # (a-1, b-1) at offsets (r, s), (r+2, s), (r, s+2), (r+2, s+2); tile indices a < h2 + 1.
    def shifted(t, di, dj):  # t[a - di, b - dj] on the (h2+1, w2+1) grid, zero outside
        return jnp.pad(t, ((0, 0), (di, 1 - di), (dj, 1 - dj), (0, 0)))

    planes = [
        [
            shifted(d[r][s], 0, 0)
            + shifted(d[r + 2][s], 1, 0)
            + shifted(d[r][s + 2], 0, 1)
            + shifted(d[r + 2][s + 2], 1, 1)
            for s in range(2)
        ]
        for r in range(2)
    ]  # (m, h2+1, w2+1, c)
    xp = jnp.stack([jnp.stack(planes[r], 3) for r in range(2)], 2)  # (m, h2+1, 2, w2+1, 2, c)
    return xp.reshape(m, h + 2, w + 2, c)[:, 1 : h + 1, 1 : w + 1]


def _winograd_forward(x, w, precision, groups):
    """3x3 stride-1 pad-1 convolution (see `winograd_fits`), chunked over the batch like the
    im2col convolution (one block of chunks per data shard)."""
    b, h, wd, c = x.shape
    groups, n = _chunking(b, (h, wd), 4 * c, x.dtype.itemsize, groups, _WINOGRAD_CHUNK_BYTES)
    u = _winograd_kernel(w)

    def chunk(xc):
        xc = xc.reshape(-1, h, wd, c)
        mt = jnp.einsum("ktc,kco->kto", winograd_tiles(xc), u, precision=precision)
        return winograd_output(mt, (*xc.shape[:3], w.shape[-1])).reshape(
            groups, n, h, wd, w.shape[-1]
        )

    return _from_chunks(jax.lax.map(chunk, _to_chunks(x, groups, n)))


def _winograd_backward(x, w, g, precision, groups):
    """(dx, dW) of `_winograd_forward`: with V = B^T d B of the input tiles and
    M = A g A^T of the output-gradient tiles (the transpose of the output transform),
    dU = sum over tiles of V (x) M (one matmul per tile position, contracting over tiles) and
    dd = B (M U^T) B^T overlap-added (the transpose of the tile transform); dW = G^T dU G."""
    b, h, wd, c = x.shape
    o = w.shape[-1]
    groups, n = _chunking(
        b, (h, wd), 4 * max(c, o), x.dtype.itemsize, groups, _WINOGRAD_CHUNK_BYTES
    )
    u, u_vjp = jax.vjp(_winograd_kernel, w)

    def chunk(du, xg):
        xc, gc = xg
        xc = xc.reshape(-1, h, wd, c)
        v, mg = winograd_tiles(xc), winograd_grad_tiles(gc.reshape(-1, h, wd, o))
        # dU per shard block (summed once at the end, not once per chunk across shards)
        du = du + jnp.einsum(
            "kgtc,kgto->gkco",
            v.reshape(16, groups, -1, c),
            mg.reshape(16, groups, -1, o),
            precision=precision,
            preferred_element_type=du.dtype,
        )
        dx = winograd_tiles_transpose(
            jnp.einsum("kto,kco->ktc", mg, u, precision=precision).astype(v.dtype), xc.shape
        )
        return du, dx.reshape(groups, n, h, wd, c)

    du0 = jnp.zeros((groups, 16, c, o), _accumulation_dtype(x.dtype))
    du, dx = jax.lax.scan(chunk, du0, (_to_chunks(x, groups, n), _to_chunks(g, groups, n)))
    return _from_chunks(dx), u_vjp(du.sum(0).astype(u.dtype))[0]


def _im2col_forward(x, w, strides, padding, precision, groups):
    out_hw = _out_hw(x.shape, w.shape, strides, padding)
    groups, n = _chunking(
        x.shape[0], out_hw, w.shape[0] * w.shape[1] * w.shape[2], x.dtype.itemsize, groups
    )
    w_mat = w.reshape(-1, w.shape[-1])

    def chunk(xc):
        rows = _patches(xc.reshape(-1, *x.shape[1:]), w.shape[:2], strides, padding, out_hw)
        y = jnp.dot(rows, w_mat, precision=precision)
        return y.reshape(groups, n, *out_hw, w.shape[-1])

    return _from_chunks(jax.lax.map(chunk, _to_chunks(x, groups, n)))


def _im2col_backward(x, w, g, strides, padding, precision, groups):
    """(dx, dW): dW = patches^T g per chunk, dx = col2im(g W^T) (the vjp of the patches)."""
    out_hw, depth = g.shape[1:3], w.shape[0] * w.shape[1] * w.shape[2]
    groups, n = _chunking(x.shape[0], out_hw, depth, x.dtype.itemsize, groups)
    w_mat = w.reshape(depth, -1)

    def chunk(dw, xg):
        xc, gc = xg
        rows, rows_vjp = jax.vjp(
            lambda xc: _patches(
                xc.reshape(-1, *x.shape[1:]), w.shape[:2], strides, padding, out_hw
            ),
            xc,
        )
        g_rows = gc.reshape(-1, w.shape[-1])
        # dW per shard block (summed once at the end, not once per chunk across shards)
        dw = dw + jnp.einsum(
            "gmk,gmo->gko",
            rows.reshape(groups, -1, depth),
            g_rows.reshape(groups, -1, w.shape[-1]),
            precision=precision,
            preferred_element_type=dw.dtype,
        )
        dx = rows_vjp(jnp.dot(g_rows, w_mat.T, precision=precision).astype(rows.dtype))[0]
        return dw, dx

    dw0 = jnp.zeros((groups, depth, w.shape[-1]), _accumulation_dtype(x.dtype))
    dw, dx = jax.lax.scan(chunk, dw0, (_to_chunks(x, groups, n), _to_chunks(g, groups, n)))
    return _from_chunks(dx), dw.sum(0).reshape(w.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _conv_chunked(x, w, strides, padding, precision, method, groups):
    """The convolution by `method` (see `conv_method`): "winograd" (forward and both gradients),
    "im2col" (likewise), or "im2col-backward" (XLA's forward, both gradients by im2col)."""
    if method == "im2col-backward":
        return _xla_conv(x, w, strides, padding, precision)
    if method == "winograd":
        return _winograd_forward(x, w, precision, groups)
    return _im2col_forward(x, w, strides, padding, precision, groups)


def _conv_chunked_fwd(x, w, strides, padding, precision, method, groups):
    return _conv_chunked(x, w, strides, padding, precision, method, groups), (x, w)


def _conv_chunked_bwd(strides, padding, precision, method, groups, residuals, g):
    x, w = residuals
    if method == "winograd":
        dx, dw = _winograd_backward(x, w, g, precision, groups)
    else:
        dx, dw = _im2col_backward(x, w, g, strides, padding, precision, groups)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_conv_chunked.defvjp(_conv_chunked_fwd, _conv_chunked_bwd)


def conv_method(x_shape, w_shape, strides, padding, dtype=jnp.float32, conv="auto") -> str:
    """How a plain NHWC/HWIO convolution is computed under `conv` (one of `CONV_CHOICES`): "xla"
    (XLA's convolution), "im2col-backward" (XLA's forward, chunked im2col gradients), "im2col" or
    "winograd" (forward and gradients). "im2col" / "winograd" are forced where the shape allows;
    "auto" is the per-layer rule of benchmarks/conv_layers.py on the CPU, XLA elsewhere. Winograd
    is float32/64 only: its transforms in bfloat16 would round each of their sums."""
    check_conv(conv)
    if conv == "xla" or (conv == "auto" and jax.default_backend() != "cpu"):
        return "xla"
    if x_shape[0] == 0 or min(_out_hw(x_shape, w_shape, strides, padding)) <= 0:
        return "xla"  # an empty output: nothing to chunk (XLA returns the empty array)
    fits = winograd_fits(x_shape, w_shape, strides, padding) and jnp.dtype(dtype) in (
        jnp.float32,
        jnp.float64,
    )
    if conv == "winograd" and fits:
        return "winograd"
    if conv != "auto":
        return "im2col"
    if (
        fits
        and x_shape[1] * x_shape[2] >= _WINOGRAD_MIN_HW
        and min(w_shape[2:]) >= _WINOGRAD_MIN_CHANNELS
    ):
        return "winograd"
    depth = w_shape[0] * w_shape[1] * w_shape[2]
    return "im2col" if depth >= _IM2COL_FORWARD_MIN_DEPTH else "im2col-backward"


def conv_general_dilated(
    lhs,
    rhs,
    window_strides,
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count=1,
    precision=None,
    preferred_element_type=None,
    *,
    conv="auto",
    groups=1,
):
    """`jax.lax.conv_general_dilated` (what `nn.Conv` calls), computed by `conv_method(...,
    conv)` with the batch in `groups` data-parallel blocks; convolutions it does not cover
    (grouped, dilated, other layouts) are XLA's."""
    check_conv(conv)
    xla = functools.partial(
        jax.lax.conv_general_dilated,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )
    plain = (
        feature_group_count == 1
        and preferred_element_type is None
        and not isinstance(padding, str)
        and lhs.ndim == 4
        and all(d == 1 for d in (*(lhs_dilation or ()), *(rhs_dilation or ())))
        and dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
    )
    if not plain:
        return xla()
    strides, padding = tuple(window_strides), tuple(tuple(p) for p in padding)
    method = conv_method(lhs.shape, rhs.shape, strides, padding, jnp.result_type(lhs, rhs), conv)
    if method == "xla":
        return xla()
    return _conv_chunked(lhs, rhs, strides, padding, precision, method, int(groups))


def conv_function(conv: str = "auto", groups: int = 1):
    """The `conv_general_dilated` for an `nn.Conv`: None (Flax's default, XLA's convolution,
    with nothing of this module traced) for "xla" and for "auto" off the CPU, otherwise
    `conv_general_dilated` with `conv` and `groups` bound."""
    check_conv(conv)
    if conv == "xla" or (conv == "auto" and jax.default_backend() != "cpu"):
        return None
    return functools.partial(conv_general_dilated, conv=conv, groups=groups)
