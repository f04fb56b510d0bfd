"""Sampling scores and selection for open-world pools (EIKD §1, ODSD §1 APS).

Sign convention: **every score is "higher = more wanted"** (more confident, more
in-distribution, closer to a prototype, or — for `disagreement_score` — less learned by the
student). DFND's s(x) = -log max p_T ("low = confident") ranks identically to
`confidence_score`, reversed in sign.

Ordering convention: items are ranked by (score descending, id ascending). With unique ids
this is a strict total order, so every selection here is deterministic and invariant to
permuting the pool (pass `ids`; without them the position is the id). NaN scores rank as
-inf; -0.0 equals 0.0.

Pure `jax.numpy`; selections have static output sizes and work under `jit`. Streaming
selection (`merge_top_k`, `merge_class_top_k`) keeps O(k) state so a pool of any size is
selected in one pass and per-host states merge with `merge_top_k_states`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kd_jax.losses import _common as cm

EMPTY_ID = int(jnp.iinfo(jnp.int32).max)
"""Id of an empty slot in a streaming state (sorts after every real id)."""


# ----------------------------------------------------------------------------------------
# Scores
# ----------------------------------------------------------------------------------------


def confidence_score(logits, temperature=1.0):
    """max_c softmax(z / T)_c ([..., C] -> [...]). EIKD/DFND confidence."""
    return jnp.max(jax.nn.softmax(cm.as_float(logits) / temperature, axis=-1), axis=-1)


def entropy_score(logits, temperature=1.0):
    """Negative entropy sum_c p_c log p_c of p = softmax(z / T) (0 for one-hot, -log C uniform)."""
    log_p = jax.nn.log_softmax(cm.as_float(logits) / temperature, axis=-1)
    return jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def energy_score(logits, temperature=1.0):
    """T * logsumexp(z / T) = -E(x) (Liu et al. 2020, energy-based OOD: higher = in-distribution)."""
    return temperature * jax.nn.logsumexp(cm.as_float(logits) / temperature, axis=-1)


def margin_score(logits, temperature=1.0):
    """p_(1) - p_(2): gap between the two largest probabilities of softmax(z / T) (C >= 2)."""
    p = jax.nn.softmax(cm.as_float(logits) / temperature, axis=-1)
    top2, _ = jax.lax.top_k(p, 2)
    return top2[..., 0] - top2[..., 1]


def disagreement_score(teacher_logits, student_logits, temperature=1.0):
    """KL(p_T || p_S) per item, p = softmax(z / T) (ODSD §1F refresh: prefer the unlearned)."""
    log_q = jax.nn.log_softmax(cm.as_float(student_logits) / temperature, axis=-1)
    p = jax.nn.softmax(cm.as_float(teacher_logits) / temperature, axis=-1)
    return cm.kl_rows(log_q, p)


def image_statistics(logits):
    """Per-image teacher statistics of a classifier, [B, C] logits -> dict of [B] arrays:
    `pred` (argmax), `confidence` (max p), `entropy` (H(p)), `energy` (logsumexp z),
    `margin` (p_1 - p_2). What the pool pass (`kd_jax.pool.score_pool`) records per image."""
    z = jnp.asarray(logits).astype(jnp.float32)
    logp = jax.nn.log_softmax(z)
    p = jnp.exp(logp)
    top2 = jax.lax.top_k(p, 2)[0]
    return {
        "pred": jnp.argmax(z, -1).astype(jnp.int32),
        "confidence": top2[:, 0],
        "entropy": -jnp.sum(p * logp, -1),
        "energy": jax.nn.logsumexp(z, -1),
        "margin": top2[:, 0] - top2[:, 1],
    }


def segmentation_image_statistics(logits, background=None, pixel_mask=None):
    """ODSD §5: per-image statistics of a segmentation teacher, [B, H, W, C] pixel logits ->
    the same keys as `image_statistics`, each a mean over the image's counted pixels:

    * `confidence`: mean over pixels of max_c p(c|pixel), APS's image score;
    * `pred`: the image's class for APS's class balance, its dominant non-background class by
      *soft* pixel share, argmax_{c != background} mean_pixels p(c|pixel) (ties: smaller c).
      Soft rather than counted (argmax) pixels: a teacher that labels every pixel background
      (a weak one, or an image with no object) still ranks the foreground classes, where
      counts would tie at 0 and send every image to class 0. `background` None (e.g. NYUv2's
      13 classes) takes the argmax over every class;
    * `entropy`, `energy`, `margin`: pixel means of H(p), logsumexp(z), p_1 - p_2;
    * `share` [B, C]: the soft pixel share itself.

    `pixel_mask` [B, H, W] (1 = counted; 0 = padding or ignored) leaves the other pixels out
    of every mean; an image without a counted pixel gets 0 statistics and `pred` = the
    smallest foreground class.
    """
    z = cm.as_float(logits)  # float32 or wider (the float64 reference tests)
    b = z.shape[0]
    logp = jax.nn.log_softmax(z)
    p = jnp.exp(logp)
    top2 = jax.lax.top_k(p, 2)[0]
    w = jnp.ones(z.shape[:-1], jnp.float32) if pixel_mask is None else pixel_mask
    w = (jnp.asarray(w) > 0).astype(z.dtype).reshape(b, -1)
    count = jnp.sum(w, -1)

    def mean(x):  # [B, H, W(, K)] -> [B(, K)], over counted pixels
        x = x.reshape((b, w.shape[1]) + x.shape[3:])
        wx = w.reshape(w.shape + (1,) * (x.ndim - 2))
        # where, not a product: a NaN at an uncounted pixel must not leak into the mean
        total = jnp.sum(jnp.where(wx > 0, x, 0.0), 1)
        return cm.safe_div(total, count.reshape((b,) + (1,) * (x.ndim - 2)))

    share = mean(p)
    fg = share if background is None else share.at[:, background].set(-1.0)
    return {
        "pred": jnp.argmax(fg, -1).astype(jnp.int32),
        "confidence": mean(top2[..., 0]),
        "entropy": mean(-jnp.sum(p * logp, -1)),
        "energy": mean(jax.nn.logsumexp(z, -1)),
        "margin": mean(top2[..., 0] - top2[..., 1]),
        "share": share,
    }


def class_prototypes(features, labels, num_classes, weights=None, normalize_features=True):
    """Normalised class means mu_c = normalize(sum_{i: y_i = c} w_i f^_i)  ([N, D] -> [C, D]).

    f^ = f / ||f|| when `normalize_features` (ODSD §1B: mean of normalised teacher features).
    Labels outside [0, C) and rows with weight <= 0 are ignored; a class with no member gets a
    zero prototype (cosine 0 to everything).
    """
    f = cm.flatten_rows(features)
    if normalize_features:
        f = cm.l2_normalize(f)
    w, _ = cm.row_weights(weights, f.shape[0], f.dtype)
    sums = (
        jnp.zeros((num_classes, f.shape[1]), f.dtype)
        .at[jnp.asarray(labels)]
        .add(w[:, None] * f, mode="drop")
    )
    return cm.l2_normalize(sums)


def prototype_similarities(features, prototypes):
    """Cosine similarities [N, C] between features [N, D] and prototypes [C, D]."""
    f = cm.l2_normalize(cm.flatten_rows(features))
    mu = cm.l2_normalize(cm.as_float(prototypes))
    return cm.gram(f, mu)


def prototype_score(features, prototypes, classes=None):
    """Cosine to a prototype ([N]).

    classes given ([N] int, e.g. the teacher's argmax y^): cos(f_i, mu_{classes_i}) — the APS
    score of ODSD §1D. classes=None: the cosine to the *nearest* prototype, max_c cos(f_i, mu_c).
    """
    sims = prototype_similarities(features, prototypes)
    if classes is None:
        return jnp.max(sims, axis=-1)
    return jnp.take_along_axis(sims, jnp.asarray(classes)[:, None], axis=-1)[:, 0]


# ----------------------------------------------------------------------------------------
# Ranking helpers
# ----------------------------------------------------------------------------------------


def _clean(scores):
    s = cm.as_float(scores)
    return jnp.where(jnp.isnan(s), -jnp.inf, s) + 0.0


def _default_ids(n, ids):
    return jnp.arange(n, dtype=jnp.int32) if ids is None else jnp.asarray(ids)


def _starts(keys_sorted_equal_prev):
    """For a sorted array, index of the first element of each element's run."""
    pos = jnp.arange(keys_sorted_equal_prev.shape[0])
    return jax.lax.cummax(jnp.where(keys_sorted_equal_prev, 0, pos), axis=0)


def _ends(keys_sorted_equal_next):
    pos = jnp.arange(keys_sorted_equal_next.shape[0])
    n = keys_sorted_equal_next.shape[0]
    return jax.lax.cummin(jnp.where(keys_sorted_equal_next, n - 1, pos), axis=0, reverse=True)


def _same_as_prev(*cols):
    eq = jnp.ones(cols[0].shape[0], bool)
    for c in cols:
        eq = eq & jnp.concatenate([jnp.zeros((1,), bool), c[1:] == c[:-1]])
    return eq


def _same_as_next(*cols):
    eq = jnp.ones(cols[0].shape[0], bool)
    for c in cols:
        eq = eq & jnp.concatenate([c[1:] == c[:-1], jnp.zeros((1,), bool)])
    return eq


def _unsort(perm, values):
    return jnp.zeros_like(values).at[perm].set(values)


def within_class_rank(scores, classes, ids=None):
    """Ordinal rank of each item inside its class, 0 = best (score desc, id asc). [N] int."""
    s = _clean(scores)
    n = s.shape[0]
    ids = _default_ids(n, ids)
    cls = jnp.asarray(classes)
    cls_s, _, _, perm = jax.lax.sort((cls, -s, ids, jnp.arange(n)), num_keys=3)
    rank_sorted = jnp.arange(n) - _starts(_same_as_prev(cls_s))
    return _unsort(perm, rank_sorted)


def rank01(scores, classes=None):
    """Within-class percentile in [0, 1] (ODSD §1D rank01); higher score -> closer to 1.

    rank01_i = (#{j in c(i): s_j < s_i} + (#{j in c(i): s_j = s_i} - 1) / 2) / (n_c - 1)
    (mid-rank for ties, so it is permutation invariant without ids); a class with one member
    gives 1.0. classes=None ranks the whole array as one class.
    """
    s = _clean(scores)
    n = s.shape[0]
    cls = jnp.zeros((n,), jnp.int32) if classes is None else jnp.asarray(classes)
    cls_s, s_s, perm = jax.lax.sort((cls, s, jnp.arange(n)), num_keys=2)
    cls_start = _starts(_same_as_prev(cls_s))
    cls_end = _ends(_same_as_next(cls_s))
    tie_start = _starts(_same_as_prev(cls_s, s_s))
    tie_end = _ends(_same_as_next(cls_s, s_s))
    n_c = (cls_end - cls_start + 1).astype(s.dtype)
    mid = (tie_start - cls_start).astype(s.dtype) + 0.5 * (tie_end - tie_start).astype(s.dtype)
    r = jnp.where(n_c > 1, mid / jnp.maximum(n_c - 1, 1), 1.0)
    return _unsort(perm, r)


# ----------------------------------------------------------------------------------------
# In-memory selection
# ----------------------------------------------------------------------------------------


def select_top_k(scores, k, ids=None):
    """Indices [min(k, N)] of the k best items, best first (score desc, id asc)."""
    s = _clean(scores)
    n = s.shape[0]
    ids = _default_ids(n, ids)
    _, _, perm = jax.lax.sort((-s, ids, jnp.arange(n)), num_keys=2)
    return perm[: min(int(k), n)]


def select_class_balanced(
    scores, classes, per_class, num_classes, ids=None, priority=None, total=None
):
    """Class-balanced selection with the shortfall filled from the global ranking (EIKD §1).

    1. Quota: in each class c in [0, C) the `per_class` best items (order: priority first, then
       score desc, id asc).
    2. Fill: if some classes hold fewer than `per_class` items, the remaining slots go to the
       best not-yet-selected items of the global ranking (same order; items with a class
       outside [0, C) are only eligible here).
    Returns M = min(N, total or per_class * C) unique indices: the quota picks (priority first,
    then by score) followed by the fill. With unique `ids`, permuting the input selects the same
    ids. `priority` ([N] bool, e.g. ODSD's quantile gate G_c) ranks gated items before ungated
    ones, so "top of G_c first, shortfall from A_c minus G_c" is one call. If `total` is smaller
    than per_class * C, the lowest quota picks are dropped.
    """
    s = _clean(scores)
    n = s.shape[0]
    ids = _default_ids(n, ids)
    cls = jnp.asarray(classes)
    in_range = (cls >= 0) & (cls < num_classes)
    if priority is None:
        not_prio = jnp.zeros((n,), jnp.int32)
    else:
        not_prio = (~jnp.asarray(priority, bool)).astype(jnp.int32)
    cls_key = jnp.where(in_range, cls, num_classes)
    cls_s, _, _, _, perm = jax.lax.sort((cls_key, not_prio, -s, ids, jnp.arange(n)), num_keys=4)
    rank_sorted = jnp.arange(n) - _starts(_same_as_prev(cls_s))
    quota_sorted = (cls_s < num_classes) & (rank_sorted < per_class)
    quota = _unsort(perm, quota_sorted)
    _, _, _, _, order = jax.lax.sort(
        ((~quota).astype(jnp.int32), not_prio, -s, ids, jnp.arange(n)), num_keys=4
    )
    m = per_class * num_classes if total is None else total
    return order[: min(int(m), n)]


# ----------------------------------------------------------------------------------------
# Streaming selection
# ----------------------------------------------------------------------------------------


class TopKState(NamedTuple):
    """The k best items seen so far, best first. Empty slots: score -inf, id EMPTY_ID, zero payload.

    scores [k] float32, ids [k] int32, payload: pytree of [k, ...] arrays (or None).
    """

    scores: jax.Array
    ids: jax.Array
    payload: Any = None


class ClassTopKState(NamedTuple):
    """Per-class k best items: scores [C, k], ids [C, k], payload pytree of [C, k, ...] (or None)."""

    scores: jax.Array
    ids: jax.Array
    payload: Any = None


def _zeros_payload(lead, payload_spec):
    if payload_spec is None:
        return None
    return jax.tree.map(lambda x: jnp.zeros(tuple(lead) + tuple(x.shape), x.dtype), payload_spec)


def init_top_k(k, payload_spec=None):
    """Empty `TopKState` for k items.

    payload_spec: optional pytree of per-item `jax.ShapeDtypeStruct`s (or example arrays),
    e.g. {"cls": jax.ShapeDtypeStruct((), jnp.int32), "feat": jax.ShapeDtypeStruct((512,),
    jnp.float16)}, carried along with each kept item.
    """
    return TopKState(
        jnp.full((k,), -jnp.inf, jnp.float32),
        jnp.full((k,), EMPTY_ID, jnp.int32),
        _zeros_payload((k,), payload_spec),
    )


def _chunk_arrays(scores, ids, mask):
    s = _clean(scores).astype(jnp.float32)
    ids = jnp.asarray(ids, jnp.int32)
    if mask is not None:
        mask = jnp.asarray(mask, bool)
        s = jnp.where(mask, s, -jnp.inf)
        ids = jnp.where(mask, ids, EMPTY_ID)
    return s, ids


def _zero_empty(payload, keep):
    if payload is None:
        return None

    def z(x):
        return jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim)), x, 0)

    return jax.tree.map(z, payload)


