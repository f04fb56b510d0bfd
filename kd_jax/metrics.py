"""Evaluation metrics: accuracy (jnp, jit-able) and NCD clustering accuracy (NumPy/SciPy, host).

Clustering accuracy follows UNO (`DonkeyShot21/UNO`): build the confusion matrix between
predicted cluster ids and true labels, find the one-to-one mapping that maximises the number
of matches with the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`), and report
matches / N. Labels and cluster ids can be any integers (they need not be contiguous or
start at 0); a cluster left unmatched (more clusters than classes) counts as wrong.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from scipy.optimize import linear_sum_assignment


def accuracy(logits, labels, weights=None):
    """Top-1 accuracy sum_i w_i [argmax z_i = y_i] / sum_i w_i (jnp; 0 if every weight is 0).

    logits [..., C], labels [...] int; weights [...] (0 for padded eval rows).
    """
    correct = (jnp.argmax(logits, axis=-1) == jnp.asarray(labels)).astype(jnp.float32)
    if weights is None:
        return jnp.mean(correct)
    w = jnp.asarray(weights, jnp.float32)
    total = jnp.sum(w)
    return jnp.where(total > 0, jnp.sum(w * correct) / jnp.where(total > 0, total, 1.0), 0.0)


def _hungarian(y_true, y_pred):
    """(number of matches, {pred_value: true_value}) of the best one-to-one mapping."""
    true_vals, t_idx = np.unique(y_true, return_inverse=True)
    pred_vals, p_idx = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((pred_vals.size, true_vals.size), dtype=np.int64)
    np.add.at(counts, (p_idx, t_idx), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    mapping = {int(pred_vals[r]): int(true_vals[c]) for r, c in zip(rows, cols)}
    return int(counts[rows, cols].sum()), mapping


def _as_1d(x):
    return np.asarray(x).reshape(-1).astype(np.int64)


def cluster_accuracy(y_true, y_pred):
    """Hungarian clustering accuracy (UNO `cluster_acc`).

    Returns (accuracy in [0, 1], mapping {predicted cluster id: true label}). Invariant to any
    relabeling of the clusters; 1.0 for a perfect clustering under any permutation of ids.
    Empty input gives (0.0, {}).
    """
    y_true, y_pred = _as_1d(y_true), _as_1d(y_pred)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch {y_true.shape} vs {y_pred.shape}")
    if y_true.size == 0:
        return 0.0, {}
    matches, mapping = _hungarian(y_true, y_pred)
    return matches / y_true.size, mapping


def task_aware_accuracy(y_true, y_pred, mask=None):
    """Task-aware NCD accuracy: novel samples only, predicted by the novel head (UNO protocol).

    Hungarian clustering accuracy over the samples selected by `mask` (default all), e.g.
    labels 5..9 against novel-head clusters 0..4. Returns a float.
    """
    y_true, y_pred = _as_1d(y_true), _as_1d(y_pred)
    if mask is not None:
        m = np.asarray(mask).reshape(-1).astype(bool)
        y_true, y_pred = y_true[m], y_pred[m]
    return cluster_accuracy(y_true, y_pred)[0]


def task_agnostic_accuracy(y_true, y_pred, known_classes):
    """Task-agnostic NCD accuracy (UNO protocol): {"all", "known", "novel"}.

    y_pred is the argmax over the concatenated [known; novel] logits on the whole test set.
    One Hungarian mapping is found over *all* samples, then accuracy is reported on all of
    them and split by whether the true label is in `known_classes` (NaN for an empty split).
    Also returns "mapping".
    """
    y_true, y_pred = _as_1d(y_true), _as_1d(y_pred)
    if y_true.size == 0:
        return {"all": float("nan"), "known": float("nan"), "novel": float("nan"), "mapping": {}}
    _, mapping = _hungarian(y_true, y_pred)
    lookup = np.array([mapping.get(int(p), np.iinfo(np.int64).min) for p in np.unique(y_pred)])
    mapped = lookup[np.searchsorted(np.unique(y_pred), y_pred)]
    correct = mapped == y_true
    known = np.isin(y_true, np.asarray(list(known_classes), dtype=np.int64))

    def mean(sel):
        return float(correct[sel].mean()) if sel.any() else float("nan")

    return {
        "all": float(correct.mean()),
        "known": mean(known),
        "novel": mean(~known),
        "mapping": mapping,
    }
