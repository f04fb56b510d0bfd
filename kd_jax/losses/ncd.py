"""Novel class discovery pieces: UNO's Sinkhorn-Knopp pseudo-labels and swapped prediction,
and SCKD's spatial mutual information and self-cooperation (Wang et al., Self-Cooperation
Knowledge Distillation for Novel Class Discovery).

Everything is over the global batch (labeled and unlabeled together), so under a sharded
`jax.jit` the value equals the single-device one.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kd_jax.losses import _common as cm
from kd_jax.losses import relational as rel


def sinkhorn_knopp(logits, n_iters=3, epsilon=0.05, weights=None):
    """Balanced soft assignments by Sinkhorn-Knopp (UNO / SwAV; Cuturi 2013), stop-gradient.

    Q = exp(logits / eps) over the global batch; each iteration scales every column (cluster)
    to total 1/K, then every row (sample) to total 1/B; finally Q *= B. So rows sum to exactly 1
    and columns to B/K up to the residual of `n_iters` iterations (UNO: 3 iterations,
    eps = 0.05, logits = cosine similarities to the prototypes before any temperature).
    Computed in log space (no overflow for small eps); UNO's initial global normalisation is
    omitted because the first column step cancels it exactly.

    Args:
      logits: [B, K].
      weights: optional [B]; rows with weight <= 0 are excluded (B counts valid rows only) and
        get all-zero assignments. Real weights are only used as this mask.
    Returns:
      [B, K] assignments (float, stop-gradient).
    """
    x = jax.lax.stop_gradient(cm.as_float(logits))
    n, k = x.shape
    _, valid = cm.row_weights(weights, n, x.dtype)
    vrow = valid[:, None]
    log_q = jnp.where(vrow, x / epsilon, 0.0)
    log_b = jnp.log(jnp.maximum(jnp.sum(valid), 1).astype(x.dtype))
    log_k = math.log(k)

    def body(_, lq):
        lq = (
            lq
            - jax.nn.logsumexp(lq, axis=0, keepdims=True, where=jnp.broadcast_to(vrow, lq.shape))
            - log_k
        )
        lq = lq - jax.nn.logsumexp(lq, axis=1, keepdims=True) - log_b
        return jnp.where(vrow, lq, 0.0)

    log_q = jax.lax.fori_loop(0, n_iters, body, log_q)
    return jnp.where(vrow, jnp.exp(log_q + log_b), 0.0)


def _row_ce(logits, targets, temperature):
    log_p = jax.nn.log_softmax(cm.as_float(logits) / temperature, axis=-1)
    return -jnp.sum(jax.lax.stop_gradient(cm.as_float(targets)) * log_p, axis=-1)


def swapped_prediction_loss(
    logits_view1, logits_view2, targets_view1, targets_view2, temperature=0.1, weights=None
):
    """UNO swapped prediction: each view predicts the targets computed from the other view.

      L = 1/2 [ CE(logits_view1, targets_view2) + CE(logits_view2, targets_view1) ]
      CE(l, t) = sum_i w_i ( -sum_c t_ic log softmax(l_i / tau)_c ) / sum_i w_i

    `targets_viewX` are the targets *made from* view X (e.g. one-hot labels, or
    `sinkhorn_knopp(logits_viewX)` over the novel classes); they are stop-gradient. Logits are
    the raw cosine similarities (UNO divides by tau = 0.1 inside the loss; pass temperature=1
    for already-scaled logits). Leading dims are allowed ([H, B, K] for H heads): the loss is
    averaged over them (UNO averages over heads).
    """
    ce = 0.5 * (
        _row_ce(logits_view1, targets_view2, temperature)
        + _row_ce(logits_view2, targets_view1, temperature)
    )
    n = ce.shape[-1]
    w, valid = cm.row_weights(weights, n, ce.dtype)
    num = jnp.sum(jnp.where(valid, w * ce, 0.0), axis=-1)
    return jnp.mean(cm.safe_div(num, jnp.sum(w)))


def relation_matrix(r, exclude_self=True, weights=None):
    """S_ij = <r^_i, r^_j> with r^ = r / max(||r||, 1e-12)  ([B, B], SCKD §3).

    exclude_self zeroes the diagonal (a sample's relation vector to the *rest* of the batch,
    kept indexed by sample so rows of different samples stay aligned); rows/columns of
    excluded samples (weight <= 0) are zero.
    """
    x = cm.flatten_rows(r)
    _, valid = cm.row_weights(weights, x.shape[0], x.dtype)
    xh = cm.l2_normalize(x)
    mask = cm.pair_mask(valid)
    if exclude_self:
        mask = mask & ~jnp.eye(x.shape[0], dtype=bool)
    return jnp.where(mask, cm.gram(xh), 0.0)


def spatial_mutual_information(r_known, r_novel, temperature=0.1, weights=None):
    """SCKD spatial mutual information L_SMI (sckd.md §3): symmetric InfoNCE on relation vectors.

      u^K_i = normalize(S^K_i,.), u^N_i = normalize(S^N_i,.)   (`relation_matrix`, self excluded)
      L_SMI = -1/2 mean_i [ log softmax_j(<u^K_i, u^N_j> / tau_m)_i
                            + log softmax_j(<u^N_i, u^K_j> / tau_m)_i ]

    j ranges over the valid samples (including i, the positive). Weighted mean over anchors.
    Minimising it maximises an InfoNCE lower bound on I(relations in K; relations in N).
    Args: r_known [B, C_l], r_novel [B, C_u] (probabilities or embeddings); tau_m = 0.1.
    """
    sk = relation_matrix(r_known, weights=weights)
    sn = relation_matrix(r_novel, weights=weights)
    w, valid = cm.row_weights(weights, sk.shape[0], sk.dtype)
    m = cm.gram(cm.l2_normalize(sk), cm.l2_normalize(sn)) / temperature
    colmask = jnp.broadcast_to(valid[None, :], m.shape)
    nll = -0.5 * (
        jnp.diagonal(cm.masked_log_softmax(m, colmask))
        + jnp.diagonal(cm.masked_log_softmax(m.T, colmask))
    )
    return cm.weighted_mean(nll, w, valid)


def self_cooperation_loss(r_known, r_novel, temperature=0.1, direction="both", weights=None):
    """SCKD self-cooperation distillation L_SC (sckd.md §3).

      P_i(j) = softmax_{j != i}(S_ij / tau_r),  S = `relation_matrix` of each space
      both:            L_SC = mean_i [ KL(sg(P^K_i) || P^N_i) + KL(sg(P^N_i) || P^K_i) ]
      known_to_novel:  L_SC = mean_i KL(sg(P^K_i) || P^N_i)
      novel_to_known:  L_SC = mean_i KL(sg(P^N_i) || P^K_i)

    Each KL is `relation_kl_loss` with the stop-gradient side as the teacher; 0 when the two
    relation matrices are equal. Weighted mean over anchors (excluded rows also leave every
    softmax).
    """
    if direction not in ("both", "known_to_novel", "novel_to_known"):
        raise ValueError(f"unknown direction {direction!r}")
    total = 0.0
    if direction in ("both", "known_to_novel"):
        total += rel.relation_kl_loss(r_novel, jax.lax.stop_gradient(r_known), temperature, weights)
    if direction in ("both", "novel_to_known"):
        total += rel.relation_kl_loss(r_known, jax.lax.stop_gradient(r_novel), temperature, weights)
    return total


# ----- SCKD as the paper describes it (sckd.md §6): a frozen replica bridges the two spaces ---


def cross_similarity(
    anchor_feats, query_feats, anchor_weights=None, query_weights=None, normalize=True
):
    """SCKD's similarity score matrix S [N, M], S_ij = cos(a_i, q_j), stop-gradient.

    a = the frozen replica's features of the labeled rows, q = the current encoder's features
    of the unlabeled rows (sckd.md §6). Pairs with an excluded row (weight <= 0) are 0.
    `normalize` divides by max |S| over the valid pairs (the reimplementation's choice), so the
    largest weight is ±1 whatever the feature geometry.
    """
    a = cm.l2_normalize(jax.lax.stop_gradient(cm.flatten_rows(anchor_feats)))
    q = cm.l2_normalize(jax.lax.stop_gradient(cm.flatten_rows(query_feats)))
    _, va = cm.row_weights(anchor_weights, a.shape[0], a.dtype)
    _, vq = cm.row_weights(query_weights, q.shape[0], q.dtype)
    valid = va[:, None] & vq[None, :]
    s = jnp.where(valid, cm.gram(a, q), 0.0)
    if normalize:
        s = cm.safe_div(s, jnp.max(jnp.abs(s)))
    return s


def synthesize_pseudo_labels(similarity, source_logits, alpha=0.1):
    """SCKD's pseudo-label synthesis, stop-gradient: q_j = softmax_c(alpha * sum_i S_ij z_i,c).

    similarity [N, M] (rows = the source samples i, zero for excluded ones), source_logits
    [N, C] -> [M, C] soft targets, one per column j. The sum is over the source rows, not a
    mean, as the sources write it: with alpha = 0.1 a batch's worth of similar labeled rows
    sharpens the target.
    """
    s = jax.lax.stop_gradient(cm.as_float(similarity))
    z = jax.lax.stop_gradient(cm.as_float(source_logits))
    return jax.nn.softmax(alpha * cm.mm(s.T, z), axis=-1)


def pseudo_label_kl(targets, logits, temperature=1.0, weights=None):
    """mean_j KL(q_j || softmax(z_j / T)) over the valid rows j; `targets` are stop-gradient."""
    log_p = jax.nn.log_softmax(cm.as_float(logits) / temperature, axis=-1)
    t = jax.lax.stop_gradient(cm.as_float(targets))
    kl = cm.kl_rows(log_p, t)
    w, valid = cm.row_weights(weights, kl.shape[0], kl.dtype)
    return cm.weighted_mean(kl, w, valid)


def cross_space_distillation(
    similarity, source_logits, target_logits, alpha=0.1, temperature=1.0, target_weights=None
):
    """One direction of SCKD's self-cooperation: targets synthesised from the source rows'
    logits through S, distilled into the target rows' logits of the same head.

      L_k->n: similarity = S [N_l, B], source = novel-head logits of the labeled rows,
              target = novel-head logits, target_weights = the unlabeled rows;
      L_n->k: similarity = S^T [B, N_l] (unlabeled rows as sources), source = known-head logits
              of the unlabeled rows, target = known-head logits, target_weights = labeled rows.

    All arrays are over the global batch (masked rows, not sliced ones), so the value is the
    same on any device count and padding rows change nothing.
    """
    q = synthesize_pseudo_labels(similarity, source_logits, alpha)
    return pseudo_label_kl(q, target_logits, temperature, target_weights)