def merge_top_k(state, scores, ids, payload=None, mask=None):
    """Fold a chunk ([n] scores, [n] unique int ids, payload pytree of [n, ...]) into `state`.

    Keeps the k best of state U chunk by (score desc, id asc); `mask` [n] drops padded items.
    Order-independent: folding chunks in any order (or merging per-host states) gives the
    result of one full sort. Memory O(k + n). jit-able (shapes are static).
    """
    s, ids = _chunk_arrays(scores, ids, mask)
    k = state.scores.shape[0]
    all_s = jnp.concatenate([state.scores, s])
    all_id = jnp.concatenate([state.ids, ids])
    _, _, perm = jax.lax.sort((-all_s, all_id, jnp.arange(all_s.shape[0])), num_keys=2)
    idx = perm[:k]
    new_ids = all_id[idx]
    new_payload = None
    if state.payload is not None:
        new_payload = jax.tree.map(
            lambda a, b: jnp.concatenate([a, b.astype(a.dtype)])[idx], state.payload, payload
        )
        new_payload = _zero_empty(new_payload, new_ids != EMPTY_ID)
    return TopKState(all_s[idx], new_ids, new_payload)


def merge_top_k_states(a, b):
    """Merge two `TopKState`s (e.g. from two hosts): the k best of their union."""
    return merge_top_k(a, b.scores, b.ids, b.payload)


