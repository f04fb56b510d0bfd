"""Per-pixel losses of semantic segmentation (pure: arrays in, a scalar out).

Logits are [B, H, W, C], labels [B, H, W] int with `ignore_index` (255) for unlabeled pixels;
`weights` [B] (0 = a padded image) weigh whole images. Every reduction is the mean over the
counted pixels, so a pixel of any image weighs the same (PyTorch's
`cross_entropy(..., ignore_index=255)` "mean" reduction; DFAD's per-pixel KD).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _common as cm
from kd_jax.losses.distill import kd_loss, low_noise_targets, soft_target_cross_entropy

IGNORE_INDEX = 255


def _pixel_weights(shape, weights, dtype=jnp.float32):
    """[B*H*W] pixel weights: the image's weight (1 without `weights`) at every pixel."""
    b = shape[0]
    w = jnp.ones((b,), dtype) if weights is None else jnp.asarray(weights).astype(dtype)
    return jnp.broadcast_to(w.reshape((b,) + (1,) * (len(shape) - 1)), shape).reshape(-1)


def pixel_cross_entropy(
    logits, labels, weights=None, ignore_index=IGNORE_INDEX, label_smoothing=0.0
):
    """Mean cross-entropy over the pixels whose label is in [0, C) and not `ignore_index`
    (0 when none counts). `label_smoothing` ε mixes the one-hot target with uniform."""
    z = cm.as_float(logits)
    c = z.shape[-1]
    labels = jnp.asarray(labels).astype(jnp.int32)
    valid = (labels >= 0) & (labels < c) & (labels != ignore_index)
    logp = jax.nn.log_softmax(z, axis=-1)
    safe = jnp.where(valid, labels, 0)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * logp.mean(-1)
    w = _pixel_weights(labels.shape, weights, nll.dtype) * valid.reshape(-1)
    return cm.weighted_mean(nll.reshape(-1), w, w > 0)


def pixel_kd_loss(student_logits, teacher_logits, temperature=4.0, weights=None):
    """Hinton KD per pixel: τ² · mean over pixels of KL(softmax(z_T/τ) || softmax(z_S/τ))
    (`kd_loss` on the [B·H·W, C] rows)."""
    c = student_logits.shape[-1]
    w = None if weights is None else _pixel_weights(student_logits.shape[:-1], weights)
    return kd_loss(
        jnp.reshape(student_logits, (-1, c)),
        jnp.reshape(teacher_logits, (-1, c)),
        temperature=temperature,
        weights=w,
    )


def pixel_low_noise_loss(
    student_logits,
    teacher_logits,
    temperature,
    *,
    weights=None,
    pixel_mask=None,
    apply_to="teacher",
    confidence_weight=False,
    **lnr,
):
    """ODSD §2 LNR per pixel (§5): `low_noise_targets` on every pixel's [C] teacher logits
    (`lnr`: rule, rho, k, threshold, k_max, tail; rule="prior"'s mean is over the counted
    pixels, and it also removes the background's lean, which is real in segmentation), then
    `soft_target_cross_entropy` of the student's full pixel softmax (`apply_to="teacher"`) or
    `kd_loss` with both softmaxes cut to K (`"both"`), averaged over the counted pixels:
    `weights` [B] per image (0 = a padded image), `pixel_mask` [B, H, W] (0 = a padded or ignored pixel, which then changes nothing).
    `confidence_weight`: pixel weight c1 / mean(c1), c1 = max_c p_T(c|pixel), the mean over
    the counted pixels. Returns (loss, targets [B, H, W, C], kept [B, H, W, C] bool)."""
    shape = jnp.shape(teacher_logits)
    c = shape[-1]
    zs = jnp.reshape(student_logits, (-1, c))
    zt = jnp.reshape(teacher_logits, (-1, c))
    w = _pixel_weights(shape[:-1], weights)
    if pixel_mask is not None:
        w = w * (jnp.reshape(pixel_mask, (-1,)) > 0)
    targets, kept = low_noise_targets(zt, temperature, row_weights=w, **lnr)
    if confidence_weight:
        c1 = jnp.max(jax.nn.softmax(jax.lax.stop_gradient(cm.as_float(zt)), -1), -1)
        w = w * cm.safe_div(c1, cm.weighted_mean(c1, w, w > 0))
    if apply_to == "both":
        loss = kd_loss(zs, zt, temperature, class_mask=kept, weights=w, mask_student=True)
    elif apply_to == "teacher":
        loss = soft_target_cross_entropy(zs, targets, temperature, weights=w)
    else:
        raise ValueError(f"apply_to={apply_to!r}: use teacher or both")
    return loss, targets.reshape(shape), kept.reshape(shape)
