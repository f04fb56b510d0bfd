"""Logit and feature distillation: Hinton KD, class dropping (EIKD §2), low-noise targets
(ODSD §2), explicit feature matching (EIKD §3).

Conventions (see also `kd_jax.losses` module docstring):

* "teacher" arguments are wrapped in `jax.lax.stop_gradient`: a distillation term never
  trains the teacher (as in every reference implementation, where the teacher runs under
  ``torch.no_grad``).
* KL reductions are "batchmean": the KL is summed over classes and averaged over rows
  (weighted by `weights`), then multiplied by tau^2 (Hinton et al. 2015, so gradient magnitudes
  do not shrink with the temperature).
* Class selection (top-k / top-p / threshold) is made on the teacher's probabilities at
  temperature 1, p_T = softmax(z_T); the kept logits are then softened with tau.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.losses import _common as cm


def _descending_ranks(x):
    """Rank of each entry along the last axis in descending order (0 = largest).

    Ties are broken by the smaller index, so rank 0 is always `jnp.argmax(x, -1)`.
    """
    order = jnp.argsort(-x, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True), order


def _soft_kl_loss(log_q, targets, temperature, weights):
    """tau^2 * sum_i w_i KL(targets_i || q_i) / sum_i w_i (shared by every KD variant)."""
    kl = cm.kl_rows(log_q, targets)
    w, valid = cm.row_weights(weights, kl.shape[0], kl.dtype)
    return (temperature**2) * cm.weighted_mean(kl, w, valid)


def kd_loss(
    student_logits,
    teacher_logits,
    temperature=4.0,
    class_mask=None,
    weights=None,
    mask_student=True,
):
    """Hinton knowledge distillation, optionally with class dropping.

    L = tau^2 * sum_i w_i KL( softmax_K(z_T,i / tau) || softmax_K'(z_S,i / tau) ) / sum_i w_i

    Hinton, Vinyals & Dean 2015 (Eq. 2 of "Distilling the knowledge in a neural network");
    class dropping as in EIKD (Explicit and Implicit KD via Unlabeled Data): the teacher's
    least likely classes are removed before both softmaxes.

    Args:
      student_logits: [B, C].
      teacher_logits: [B, C] (stop-gradient).
      temperature: tau > 0.
      class_mask: optional [B, C] bool, the kept classes K_i (see `class_drop_mask`). Logits
        outside the mask are replaced by a large negative value, so the softmax is over K_i
        only and the KL is over the kept classes. None or all-True gives plain KD exactly.
      weights: optional [B] row weights (0 = padding, excluded).
      mask_student: True (EIKD "apply_to=both", default): both softmaxes are restricted to K_i,
        so with |K_i| = 1 the loss is 0. False (EIKD/ODSD "apply_to=teacher"): only the teacher
        is truncated and renormalised, the student keeps its full softmax (with |K_i| = 1 this
        is a pseudo-label cross-entropy, not 0). Identical to
        `soft_target_cross_entropy(z_S, low_noise_targets(...)[0], tau)`.

    Returns:
      Scalar, "batchmean" reduction times tau^2.
    """
    zs = cm.as_float(student_logits) / temperature
    zt = jax.lax.stop_gradient(cm.as_float(teacher_logits)) / temperature
    if class_mask is not None:
        class_mask = jnp.asarray(class_mask, bool)
        zt = jnp.where(class_mask, zt, cm.NEG)
        if mask_student:
            zs = jnp.where(class_mask, zs, cm.NEG)
    targets = jax.nn.softmax(zt, axis=-1)
    log_q = jax.nn.log_softmax(zs, axis=-1)
    return _soft_kl_loss(log_q, targets, temperature, weights)


def class_drop_mask(teacher_logits, k=None, threshold=None):
    """EIKD class-dropping mask K_i ([B, C] bool); always contains the teacher's argmax.

    Exactly one of:
      k: keep the top-k classes of z_T,i (ties broken by the smaller class index).
      threshold: keep classes with p_T(c) = softmax(z_T,i)_c >= threshold (temperature 1), plus
        the argmax so no row is empty.
    """
    if (k is None) == (threshold is None):
        raise ValueError("class_drop_mask: give exactly one of k or threshold")
    z = jax.lax.stop_gradient(cm.as_float(teacher_logits))
    ranks, _ = _descending_ranks(z)
    if k is not None:
        return ranks < k
    p = jax.nn.softmax(z, axis=-1)
    return (p >= threshold) | (ranks == 0)


def low_noise_targets(
    teacher_logits,
    temperature,
    rule="top_p",
    rho=0.9,
    k=None,
    threshold=None,
    k_max=None,
    tail="drop",
    row_weights=None,
):
    """ODSD §2 low-noise representation: per-sample truncated, renormalised teacher targets.

    K_i is chosen on p_T = softmax(z_T,i) (temperature 1):
      rule="top_p" (default): the smallest set of classes, in descending p_T, whose cumulative
        probability is >= rho; |K_i| is clipped to [1, k_max], k_max = ceil(C/2) by default.
        rho >= 1 keeps every class (no floating-point cut-off of the tail).
      rule="top_k": the top-k classes (k defaults to ceil(C/2)).
      rule="threshold": classes with p_T >= threshold, plus the argmax.
      rule="none": every class (plain KD targets).
      rule="prior" (a kd_jax option): every class, and the part of the tail every row shares
        is removed: the logits at tau are shifted by -log pi, pi = the batch's mean
        softmax(z_T / tau) (rows weighted by `row_weights`, [B], 0 = not counted), so
        t_i = softmax(z_T,i / tau - log pi). A teacher that puts the same extra mass on one
        class for every open-world image (a "sink" class) loses that bias; the per-image shape
        of the tail (dark knowledge) stays, up to the shift. The mean is over the whole
        (global) batch. It assumes the original classes are balanced.
    For top_k / threshold / none / prior, k_max (if given) also caps |K_i|. K_i always holds the
    argmax (ties by smaller class index).

    Target (tail="drop", the paper's): t_i(c) = softmax over K_i of z_T,i / tau, exactly 0 outside
    K_i. With |K_i| = 1 that is a one-hot target at temperature tau, which the student's
    softmax(z_S / tau) reaches only with unbounded logit gaps (large tau^2-scaled gradients).
    tail="uniform" (a kd_jax option) keeps p_tau = softmax(z_T / tau) on K_i as is and
    spreads the remaining mass evenly over the classes outside K_i: the tail's *shape* (what
    the paper takes for domain-shift noise) is removed, its mass (the teacher's softened
    confidence) kept, so the targets are as bounded as KD's. Both equal KD's targets when K_i
    holds every class.

    Args:
      teacher_logits: [B, C] (stop-gradient).
      temperature: tau.
    Returns:
      (targets [B, C] float, probabilities summing to 1 per row; kept [B, C] bool).
    """
    z = jax.lax.stop_gradient(cm.as_float(teacher_logits))
    num_classes = z.shape[-1]
    ranks, order = _descending_ranks(z)
    if rule == "top_p":
        if k_max is None:
            k_max = int(math.ceil(num_classes / 2))
        p = jax.nn.softmax(z, axis=-1)
        p_sorted = jnp.take_along_axis(p, order, axis=-1)
        cum_excl = jnp.cumsum(p_sorted, axis=-1) - p_sorted
        keep_sorted = (cum_excl < rho) | (jnp.asarray(rho) >= 1)
        size = jnp.clip(jnp.sum(keep_sorted, axis=-1), 1, k_max)
        kept = ranks < size[..., None]
    elif rule == "top_k":
        if k is None:
            k = int(math.ceil(num_classes / 2))
        kept = ranks < k
    elif rule == "threshold":
        if threshold is None:
            raise ValueError("rule='threshold' needs threshold")
        kept = (jax.nn.softmax(z, axis=-1) >= threshold) | (ranks == 0)
    elif rule in ("none", "prior"):
        kept = jnp.ones(z.shape, bool)
    else:
        raise ValueError(f"unknown rule {rule!r}")
    if k_max is not None and rule != "top_p":
        kept = kept & (ranks < k_max)
    z_tau = z / temperature
    if rule == "prior":
        w, valid = cm.row_weights(row_weights, z.shape[0], z.dtype)
        p_rows = jnp.where(valid[:, None], jax.nn.softmax(z_tau, axis=-1), 0.0)
        p_mean = cm.safe_div(jnp.sum(w[:, None] * p_rows, axis=0), jnp.sum(w))
        # the floor keeps log finite where a class's mean underflows (or no row is counted)
        z_tau = z_tau - jnp.log(jnp.maximum(p_mean, jnp.finfo(z.dtype).tiny))
    if tail == "drop":
        targets = jax.nn.softmax(jnp.where(kept, z_tau, cm.NEG), axis=-1)
    elif tail == "uniform":
        p_tau = jax.nn.softmax(z_tau, axis=-1)
        mass_out = jnp.sum(jnp.where(kept, 0.0, p_tau), axis=-1, keepdims=True)
        n_out = jnp.sum(~kept, axis=-1, keepdims=True)
        targets = jnp.where(kept, p_tau, mass_out / jnp.maximum(n_out, 1))
    else:
        raise ValueError(f"unknown tail {tail!r}: use drop or uniform")
    return targets, kept


def soft_target_cross_entropy(student_logits, targets, temperature, weights=None):
    """KL of the student's full softmax against given soft targets (ODSD L_LN).

    L = tau^2 * sum_i w_i sum_c t_i(c) [log t_i(c) - log softmax(z_S,i / tau)_c] / sum_i w_i

    Entries with t_i(c) = 0 contribute 0. This is the cross-entropy minus the (constant)
    target entropy, so it is 0 when the student matches the targets. With
    `low_noise_targets(..., rule="top_p", rho=1, k_max=C)` it equals `kd_loss` exactly.

    Args:
      student_logits: [B, C]; targets: [B, C] probabilities (stop-gradient); weights: [B].
    """
    log_q = jax.nn.log_softmax(cm.as_float(student_logits) / temperature, axis=-1)
    t = jax.lax.stop_gradient(cm.as_float(targets))
    return _soft_kl_loss(log_q, t, temperature, weights)


def feature_loss(student_feats, teacher_feats, normalize=True, kind="l2sq", weights=None):
    """Explicit feature distillation (EIKD §3; FitNets-style hint loss).

    Features [B, ...] are flattened to [B, D]; with `normalize`, each row is L2-normalised
    (f / max(||f||, 1e-12); a zero row stays zero). Per-row loss:
      kind="l2sq":      ||f_S - f_T||^2 (summed over D)   -- EIKD: mean_i ||f^_S - f^_T||^2
      kind="cosine":    1 - cos(f_S, f_T) (always normalises; `normalize` is ignored)
      kind="smooth_l1": mean over D of Huber_{delta=1}(f_S - f_T) (PyTorch smooth_l1 "mean")
    Reduction: weighted mean over rows. Dimensions must match (project the student first).
    """
    s = cm.flatten_rows(student_feats)
    t = cm.flatten_rows(jax.lax.stop_gradient(teacher_feats))
    if kind == "cosine":
        per_row = 1.0 - jnp.sum(cm.l2_normalize(s) * cm.l2_normalize(t), axis=-1)
    else:
        if normalize:
            s, t = cm.l2_normalize(s), cm.l2_normalize(t)
        if kind == "l2sq":
            per_row = jnp.sum((s - t) ** 2, axis=-1)
        elif kind == "smooth_l1":
            per_row = jnp.mean(cm.huber(s - t), axis=-1)
        else:
            raise ValueError(f"unknown feature loss kind {kind!r}")
    w, valid = cm.row_weights(weights, s.shape[0], s.dtype)
    return cm.weighted_mean(per_row, w, valid)