def init_class_top_k(num_classes, k, payload_spec=None):
    """Empty `ClassTopKState`: k slots for each of C classes."""
    return ClassTopKState(
        jnp.full((num_classes, k), -jnp.inf, jnp.float32),
        jnp.full((num_classes, k), EMPTY_ID, jnp.int32),
        _zeros_payload((num_classes, k), payload_spec),
    )


def merge_class_top_k(state, scores, classes, ids, payload=None, mask=None):
    """Fold a chunk into per-class heaps: each class keeps its k best (score desc, id asc).

    Items whose class is outside [0, C) or whose `mask` is False are dropped. Memory
    O(C * (k + n)) per call — keep chunks moderate. Order-independent like `merge_top_k`.
    """
    s, ids = _chunk_arrays(scores, ids, mask)
    num_classes, k = state.scores.shape
    n = s.shape[0]
    member = jnp.asarray(classes)[None, :] == jnp.arange(num_classes)[:, None]  # [C, n]
    cand_s = jnp.concatenate([state.scores, jnp.where(member, s[None], -jnp.inf)], axis=1)
    cand_id = jnp.concatenate([state.ids, jnp.where(member, ids[None], EMPTY_ID)], axis=1)
    iota = jnp.broadcast_to(jnp.arange(k + n), cand_s.shape)
    _, _, perm = jax.lax.sort((-cand_s, cand_id, iota), dimension=1, num_keys=2)
    idx = perm[:, :k]  # [C, k]
    new_s = jnp.take_along_axis(cand_s, idx, axis=1)
    new_ids = jnp.take_along_axis(cand_id, idx, axis=1)
    new_payload = None
    if state.payload is not None:
        row = jnp.arange(num_classes)[:, None]
        flat_idx = jnp.where(idx < k, row * k + idx, num_classes * k + idx - k)

        def gather(a, b):
            pool = jnp.concatenate([a.reshape((num_classes * k,) + a.shape[2:]), b.astype(a.dtype)])
            return pool[flat_idx]

        new_payload = _zero_empty(jax.tree.map(gather, state.payload, payload), new_ids != EMPTY_ID)
    return ClassTopKState(new_s, new_ids, new_payload)


