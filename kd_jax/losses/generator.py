"""Generator objectives of generator-based data-free KD (DAFL, DFAD, DeepInversion).

    from kd_jax import losses
    g = (losses.one_hot_loss(t_logits) + 0.1 * losses.activation_loss(t_feats)
         + 5 * losses.information_entropy_loss(t_logits))          # DAFL
    g = -losses.adversarial_loss(s_logits, t_logits)                # DFAD (the generator's side)

Unlike the distillation losses, the "teacher" arguments here are NOT stop-gradient: the
generator is trained *through* the frozen teacher (its weights are never differentiated, its
outputs are). Rows follow the package's `weights` convention (a row with weight <= 0 is
excluded, so padded rows change nothing); every term is a mean over the batch, so it is the
same on 1 or 8 devices under a sharded `jit`.

* `one_hot_loss`: DAFL's L_oh, the teacher's cross-entropy against its own argmax.
* `activation_loss`: DAFL's L_a = -mean |f_T| (the mean over rows and feature entries).
* `information_entropy_loss`: DAFL's L_ie = sum_k p̄_k log p̄_k, p̄ the batch-mean softmax
  (the negative entropy of the class balance; minimum -log K at a uniform batch). Natural
  log; DAFL's code uses log10, i.e. its weight `ie` equals ie / ln(10) here.
* `adversarial_loss`: DFAD's mean |z_S - z_T| over rows and classes (`F.l1_loss`); the
  student minimises it, the generator maximises it.
* `batch_moments` / `bn_statistics_loss`: DeepInversion's R_feature,
  sum_l ‖μ_l(x) − μ_l^BN‖₂ + ‖σ²_l(x) − σ²_l^BN‖₂ (biased batch variance, per channel, over
  every axis but the last), μ^BN / σ²^BN the teacher's running statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _common as cm


def one_hot_loss(teacher_logits, weights=None):
    """DAFL L_oh = (1/B) sum_i CE(z_T,i, argmax_c z_T,i) (gradient flows into the logits)."""
    z = cm.as_float(teacher_logits)
    log_p = jax.nn.log_softmax(z, axis=-1)
    target = jax.lax.stop_gradient(jnp.argmax(z, axis=-1))
    ce = -jnp.take_along_axis(log_p, target[:, None], axis=-1)[:, 0]
    w, valid = cm.row_weights(weights, z.shape[0], z.dtype)
    return cm.weighted_mean(ce, w, valid)


def activation_loss(features, weights=None):
    """DAFL L_a = -(1/B) sum_i mean_j |f_i,j| (features [B, ...], flattened per row)."""
    f = cm.flatten_rows(features)
    per_row = jnp.mean(jnp.abs(f), axis=-1)
    w, valid = cm.row_weights(weights, f.shape[0], f.dtype)
    return -cm.weighted_mean(per_row, w, valid)


def information_entropy_loss(teacher_logits, weights=None):
    """DAFL L_ie = sum_k p̄_k log p̄_k with p̄ = sum_i w_i softmax(z_T,i) / sum_i w_i.

    Minimising it spreads the batch over the classes (value -log K when balanced, 0 when every
    row predicts one class with certainty)."""
    z = cm.as_float(teacher_logits)
    p = jax.nn.softmax(z, axis=-1)
    w, valid = cm.row_weights(weights, z.shape[0], z.dtype)
    p = jnp.where(valid[:, None], p, 0.0)
    mean_p = cm.safe_div(jnp.sum(w[:, None] * p, axis=0), jnp.sum(w))
    pos = mean_p > 0
    return jnp.sum(jnp.where(pos, mean_p * jnp.log(jnp.where(pos, mean_p, 1.0)), 0.0))


def adversarial_loss(student_logits, teacher_logits, weights=None):
    """DFAD's discrepancy: (1/B) sum_i mean_c |z_S,i,c - z_T,i,c| (PyTorch `F.l1_loss`).

    Neither side is stopped: the generator's objective is `-adversarial_loss` and needs the
    gradient through both networks; the student's is `+adversarial_loss` (the teacher is then
    constant because only the student's parameters are differentiated)."""
    s, t = cm.as_float(student_logits), cm.as_float(teacher_logits)
    per_row = jnp.mean(jnp.abs(s - t), axis=-1)
    w, valid = cm.row_weights(weights, s.shape[0], s.dtype)
    return cm.weighted_mean(per_row, w, valid)


def batch_moments(x, weights=None):
    """Per-channel (mean, biased variance) of `x` [B, ..., C] over every axis but the last,
    rows weighted by `weights` (the statistics a BatchNorm layer sees in training)."""
    x = cm.as_float(x)
    w, valid = cm.row_weights(weights, x.shape[0], x.dtype)
    w = w.reshape((-1,) + (1,) * (x.ndim - 1))
    x = jnp.where(valid.reshape(w.shape), x, 0.0)
    axes = tuple(range(x.ndim - 1))
    count = jnp.sum(w) * (x.size // (x.shape[0] * x.shape[-1]))
    mean = cm.safe_div(jnp.sum(w * x, axes), count)
    var = cm.safe_div(jnp.sum(w * jnp.square(x - mean), axes), count)
    return mean, var


def bn_statistics_loss(moments):
    """DeepInversion R_feature = sum_l ‖μ_l − μ_l^BN‖₂ + ‖σ²_l − σ²_l^BN‖₂.

    `moments`: a sequence of (batch mean [C], batch var [C], running mean [C], running var
    [C]) per BatchNorm layer (`batch_moments` of the layer's input; running statistics are
    constants). Norms are guarded (finite gradient when a layer matches exactly)."""
    total = jnp.zeros((), jnp.float32)
    for mean, var, run_mean, run_var in moments:
        run_mean = jax.lax.stop_gradient(cm.as_float(run_mean))
        run_var = jax.lax.stop_gradient(cm.as_float(run_var))
        total = total + cm.safe_norm(cm.as_float(mean) - run_mean, axis=None, keepdims=False)
        total = total + cm.safe_norm(cm.as_float(var) - run_var, axis=None, keepdims=False)
    return total
