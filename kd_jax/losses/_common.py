"""Shared numerics for `kd_jax.losses` (private).

Conventions used by every loss in the package:

* Inputs are promoted to at least float32 (bf16/fp16 activations are upcast before any
  reduction); the returned scalar has that dtype.
* `weights` is an optional [B] array (0/1 or real, >= 0). A row with weight <= 0 is *excluded*:
  it contributes nothing to the numerator or the denominator, and in relational (pairwise)
  losses it is excluded both as an anchor and as a pair partner. Reductions are
  ``sum_i w_i * loss_i / sum_i w_i`` (0 when every weight is 0), so appending padded rows with
  weight 0 leaves a loss unchanged.
* Norms that can be zero use the "double where" trick, so values *and* gradients stay finite
  for zero vectors and identical features.
* Loss-internal matmuls (B x B similarity / Gram matrices, O(B^2 D)) run at
  `Precision.HIGHEST`, so values are float32-exact on GPU/TPU too, where the default float32
  matmul uses TF32 / bf16 passes (~1e-3 relative error). Their cost is negligible next to the
  networks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Fill value for masked logits. exp(NEG - max) underflows to exactly 0 in float32, so a
# masked softmax equals the softmax over the kept entries bit for bit, while staying finite
# (an all-masked row gives finite garbage that callers zero out with `where`).
NEG = -1e9


def as_float(x):
    """`x` as a float array of at least float32 precision."""
    x = jnp.asarray(x)
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    return x.astype(dtype)


def flatten_rows(x):
    """[B, ...] -> [B, prod(...)], float32 or wider."""
    x = as_float(x)
    return x.reshape(x.shape[0], -1) if x.ndim != 2 else x


def row_weights(weights, n, dtype=jnp.float32):
    """(w [n] with excluded rows set to 0, valid [n] bool)."""
    if weights is None:
        return jnp.ones((n,), dtype), jnp.ones((n,), bool)
    w = jnp.asarray(weights).astype(dtype).reshape(n)
    valid = w > 0
    return jnp.where(valid, w, 0.0), valid


def safe_div(num, den):
    """num / den, and 0 where den == 0 (finite gradients either way)."""
    ok = den != 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def weighted_mean(values, w, valid):
    """sum_i w_i v_i / sum_i w_i over valid rows; NaN/inf in excluded rows cannot leak."""
    num = jnp.sum(jnp.where(valid, w * values, 0.0))
    return safe_div(num, jnp.sum(w))


def safe_norm(x, axis=-1, keepdims=True):
    """Euclidean norm with a zero (not NaN/inf) gradient at x = 0."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def l2_normalize(x, axis=-1, eps=1e-12):
    """PyTorch ``F.normalize`` semantics: x / max(||x||, eps); a zero vector stays zero.

    Values equal F.normalize everywhere; at an exactly-zero vector the gradient is 0 (PyTorch
    gives 1/eps there), which keeps degenerate batches trainable.
    """
    n = safe_norm(x, axis=axis, keepdims=True)
    nonzero = n > 0
    return jnp.where(nonzero, x / jnp.maximum(n, eps), 0.0)


HIGHEST = jax.lax.Precision.HIGHEST


def mm(a, b):
    """a @ b at full float32 precision."""
    return jnp.matmul(a, b, precision=HIGHEST)


def gram(a, b=None):
    """a @ b.T ([B, D] x [B', D] -> [B, B']) at full float32 precision."""
    return mm(a, (a if b is None else b).T)


def masked_log_softmax(x, mask=None, axis=-1):
    """log_softmax over the entries where `mask` is True (masked entries get ~NEG)."""
    if mask is not None:
        x = jnp.where(mask, x, NEG)
    return jax.nn.log_softmax(x, axis=axis)


def huber(x, delta=1.0):
    """Smooth-L1 / Huber with threshold delta (PyTorch ``smooth_l1_loss`` with beta=1)."""
    ax = jnp.abs(x)
    return jnp.where(ax < delta, 0.5 * x * x / delta, ax - 0.5 * delta)


def kl_rows(log_q, t):
    """sum_c t_c (log t_c - log_q_c) over the last axis; entries with t_c = 0 contribute 0."""
    pos = t > 0
    log_t = jnp.log(jnp.where(pos, t, 1.0))
    return jnp.sum(jnp.where(pos, t * (log_t - log_q), 0.0), axis=-1)


def pair_mask(valid):
    """[B, B] bool: both rows valid."""
    return valid[:, None] & valid[None, :]