def merge_class_top_k_states(a, b):
    """Merge two `ClassTopKState`s class by class."""
    num_classes, k = b.scores.shape
    classes = jnp.repeat(jnp.arange(num_classes), k)
    payload = (
        None
        if b.payload is None
        else jax.tree.map(lambda x: x.reshape((num_classes * k,) + x.shape[2:]), b.payload)
    )
    return merge_class_top_k(
        a,
        b.scores.reshape(-1),
        classes,
        b.ids.reshape(-1),
        payload,
        mask=b.ids.reshape(-1) != EMPTY_ID,
    )


def flatten_class_top_k(state):
    """Per-class heaps -> flat candidate arrays for in-memory selection.

    Returns (scores [C*k], ids [C*k], classes [C*k], payload pytree of [C*k, ...], valid [C*k]);
    empty slots have valid = False (give them to selections as `mask`/weights or drop them).
    """
    num_classes, k = state.scores.shape
    classes = jnp.repeat(jnp.arange(num_classes, dtype=jnp.int32), k)
    payload = (
        None
        if state.payload is None
        else jax.tree.map(lambda x: x.reshape((num_classes * k,) + x.shape[2:]), state.payload)
    )
    ids = state.ids.reshape(-1)
    return state.scores.reshape(-1), ids, classes, payload, ids != EMPTY_ID


