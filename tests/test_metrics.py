"""Tests for kd_jax.metrics: accuracy, Hungarian clustering accuracy, NCD protocol helpers."""

import itertools

import jax.numpy as jnp
import numpy as np

from kd_jax import metrics as M


def brute_force_cluster_acc(y_true, y_pred):
    """Best one-to-one mapping by trying every injection (tiny label sets only)."""
    preds, trues = np.unique(y_pred), np.unique(y_true)
    best = 0
    pad = list(trues) + [None] * max(0, len(preds) - len(trues))
    for perm in itertools.permutations(pad, len(preds)):
        m = dict(zip(preds, perm))
        best = max(best, sum(m[p] == t for p, t in zip(y_pred, y_true)))
    return best / len(y_true)


def test_accuracy():
    logits = jnp.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = jnp.array([0, 1, 1, 1])
    assert float(M.accuracy(logits, labels)) == 0.75
    assert float(M.accuracy(logits, labels, jnp.array([1.0, 1.0, 0.0, 1.0]))) == 1.0
    assert float(M.accuracy(logits, labels, jnp.zeros(4))) == 0.0
    # padded rows change nothing
    pad_logits = jnp.concatenate([logits, jnp.zeros((3, 2))])
    pad_labels = jnp.concatenate([labels, jnp.zeros(3, jnp.int32)])
    assert float(M.accuracy(pad_logits, pad_labels, jnp.r_[jnp.ones(4), jnp.zeros(3)])) == 0.75


def test_cluster_accuracy_against_brute_force():
    r = np.random.default_rng(0)
    for trial in range(12):
        n_true, n_pred = r.integers(2, 5), r.integers(2, 6)
        y_true = r.integers(0, n_true, size=30) + 5 * (trial % 2)  # labels need not start at 0
        y_pred = r.integers(0, n_pred, size=30)
        acc, mapping = M.cluster_accuracy(y_true, y_pred)
        assert abs(acc - brute_force_cluster_acc(y_true, y_pred)) < 1e-12
        assert len(set(mapping.values())) == len(mapping)  # one-to-one
        mapped = np.array([mapping.get(p, -999) for p in y_pred])
        assert abs(np.mean(mapped == y_true) - acc) < 1e-12


def test_cluster_accuracy_invariances():
    r = np.random.default_rng(1)
    y_true = r.integers(0, 6, size=200)
    perm = r.permutation(6)
    acc, mapping = M.cluster_accuracy(y_true, perm[y_true])
    assert acc == 1.0
    assert all(mapping[perm[c]] == c for c in range(6))
    y_pred = np.where(r.uniform(size=200) < 0.7, y_true, r.integers(0, 6, size=200))
    base = M.cluster_accuracy(y_true, y_pred)[0]
    for _ in range(3):
        relabel = r.permutation(50)[:6] + 100  # arbitrary, non-contiguous cluster ids
        assert M.cluster_accuracy(y_true, relabel[y_pred])[0] == base
    assert M.cluster_accuracy([], [])[0] == 0.0


def test_task_aware_and_agnostic():
    r = np.random.default_rng(2)
    known, novel = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    y = r.integers(0, 10, size=300)
    # known classes predicted by their own index, novel classes by permuted cluster ids
    perm = dict(zip(novel, r.permutation(novel)))
    pred = np.array([c if c < 5 else perm[c] for c in y])
    res = M.task_agnostic_accuracy(y, pred, known)
    assert res["all"] == res["known"] == res["novel"] == 1.0
    # corrupt some novel predictions into a known class: novel drops, known stays
    bad = (y >= 5) & (r.uniform(size=300) < 0.3)
    pred2 = pred.copy()
    pred2[bad] = 0
    res = M.task_agnostic_accuracy(y, pred2, known)
    novel_mask = y >= 5
    assert res["known"] == 1.0
    assert abs(res["novel"] - (1 - bad.sum() / novel_mask.sum())) < 1e-12
    assert abs(res["all"] - np.mean(~bad)) < 1e-12
    assert abs(res["all"] - M.cluster_accuracy(y, pred2)[0]) < 1e-12
    # task-aware: novel samples only, novel head ids 0..4 against labels 5..9
    head = np.array([perm[c] - 5 for c in y[novel_mask]])
    assert M.task_aware_accuracy(y[novel_mask], head) == 1.0
    assert M.task_aware_accuracy(y, np.where(novel_mask, pred - 5, 0), mask=novel_mask) == 1.0
    assert np.isnan(M.task_agnostic_accuracy(y[y < 5], pred[y < 5], known)["novel"])
