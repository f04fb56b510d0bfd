"""Batch-relational distillation and contrastive losses.

RKD distance / angle (Park et al., CVPR 2019), SP (Tung & Mori, ICCV 2019), PKT (Passalis &
Tefas, ECCV 2018), relation KL (ODSD's teacher-relation term L_TR), in-batch InfoNCE
(CRD-style instance contrast) and NT-Xent / SupCon (ODSD's student self-relation term L_SR).

All are over the *global* batch: under `jax.jit` with the batch sharded over a mesh they give
the same value as on one device. Inputs [B, ...] are flattened to [B, D].

Weights: a row with weight <= 0 is excluded as an anchor and as a pair partner (the loss over
the remaining rows is exactly the loss of the batch without those rows). Real weights w_i
enter as w_i (anchor losses) or w_i * w_j (pair terms) / w_i * w_j * w_k (triplet terms),
normalised by their sum. "teacher" arguments are stop-gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kd_jax.losses import _common as cm


def _prep(student, teacher, weights):
    s = cm.flatten_rows(student)
    t = cm.flatten_rows(jax.lax.stop_gradient(teacher))
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"batch sizes differ: {s.shape} vs {t.shape}")
    w, valid = cm.row_weights(weights, s.shape[0], s.dtype)
    return s, t, w, valid


# ----------------------------------------------------------------------------------------
# RKD
# ----------------------------------------------------------------------------------------


def rkd_pdist(e, eps=1e-12, valid=None):
    """RKD pairwise distances: sqrt(max(||e_i||^2 + ||e_j||^2 - 2 <e_i, e_j>, eps)), diag 0.

    The squared-norm expansion and the clamp follow lenscloth/RKD `metric/loss.py::pdist`.
    Rows are first centred on the mean of the (valid) rows: distances are unchanged, but the
    float32 cancellation error of the expansion (~1e-7 * ||e||^2) shrinks for features with a
    large common offset (e.g. post-ReLU). Exactly identical rows still get sqrt of rounding
    noise instead of 1e-6, as in the float32 reference code.
    """
    e = cm.flatten_rows(e)
    valid = jnp.ones((e.shape[0],), bool) if valid is None else valid
    center = cm.safe_div(jnp.sum(jnp.where(valid[:, None], e, 0.0), axis=0), jnp.sum(valid))
    e = jnp.where(valid[:, None], e - jax.lax.stop_gradient(center), 0.0)
    sq = jnp.sum(e * e, axis=-1)
    prod = cm.gram(e)  # HIGHEST precision: the expansion cancels
    d2 = sq[:, None] + sq[None, :] - 2.0 * prod
    d = jnp.sqrt(jnp.maximum(d2, eps))
    n = e.shape[0]
    return jnp.where(jnp.eye(n, dtype=bool), 0.0, d)


def _normalised_pdist(e, pairs, valid):
    d = rkd_pdist(e, valid=valid)
    pos = pairs & (d > 0)
    mu = cm.safe_div(jnp.sum(jnp.where(pos, d, 0.0)), jnp.sum(pos))
    return cm.safe_div(d, mu)


def rkd_distance_loss(student, teacher, weights=None):
    """RKD distance loss (Park et al. 2019, Eq. 3-5), lenscloth/RKD conventions.

      d_ij = sqrt(max(||t_i||^2 + ||t_j||^2 - 2<t_i,t_j>, 1e-12)), d_ii = 0
      psi_ij = d_ij / mu,  mu = mean of the positive d_ij (i != j), separately for T and S
      L_D = (1/N^2) sum_{i,j} Huber_{delta=1}(psi^S_ij - psi^T_ij)

    The mean is over all N^2 entries (the zero diagonal included), as in the reference code.
    With weights: pairs of valid rows only, term weights w_i w_j, denominator (sum_i w_i)^2 (the
    N^2 of the valid subset); mu is the plain mean over the valid positive pairs (weights only
    select rows there). Distances use the centred features (`rkd_pdist`), which changes no
    value but shrinks the float32 cancellation of the expansion.

    Args: student [B, D_S], teacher [B, D_T] (D may differ); weights [B]. Returns a scalar.
    Paper weight lambda_D = 25 (applied by the caller).
    """
    s, t, w, valid = _prep(student, teacher, weights)
    pairs = cm.pair_mask(valid)
    psi_s = _normalised_pdist(s, pairs, valid)
    psi_t = _normalised_pdist(t, pairs, valid)
    ww = w[:, None] * w[None, :]
    h = jnp.where(pairs, ww * cm.huber(psi_s - psi_t), 0.0)
    return cm.safe_div(jnp.sum(h), jnp.sum(w) ** 2)


def _auto_chunk(n, width):
    # Keep the largest per-chunk temporary (c x N x width floats) near 16M floats (64 MiB).
    c = (1 << 24) // max(1, n * width)
    return int(max(1, min(n, c)))


def rkd_angle_loss(student, teacher, weights=None, chunk_size=None, method="exact"):
    """RKD angle loss (Park et al. 2019, Eq. 6-7), lenscloth/RKD conventions.

      e_ij = (t_i - t_j) / max(||t_i - t_j||, 1e-12)   (zero difference vectors stay zero;
             a difference below 1e-6 * max(||t_i||, ||t_j||), i.e. float32 rounding of
             identical rows, also counts as zero -- robust to FMA contraction under jit)
      phi_ijk = <e_ij, e_kj>                            (angle at the anchor j)
      L_A = (1/N^3) sum_{i,j,k} Huber_{delta=1}(phi^S_ijk - phi^T_ijk)

    The mean is over all N^3 entries (degenerate i = j or k = j entries are 0 - 0), as in the
    reference code. With weights: triplets of valid rows, term weights w_i w_j w_k, denominator
    (sum_i w_i)^3.

    method="exact" (default, the reference computation): for each anchor j the [N, D]
      normalised differences E_j are formed and phi_{.j.} = E_j E_j^T ([N, N]) by a batched
      matmul. Compute O(N^3 D) like the reference (fine on an accelerator; minutes on a CPU
      at N = 1024, D = 512).
    method="gram": the same angles from the N x N Gram matrix of the centred features,
      <x_i - x_j, x_k - x_j> = G_ik - G_ij - G_jk + G_jj and ||x_i - x_j||^2 from G, so compute
      is O(N^2 D + N^3) -- hundreds of times faster on a CPU. Float32 cancellation makes it
      approximate: ~1e-6 relative error on well-spread features, larger for near-duplicate rows;
      a pair closer than ~0.3 % of the (centred) norms counts as identical (e_ij = 0).
    Memory (both): never holds an N x N x N x D nor an N x N x N tensor; anchors are processed
    `chunk_size` at a time with `jax.lax.map` under `jax.checkpoint` (a single chunk: directly),
    so forward and backward peak memory is O(chunk * N * max(N, D)) (a few hundred MiB at
    N = 1024, D = 512).

    Args: student [B, D_S], teacher [B, D_T]; weights [B]; chunk_size anchors per step (auto).
    Returns a scalar. Paper weight lambda_A = 50 (applied by the caller).
    """
    s, t, w, valid = _prep(student, teacher, weights)
    n = s.shape[0]
    if method == "exact":
        width = max(n, s.shape[1], t.shape[1])
    elif method == "gram":
        width = n
    else:
        raise ValueError(f"unknown method {method!r}")
    c = chunk_size or _auto_chunk(n, width)
    n_chunks = -(-n // c)
    pad = n_chunks * c - n
    anchors = jnp.concatenate([jnp.arange(n), jnp.zeros((pad,), jnp.int32)]).reshape(n_chunks, c)
    w_anchor = jnp.concatenate([w, jnp.zeros((pad,), w.dtype)]).reshape(n_chunks, c)
    pairs = cm.pair_mask(valid)
    ww = jnp.where(pairs, w[:, None] * w[None, :], 0.0)
    rows = jnp.arange(n)

    if method == "exact":

        def prepare(x):
            return x, cm.safe_norm(x, keepdims=False)

        def angles(x, norms, idx):
            diff = x[None, :, :] - x[idx][:, None, :]  # [c, N, D]: x_i - x_j, anchors j
            dn = cm.safe_norm(diff)  # [c, N, 1]
            # "Zero vectors stay zero": i == j, and identical rows whose difference is only float
            # rounding (XLA contracts a fused producer into FMAs, so x_i - x_i need not be exactly
            # 0 under jit) -- a difference below 1e-6 of the row norms counts as zero.
            tiny = 1e-6 * jnp.maximum(norms[None, :], norms[idx][:, None])[..., None]
            keep = (dn > tiny) & (rows[None, :] != idx[:, None])[..., None]
            e = jnp.where(keep, diff / jnp.maximum(dn, 1e-12), 0.0)
            return jnp.einsum("jid,jkd->jik", e, e, precision=cm.HIGHEST)  # [c, N, N]
    else:

        def prepare(x):
            center = cm.safe_div(jnp.sum(jnp.where(valid[:, None], x, 0.0), axis=0), jnp.sum(valid))
            x = jnp.where(valid[:, None], x - jax.lax.stop_gradient(center), 0.0)
            return cm.gram(x), jnp.sum(x * x, axis=-1)

        def angles(g, sq, idx):
            g_j = g[idx]  # [c, N]: G_ji
            sq_j = sq[idx]
            num = g[None] - g_j[:, :, None] - g_j[:, None, :] + sq_j[:, None, None]
            d2 = sq[None, :] + sq_j[:, None] - 2.0 * g_j  # [c, N]: ||x_i - x_j||^2
            keep = (d2 > 1e-5 * (sq[None, :] + sq_j[:, None])) & (rows[None, :] != idx[:, None])
            inv = jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, d2, 1.0)), 0.0)
            return jnp.clip(num * inv[:, :, None] * inv[:, None, :], -1.0, 1.0)

    ps, pt = prepare(s), prepare(t)

    def chunk_sum(args):
        idx, wa = args
        h = cm.huber(angles(*ps, idx) - angles(*pt, idx))
        h = jnp.where((wa > 0)[:, None, None] & pairs[None], h, 0.0)
        return jnp.einsum("jik,ik,j->", h, ww, wa, precision=cm.HIGHEST)

    if n_chunks == 1:  # all anchors fit one chunk: no loop and no recomputation in the backward
        total = chunk_sum((anchors[0], w_anchor[0]))
    else:
        total = jnp.sum(jax.lax.map(jax.checkpoint(chunk_sum), (anchors, w_anchor)))
    return cm.safe_div(total, jnp.sum(w) ** 3)


# ----------------------------------------------------------------------------------------
# SP, PKT, relation KL
# ----------------------------------------------------------------------------------------


def similarity_preserving_loss(student, teacher, weights=None):
    """Similarity-preserving KD (Tung & Mori 2019, Eq. 2-4).

      G = Q Q^T (Q = features flattened to [B, D]), G~ = row-L2-normalised G
      L_SP = (1/B^2) ||G~_T - G~_S||_F^2

    With weights: G is restricted to valid rows/columns before the row normalisation, the
    squared entries are weighted by w_i w_j and divided by (sum_i w_i)^2.
    """
    s, t, w, valid = _prep(student, teacher, weights)
    pairs = cm.pair_mask(valid)

    def gram(x):
        g = jnp.where(pairs, cm.gram(x), 0.0)
        return cm.l2_normalize(g, axis=-1)

    diff = gram(s) - gram(t)
    ww = w[:, None] * w[None, :]
    return cm.safe_div(jnp.sum(jnp.where(pairs, ww * diff * diff, 0.0)), jnp.sum(w) ** 2)


def pkt_loss(student, teacher, weights=None, eps=1e-7):
    """Probabilistic knowledge transfer (Passalis & Tefas 2018), reference-code convention.

      x^ = x / (||x|| + eps);  K_ij = (<x^_i, x^_j> + 1) / 2  in [0, 1]  (diagonal included)
      P_ij = K_ij / sum_j K_ij  (row-normalised, for T and S)
      L_PKT = (1/B^2) sum_{i,j} P^T_ij log((P^T_ij + eps) / (P^S_ij + eps))

    The average over all B^2 entries (not a per-row KL sum) follows the authors' code
    (passalis/probabilistic_kt, also RepDistiller), so the value is about mean_i KL_i / B;
    RepDistiller's weight is 30000. With weights: rows/columns of excluded samples are removed
    before the row normalisation; entries weighted by w_i w_j / (sum_i w_i)^2.
    """
    s, t, w, valid = _prep(student, teacher, weights)
    pairs = cm.pair_mask(valid)

    def cond_prob(x):
        xh = x / (cm.safe_norm(x) + eps)
        k = jnp.where(pairs, (cm.gram(xh) + 1.0) / 2.0, 0.0)
        return cm.safe_div(k, jnp.sum(k, axis=-1, keepdims=True))

    ps, pt = cond_prob(s), cond_prob(t)
    terms = pt * jnp.log((pt + eps) / (ps + eps))
    ww = w[:, None] * w[None, :]
    return cm.safe_div(jnp.sum(jnp.where(pairs, ww * terms, 0.0)), jnp.sum(w) ** 2)


def relation_log_probs(x, temperature, valid):
    """log P_i(j) = log softmax_{j != i, j valid}(<x^_i, x^_j> / tau); [B, B] and its mask."""
    xh = cm.l2_normalize(x)
    mask = cm.pair_mask(valid) & ~jnp.eye(x.shape[0], dtype=bool)
    return cm.masked_log_softmax(cm.gram(xh) / temperature, mask), mask


def relation_kl_loss(student, teacher, temperature=0.5, weights=None):
    """KL between row-softmaxed cosine-similarity matrices (ODSD L_TR, odsd.md §3a).

      A_ij = <e_i, e_j> with e = x / max(||x||, 1e-12), j != i (self excluded)
      P_i(j) = softmax_{j != i}(A_ij / tau_r)
      L_TR = sum_i w_i KL(P^T_i || P^S_i) / sum_i w_i

    w_i are per-anchor weights (ODSD: teacher confidence c_1,i); rows with w_i <= 0 are also
    dropped from every other row's softmax. Zero for student == teacher; needs >= 2 valid rows
    (an anchor without partners contributes 0). Also the self-cooperation KL of SCKD.

    Args: student [B, D_S], teacher [B, D_T] (stop-gradient), temperature tau_r, weights [B].
    """
    s, t, w, valid = _prep(student, teacher, weights)
    log_ps, mask = relation_log_probs(s, temperature, valid)
    log_pt, _ = relation_log_probs(t, temperature, valid)
    pt = jnp.exp(log_pt)
    kl = jnp.sum(jnp.where(mask, pt * (log_pt - log_ps), 0.0), axis=-1)
    return cm.weighted_mean(kl, w, valid)


# ----------------------------------------------------------------------------------------
# Contrastive
# ----------------------------------------------------------------------------------------


def info_nce(query, key, temperature=0.1, weights=None, symmetric=False):
    """In-batch InfoNCE (CRD-style instance contrast; van den Oord et al. 2018, Eq. 4).

      L = -sum_i w_i log( exp(<q^_i, k^_i>/tau) / sum_j exp(<q^_i, k^_j>/tau) ) / sum_i w_i

    q^, k^ L2-normalised; the positive of query i is key i, the other valid keys of the batch
    are the negatives. symmetric=True averages with the key -> query direction. Neither side is
    stop-gradient (both embedding heads learn, as in CRD). Lower bound: log(B) - L <= I(q; k).
    """
    q = cm.flatten_rows(query)
    k = cm.flatten_rows(key)
    w, valid = cm.row_weights(weights, q.shape[0], q.dtype)
    logits = cm.gram(cm.l2_normalize(q), cm.l2_normalize(k)) / temperature
    colmask = jnp.broadcast_to(valid[None, :], logits.shape)
    nll = -jnp.diagonal(cm.masked_log_softmax(logits, colmask))
    if symmetric:
        nll = 0.5 * (nll - jnp.diagonal(cm.masked_log_softmax(logits.T, colmask)))
    return cm.weighted_mean(nll, w, valid)


def nt_xent(z1, z2, temperature=0.5, positives=None, weights=None):
    """SimCLR NT-Xent over 2B embeddings; SupCon positives from pseudo-labels (ODSD L_SR).

    z = [z1; z2] L2-normalised ([2B, D]), s_ab = <z_a, z_b> / tau, a != b.
      instance (positives=None): P(a) = {the other view of a}   (Chen et al. 2020, Eq. 1)
      positives=[B] int labels: P(a) = {b != a : y_b = y_a} U {other view of a}; a label < 0
        means "no pseudo-label" (instance positive only).    (Khosla et al. 2020, L^sup_out)
      L = sum_a w_a [ -(1/|P(a)|) sum_{p in P(a)} log softmax_{b != a}(s_ab)_p ] / sum_a w_a
    (mean over the 2B anchors; SupCon's tau/base_tau factor is not applied). weights [B] apply
    to both views.
    """
    a = cm.flatten_rows(z1)
    b = cm.flatten_rows(z2)
    n = a.shape[0]
    z = cm.l2_normalize(jnp.concatenate([a, b], axis=0))
    w, valid = cm.row_weights(weights, n, z.dtype)
    w2 = jnp.concatenate([w, w])
    valid2 = jnp.concatenate([valid, valid])
    idx = jnp.arange(2 * n)
    not_self = idx[:, None] != idx[None, :]
    mask = cm.pair_mask(valid2) & not_self
    log_prob = cm.masked_log_softmax(cm.gram(z) / temperature, mask)
    pos = idx[None, :] == ((idx + n) % (2 * n))[:, None]
    if positives is not None:
        y = jnp.asarray(positives).reshape(n)
        y2 = jnp.concatenate([y, y])
        pos = pos | ((y2[:, None] == y2[None, :]) & (y2[:, None] >= 0))
    pos = pos & mask
    n_pos = jnp.sum(pos, axis=-1)
    per_anchor = -cm.safe_div(jnp.sum(jnp.where(pos, log_prob, 0.0), axis=-1), n_pos)
    return cm.weighted_mean(per_anchor, w2, valid2)