# ----------------------------------------------------------------------------------------
# APS (ODSD §1) pure pieces, on the candidates held in memory
# ----------------------------------------------------------------------------------------


def refine_prototypes(
    features_normed, pred_classes, init_prototypes, top_n, rounds=2, weights=None, ids=None
):
    """ODSD §1B prototype refinement.

    Repeat `rounds` times: for each class c, rank A_c = {u : y^(u) = c} by <f^_u, mu_c>
    (desc, ties by id), and set mu_c = normalize(mean of the top-n_c f^_u). A class with no
    member keeps its previous prototype.

    Args:
      features_normed: [N, D] L2-normalised teacher features f^.
      pred_classes: [N] int teacher argmax y^ (values outside [0, C) are ignored).
      init_prototypes: [C, D] (e.g. normalised teacher head rows W_T[c] / ||W_T[c]||).
      top_n: int or [C] int array n_c.
      weights: optional [N]; rows with weight <= 0 are ignored (padded candidates).
    Returns: [C, D] unit prototypes.
    """
    f = cm.flatten_rows(features_normed)
    n = f.shape[0]
    mu = cm.l2_normalize(cm.as_float(init_prototypes))
    num_classes = mu.shape[0]
    cls = jnp.asarray(pred_classes)
    _, valid = cm.row_weights(weights, n, f.dtype)
    ok = valid & (cls >= 0) & (cls < num_classes)
    safe_cls = jnp.clip(cls, 0, num_classes - 1)
    group = jnp.where(ok, cls, num_classes)
    top_n_item = jnp.broadcast_to(jnp.asarray(top_n), (num_classes,))[safe_cls]
    for _ in range(rounds):
        cos = jnp.sum(f * mu[safe_cls], axis=-1)
        sel = ok & (within_class_rank(cos, group, ids) < top_n_item)
        sums = jnp.zeros_like(mu).at[safe_cls].add(jnp.where(sel[:, None], f, 0.0))
        counts = jnp.zeros((num_classes,), jnp.int32).at[safe_cls].add(sel.astype(jnp.int32))
        mu = jnp.where((counts > 0)[:, None], cm.l2_normalize(sums), mu)
    return mu


