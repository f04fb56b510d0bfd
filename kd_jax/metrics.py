"""Evaluation metrics: accuracy (jnp, jit-able), segmentation scores from a confusion matrix
(jnp, jit-able) and NCD clustering accuracy (NumPy/SciPy, host).

Segmentation (`confusion_matrix`, `per_class_iou`, `mean_iou`, `pixel_accuracy`): the confusion
matrix counts pixels by (true class, predicted class) and is summed over the eval set; pixels
labeled `ignore_index` (255) or outside [0, C), and padded images (weight 0), count nowhere.
IoU_c = TP / (TP + FP + FN); a class absent from both the labels and the predictions
(TP + FP + FN = 0) has no IoU (NaN) and is left out of the mean, the standard definition
(torchvision's references, mmseg's `nanmean`). Pixel accuracy = trace / total.

Clustering accuracy (`cluster_accuracy`, UNO's `cluster_acc`): build the confusion matrix between
predicted cluster ids and true labels, find the one-to-one mapping that maximises the number of
matches with the Hungarian algorithm (`scipy.optimize.linear_sum_assignment`), and report
matches / N. Labels and cluster ids can be any integers (they need not be contiguous or start
at 0); a cluster left unmatched (more clusters than classes) counts as wrong.

Task-aware accuracy (`task_aware_accuracy`) is that number on the novel test images against the
novel head's argmax. Task-agnostic accuracy scores the argmax over the concatenated
[known; novel] logits on the whole test set, and the literature has two conventions for it:

- UNO (`task_agnostic_accuracy_uno`; the "incremental/" metrics of DonkeyShot21/UNO
  `main_discover.py`): known-class images are scored without any matching (correct iff the
  argmax is their label); novel-class images get their own Hungarian matching, computed among
  the novel images only, where a predicted id may be a known one.
- Global (`task_agnostic_accuracy_global`; rKD's, and GCD's `split_cluster_acc_v2`): one
  Hungarian matching over all test images and all predicted ids, then accuracy split by
  whether the true label is known or novel.

They differ e.g. when known images are confused among themselves (UNO counts them wrong, the
global matching may permute them right) or novel images land on known ids (UNO's novel
matching may map a known id to a novel class; the global one uses each id once for known and
novel images together). `task_agnostic_accuracies` returns both.
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


IGNORE_INDEX = 255


def confusion_matrix(labels, preds, num_classes: int, weights=None, ignore_index=IGNORE_INDEX):
    """[C, C] integer counts, rows = true class, columns = predicted class (jnp, jit-able).

    labels, preds: int [...] of the same shape (e.g. [B, H, W]); weights [B] (or any prefix
    shape of labels, broadcast over the rest): pixels of a weight-0 image (eval padding) are
    not counted. A pixel counts when its label is in [0, C) and is not `ignore_index`; a
    prediction outside [0, C) is an error.
    """
    labels = jnp.asarray(labels).astype(jnp.int32)
    preds = jnp.asarray(preds).astype(jnp.int32)
    if labels.shape != preds.shape:
        raise ValueError(f"labels {labels.shape} and preds {preds.shape} differ in shape")
    valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
    if weights is not None:
        w = jnp.asarray(weights)
        w = w.reshape(w.shape + (1,) * (labels.ndim - w.ndim))
        valid = valid & (w > 0)
    index = jnp.where(valid, labels * num_classes + preds, num_classes * num_classes)
    counts = jnp.bincount(index.reshape(-1), length=num_classes * num_classes + 1)
    return counts[:-1].reshape(num_classes, num_classes)


def per_class_iou(confusion):
    """[C] IoU per class from a confusion matrix; NaN where the class is absent from both the
    labels and the predictions."""
    cm = _as_float(confusion)
    tp = jnp.diagonal(cm)
    union = cm.sum(0) + cm.sum(1) - tp
    return jnp.where(union > 0, tp / jnp.where(union > 0, union, 1), jnp.nan)


def mean_iou(confusion):
    """Mean IoU over the classes present in the labels or the predictions (NaN if none)."""
    return jnp.nanmean(per_class_iou(confusion))


def pixel_accuracy(confusion):
    """Correct pixels / counted pixels (NaN if no pixel counted)."""
    cm = _as_float(confusion)
    total = cm.sum()
    return jnp.where(total > 0, jnp.trace(cm) / jnp.where(total > 0, total, 1), jnp.nan)


def segmentation_scores(confusion) -> dict:
    """{"miou", "pixel_accuracy", "per_class_iou" (None for an absent class)} as Python
    values, for results.json (strict JSON has no NaN)."""
    iou = np.asarray(per_class_iou(confusion), np.float64)
    return {
        "miou": float(mean_iou(confusion)),
        "pixel_accuracy": float(pixel_accuracy(confusion)),
        "per_class_iou": [None if np.isnan(v) else float(v) for v in iou],
    }


def _as_float(confusion):
    """Counts as JAX's default float (float64 under x64: the NumPy-reference tests)."""
    return jnp.asarray(confusion).astype(jnp.result_type(float))