def quantile_gate(probs_of_pred, pred_classes, num_classes, q=0.5, weights=None):
    """ODSD §1C adaptive gate: gamma_c = q-quantile of p_T(c|u) over A_c = {u : y^(u) = c}.

    Quantile by linear interpolation between order statistics (NumPy's default "linear").
    Returns (gamma [C] — +inf for a class with no member; passed [N] bool: p >= gamma_{y^}).
    Rows with weight <= 0 or a class outside [0, C) neither count nor pass.
    """
    p = cm.as_float(probs_of_pred)
    n = p.shape[0]
    cls = jnp.asarray(pred_classes)
    _, valid = cm.row_weights(weights, n, p.dtype)
    ok = valid & (cls >= 0) & (cls < num_classes)
    key = jnp.where(ok, cls, num_classes)
    _, p_sorted = jax.lax.sort((key, p), num_keys=2)
    counts = jnp.zeros((num_classes,), jnp.int32).at[key].add(1, mode="drop")
    starts = jnp.cumsum(counts) - counts
    pos = q * jnp.maximum(counts - 1, 0).astype(p.dtype)
    lo = jnp.floor(pos).astype(jnp.int32)
    hi = jnp.minimum(lo + 1, jnp.maximum(counts - 1, 0))
    frac = pos - lo.astype(p.dtype)
    v_lo = p_sorted[jnp.clip(starts + lo, 0, n - 1)]
    v_hi = p_sorted[jnp.clip(starts + hi, 0, n - 1)]
    gamma = jnp.where(counts > 0, v_lo + (v_hi - v_lo) * frac, jnp.inf)
    passed = ok & (p >= gamma[jnp.clip(cls, 0, num_classes - 1)])
    return gamma, passed


def aps_scores(cos_to_proto, log_probs, pred_classes, alpha=0.5):
    """ODSD §1D within-class score: alpha * rank01(cos) + (1 - alpha) * rank01(log p_T(y^|u)).

    Both ranks are within the predicted class y^ (`rank01`), so the score is in [0, 1].
    alpha = 1 is prototype-only, alpha = 0 confidence-only (DFND's ranking).
    Select with `select_class_balanced(scores, pred_classes, per_class, C, ids=...,
    priority=gate_passed)`.
    """
    return alpha * rank01(cos_to_proto, pred_classes) + (1.0 - alpha) * rank01(
        log_probs, pred_classes
    )


# ----------------------------------------------------------------------------------------
# Out-of-distribution scores on the teacher's features (ODSD: which pool images look like
# the original data). Each fit is streamable: sufficient statistics per batch, merged
# exactly (Chan et al.'s pairwise update), solved once.
# ----------------------------------------------------------------------------------------


class GaussianStats(NamedTuple):
    """Sufficient statistics of a class-conditional Gaussian with a shared covariance.

    count [C] (sum of weights per class), mean [C, D] (weighted class means; 0 for an empty
    class), scatter [D, D] = sum_i w_i (f_i - mean_{y_i})(f_i - mean_{y_i})^T, the pooled
    within-class scatter. Kept centred (not raw second moments) so that float32 sums over a
    large pool do not cancel.
    """

    count: jax.Array
    mean: jax.Array
    scatter: jax.Array


class GaussianFit(NamedTuple):
    """Solved `GaussianStats`: class means [C, D], shared precision [D, D], present [C] bool
    (classes with no fitted image, which every score ignores)."""

    means: jax.Array
    precision: jax.Array
    present: jax.Array


def init_gaussian_stats(num_classes, dim, dtype=jnp.float32):
    """Empty `GaussianStats` (the identity of `merge_gaussian_stats`)."""
    return GaussianStats(
        jnp.zeros((num_classes,), dtype),
        jnp.zeros((num_classes, dim), dtype),
        jnp.zeros((dim, dim), dtype),
    )


def gaussian_stats(features, classes, num_classes, weights=None):
    """`GaussianStats` of one batch: features [N, D], classes [N] int, optional weights [N].

    Rows with weight <= 0 or a class outside [0, C) do not count (padding, unfitted images).
    """
    f = cm.flatten_rows(features)
    w, _ = cm.row_weights(weights, f.shape[0], f.dtype)
    cls = jnp.asarray(classes)
    w = jnp.where((cls >= 0) & (cls < num_classes), w, 0.0)
    safe = jnp.clip(cls, 0, num_classes - 1)
    count = jnp.zeros((num_classes,), f.dtype).at[safe].add(w)
    sums = jnp.zeros((num_classes, f.shape[1]), f.dtype).at[safe].add(w[:, None] * f)
    mean = cm.safe_div(sums, count[:, None])
    centred = (f - mean[safe]) * jnp.sqrt(w)[:, None]
    return GaussianStats(count, mean, cm.mm(centred.T, centred))


def merge_gaussian_stats(a, b):
    """Statistics of the union of two disjoint sets of images (exact; order-independent up to
    rounding): per class n = n_a + n_b, mean = mean_a + (n_b / n) delta and the pooled scatter
    gains sum_c (n_a n_b / n) delta_c delta_c^T, delta_c = mean_b,c - mean_a,c."""
    n = a.count + b.count
    delta = b.mean - a.mean
    frac_b = cm.safe_div(b.count, n)
    mean = a.mean + frac_b[:, None] * delta
    cross = delta * jnp.sqrt(a.count * frac_b)[:, None]  # sqrt(n_a n_b / n) delta_c
    return GaussianStats(n, mean, a.scatter + b.scatter + cm.mm(cross.T, cross))


def fit_gaussian(stats, shrinkage=1e-2):
    """Solves `GaussianStats`: the shared covariance Sigma = scatter / sum_c n_c, regularised
    as Sigma + shrinkage * (tr Sigma / D) I (a pool's confident images can be fewer than D, or
    the features rank-deficient, e.g. post-ReLU units that never fire), inverted by Cholesky.
    """
    scatter = cm.as_float(stats.scatter)
    d = scatter.shape[0]
    total = jnp.sum(stats.count)
    sigma = cm.safe_div(scatter, total)
    ridge = shrinkage * jnp.maximum(jnp.trace(sigma) / d, 1e-12)
    sigma = sigma + ridge * jnp.eye(d, dtype=sigma.dtype)
    chol = jnp.linalg.cholesky(sigma)
    precision = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(d, dtype=sigma.dtype))
    return GaussianFit(cm.as_float(stats.mean), 0.5 * (precision + precision.T), stats.count > 0)