def _hungarian(y_true, y_pred):
    """(per-sample correct [N] bool, {pred value: true value}) of the best one-to-one mapping."""
    true_vals, t_idx = np.unique(y_true, return_inverse=True)
    pred_vals, p_idx = np.unique(y_pred, return_inverse=True)
    counts = np.zeros((pred_vals.size, true_vals.size), dtype=np.int64)
    np.add.at(counts, (p_idx.reshape(-1), t_idx.reshape(-1)), 1)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    assigned = np.full(pred_vals.size, -1)  # -1: a cluster left unmatched is wrong
    assigned[rows] = cols
    mapping = {int(pred_vals[r]): int(true_vals[c]) for r, c in zip(rows, cols)}
    return assigned[p_idx.reshape(-1)] == t_idx.reshape(-1), mapping


def _pair(y_true, y_pred):
    y_true = np.asarray(y_true).reshape(-1).astype(np.int64)
    y_pred = np.asarray(y_pred).reshape(-1).astype(np.int64)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"shape mismatch {y_true.shape} vs {y_pred.shape}")
    return y_true, y_pred


def _mean(x):
    return float(x.mean()) if x.size else float("nan")


def cluster_accuracy(y_true, y_pred):
    """Hungarian clustering accuracy (UNO `cluster_acc`).

    Returns (accuracy in [0, 1], mapping {predicted cluster id: true label}). Invariant to any
    relabeling of the clusters; 1.0 for a perfect clustering under any permutation of ids.
    Empty input gives (0.0, {}).
    """
    y_true, y_pred = _pair(y_true, y_pred)
    if y_true.size == 0:
        return 0.0, {}
    correct, mapping = _hungarian(y_true, y_pred)
    return float(correct.mean()), mapping


def task_aware_accuracy(y_true, y_pred, mask=None):
    """`cluster_accuracy` of the samples `mask` selects (default all), as a float.

    It is the task-aware NCD number when the caller passes the novel test images and the novel
    head's argmax (e.g. labels 5..9 against clusters 0..4). 0.0 if nothing is selected.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    if mask is not None:
        m = np.asarray(mask).reshape(-1).astype(bool)
        y_true, y_pred = y_true[m], y_pred[m]
    return cluster_accuracy(y_true, y_pred)[0]


def _is_known(y_true, known_classes):
    return np.isin(y_true, np.asarray(list(known_classes), dtype=np.int64))


def task_agnostic_accuracy_global(y_true, y_pred, known_classes):
    """Task-agnostic NCD accuracy, one matching over everything (rKD / GCD convention).

    y_pred: argmax over the concatenated [known; novel] logits on the whole test set. One
    Hungarian mapping over all samples and all predicted ids; accuracy on all of them and split
    by whether the true label is in `known_classes`. Returns {"all", "known", "novel",
    "mapping"} (mapping {pred id: true label}); NaN for an empty split.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    if y_true.size == 0:
        return {"all": float("nan"), "known": float("nan"), "novel": float("nan"), "mapping": {}}
    correct, mapping = _hungarian(y_true, y_pred)
    known = _is_known(y_true, known_classes)
    return {
        "all": _mean(correct),
        "known": _mean(correct[known]),
        "novel": _mean(correct[~known]),
        "mapping": mapping,
    }


def task_agnostic_accuracy_uno(y_true, y_pred, known_classes):
    """Task-agnostic NCD accuracy in UNO's convention (its "incremental/" metrics).

    y_pred: argmax over the concatenated [known; novel] logits, in y_true's label space (known
    labels 0..C_l-1, novel C_l..C_l+C_u-1). Known-class images: correct iff y_pred == y_true,
    no matching (the known head's ids are labels). Novel-class images: Hungarian matching among
    them only, any predicted id (known ones too) may be matched. "all" = (known correct + novel
    matched) / N, which UNO itself does not log. Returns {"all", "known", "novel", "mapping"}
    (mapping: the novel-subset matching {pred id: true label}); NaN for an empty split.
    """
    y_true, y_pred = _pair(y_true, y_pred)
    known = _is_known(y_true, known_classes)
    correct_known = y_pred[known] == y_true[known]
    if known.all():
        correct_novel, mapping = np.zeros(0, bool), {}
    else:
        correct_novel, mapping = _hungarian(y_true[~known], y_pred[~known])
    return {
        "all": _mean(np.concatenate([correct_known, correct_novel])),
        "known": _mean(correct_known),
        "novel": _mean(correct_novel),
        "mapping": mapping,
    }


def task_agnostic_accuracies(y_true, y_pred, known_classes):
    """Both task-agnostic conventions: {"uno": task_agnostic_accuracy_uno(...),
    "global": task_agnostic_accuracy_global(...)} of the same predictions."""
    return {
        "uno": task_agnostic_accuracy_uno(y_true, y_pred, known_classes),
        "global": task_agnostic_accuracy_global(y_true, y_pred, known_classes),
    }