def mahalanobis_distances(features, fit):
    """Squared Mahalanobis distances [N, C] of features [N, D] to every class mean under the
    shared precision; +inf for an absent class. Expanded as f'Pf - 2 f'P mu_c + mu_c'P mu_c
    (O(N C D) memory-free of an [N, C, D] difference), clipped at 0 against rounding."""
    f = cm.flatten_rows(features)
    p = cm.as_float(fit.precision)
    mu = cm.as_float(fit.means)
    fp = cm.mm(f, p)
    d2 = (
        jnp.sum(fp * f, -1)[:, None]
        - 2.0 * cm.mm(fp, mu.T)
        + jnp.sum(cm.mm(mu, p) * mu, -1)[None, :]
    )
    return jnp.where(jnp.asarray(fit.present)[None, :], jnp.maximum(d2, 0.0), jnp.inf)


def mahalanobis_score(features, fit, classes=None):
    """-min_c d_M^2(f, mu_c) (Lee et al. 2018, class-conditional Gaussians with a shared
    covariance; higher = in-distribution). `classes` given: the distance to that class's
    mean instead of the nearest. [N]."""
    if classes is None:  # the nearest class by the expanded form, ...
        classes = jnp.argmin(mahalanobis_distances(features, fit), axis=-1)
    # ... its distance from the explicit difference: the expanded form cancels badly when
    # f'Pf is large (a ridge-dominated precision), and an [N, C, D] difference is too big.
    f = cm.flatten_rows(features)
    diff = f - cm.as_float(fit.means)[jnp.asarray(classes)]
    d2 = jnp.sum(cm.mm(diff, cm.as_float(fit.precision)) * diff, -1)
    present = jnp.asarray(fit.present)[jnp.asarray(classes)]
    return jnp.where(present, -jnp.maximum(d2, 0.0), -jnp.inf)


def knn_score(features, bank, k=1, ids=None, bank_ids=None, bank_valid=None):
    """Cosine similarity to the k-th nearest neighbour in a bank of reference features (Sun et
    al. 2022, deep nearest neighbours on normalised features; higher = in-distribution). [N].

    bank [K, D] (e.g. per-class prototypes, or the pool's confident images), `bank_valid` [K]
    masks empty slots. With `ids` and `bank_ids` an item is never its own neighbour, so an image
    in the bank is scored like one outside it. Fewer than k neighbours gives -inf.
    """
    sims = prototype_similarities(features, bank)  # [N, K]
    keep = jnp.ones(sims.shape, bool)
    if bank_valid is not None:
        keep = keep & jnp.asarray(bank_valid, bool)[None, :]
    if ids is not None and bank_ids is not None:
        keep = keep & (jnp.asarray(ids)[:, None] != jnp.asarray(bank_ids)[None, :])
    sims = jnp.where(keep, sims, -jnp.inf)
    k = min(int(k), sims.shape[1])
    return jax.lax.top_k(sims, k)[0][:, k - 1]


def bn_statistics_score(layer_moments, eps=1e-5):
    """-(distance of each image's per-layer feature statistics from the teacher's BatchNorm
    running statistics), the only data-free summary of the original data (odsd.md §1).

    layer_moments: sequence of (mean [N, c_l], var [N, c_l], running_mean [c_l],
    running_var [c_l]), the per-image spatial mean and variance of the input of BN layer l.
    Distance = sum_l mean_c [(m - mu)^2 / (v + eps) + (s - v)^2 / (v + eps)^2]: both terms in
    units of the running variance, so no layer or channel dominates by its scale. [N].
    """
    total = 0.0
    for mean, var, run_mean, run_var in layer_moments:
        v = cm.as_float(run_var) + eps
        dm = (cm.as_float(mean) - cm.as_float(run_mean)) ** 2 / v
        dv = (cm.as_float(var) - cm.as_float(run_var)) ** 2 / v**2
        total = total + jnp.mean(dm + dv, axis=-1)
    return -total
