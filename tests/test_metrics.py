"""Tests for kd_jax.metrics: accuracy, Hungarian clustering accuracy, NCD protocol helpers."""

import itertools

import jax.numpy as jnp
import numpy as np
import pytest

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


def test_task_aware_and_agnostic_global():
    r = np.random.default_rng(2)
    known, novel = [0, 1, 2, 3, 4], [5, 6, 7, 8, 9]
    y = r.integers(0, 10, size=300)
    # known classes predicted by their own index, novel classes by permuted cluster ids
    perm = dict(zip(novel, r.permutation(novel)))
    pred = np.array([c if c < 5 else perm[c] for c in y])
    res = M.task_agnostic_accuracy_global(y, pred, known)
    assert res["all"] == res["known"] == res["novel"] == 1.0
    # corrupt some novel predictions into a known class: novel drops, known stays
    bad = (y >= 5) & (r.uniform(size=300) < 0.3)
    pred2 = pred.copy()
    pred2[bad] = 0
    res = M.task_agnostic_accuracy_global(y, pred2, known)
    novel_mask = y >= 5
    assert res["known"] == 1.0
    assert abs(res["novel"] - (1 - bad.sum() / novel_mask.sum())) < 1e-12
    assert abs(res["all"] - np.mean(~bad)) < 1e-12
    assert abs(res["all"] - M.cluster_accuracy(y, pred2)[0]) < 1e-12
    # task-aware: novel samples only, novel head ids 0..4 against labels 5..9
    head = np.array([perm[c] - 5 for c in y[novel_mask]])
    assert M.task_aware_accuracy(y[novel_mask], head) == 1.0
    assert M.task_aware_accuracy(y, np.where(novel_mask, pred - 5, 0), mask=novel_mask) == 1.0
    assert np.isnan(M.task_agnostic_accuracy_global(y[y < 5], pred[y < 5], known)["novel"])


def _split(res):
    return res["all"], res["known"], res["novel"]


def test_task_agnostic_conventions_differ():
    # known images whose predictions permute the known labels: UNO scores them without a
    # matching (0 right), the global matching maps 1->0, 0->1 (all right)
    y = [0, 0, 1, 1, 2, 2, 3, 3]
    p = [1, 1, 0, 0, 2, 2, 3, 3]
    uno, glob = (
        M.task_agnostic_accuracy_uno(y, p, [0, 1]),
        M.task_agnostic_accuracy_global(y, p, [0, 1]),
    )
    assert _split(uno) == (4 / 8, 0 / 4, 4 / 4)
    assert uno["mapping"] == {2: 2, 3: 3}
    assert _split(glob) == (1.0, 1.0, 1.0)
    assert glob["mapping"] == {1: 0, 0: 1, 2: 2, 3: 3}

    # novel images predicted as known ids: UNO's novel matching (novel images only) may use
    # ids 0 and 1 for classes 2 and 3; the global one has two ids for four classes and
    # prefers the novel images (2 + 2 matches against 1 + 1)
    y = [0, 1, 2, 2, 3, 3]
    p = [0, 1, 0, 0, 1, 1]
    uno, glob = (
        M.task_agnostic_accuracy_uno(y, p, [0, 1]),
        M.task_agnostic_accuracy_global(y, p, [0, 1]),
    )
    assert _split(uno) == (6 / 6, 2 / 2, 4 / 4)
    assert uno["mapping"] == {0: 2, 1: 3}
    assert _split(glob) == (4 / 6, 0 / 2, 4 / 4)
    assert glob["mapping"] == {0: 2, 1: 3}

    # more clusters than classes: known class 0 split over ids 0 (1 image) and 5 (2 images).
    # UNO: only id 0 counts; global: 5->0 (2 matches) beats 0->0 (1), id 0 unmatched
    y = [0, 0, 0, 1, 1, 2, 2]
    p = [0, 5, 5, 1, 1, 2, 2]
    uno, glob = M.task_agnostic_accuracy_uno(y, p, [0]), M.task_agnostic_accuracy_global(y, p, [0])
    assert _split(uno) == (5 / 7, 1 / 3, 4 / 4)
    assert _split(glob) == (6 / 7, 2 / 3, 4 / 4)
    assert glob["mapping"] == {5: 0, 1: 1, 2: 2}

    # overclustered novel images: 4 ids for 2 novel classes; the 2 leftover ids are wrong in
    # UNO's novel matching
    y = [0, 1, 2, 2, 2, 3, 3, 3]
    p = [0, 1, 2, 2, 4, 3, 3, 5]
    uno = M.task_agnostic_accuracy_uno(y, p, [0, 1])
    assert _split(uno) == ((2 + 4) / 8, 2 / 2, 4 / 6)
    assert uno["mapping"] == {2: 2, 3: 3}


def test_task_agnostic_conventions_agree():
    r = np.random.default_rng(3)
    known, novel = range(4), [4, 5, 6]
    y = r.integers(0, 7, size=120)
    both = M.task_agnostic_accuracies(y, y, known)
    assert set(both) == {"uno", "global"}
    for res in both.values():
        assert _split(res) == (1.0, 1.0, 1.0)
    # known predicted by their label, novel by permuted ids: 1.0 everywhere in both
    perm = dict(zip(novel, [6, 4, 5]))
    p = np.array([c if c < 4 else perm[c] for c in y])
    for res in M.task_agnostic_accuracies(y, p, known).values():
        assert _split(res) == (1.0, 1.0, 1.0)
        assert res["mapping"][6] == 4 and res["mapping"][4] == 5 and res["mapping"][5] == 6


def test_task_agnostic_uno_is_its_definition():
    # UNO = plain accuracy on known images, cluster_accuracy on novel images
    r = np.random.default_rng(4)
    for _ in range(5):
        y = r.integers(0, 8, size=200)
        p = np.where(r.uniform(size=200) < 0.5, y, r.integers(0, 9, size=200))
        known = y < 5
        res = M.task_agnostic_accuracy_uno(y, p, range(5))
        acc_novel, mapping = M.cluster_accuracy(y[~known], p[~known])
        assert res["known"] == np.mean(p[known] == y[known])
        assert abs(res["novel"] - acc_novel) < 1e-12
        assert res["mapping"] == mapping
        n_known_ok = np.sum(p[known] == y[known])
        assert abs(res["all"] - (n_known_ok + acc_novel * (~known).sum()) / y.size) < 1e-12


def test_task_agnostic_uno_invariant_to_novel_relabeling():
    r = np.random.default_rng(5)
    y = r.integers(0, 10, size=300)
    p = np.where(r.uniform(size=300) < 0.6, y, r.integers(0, 10, size=300))
    base = M.task_agnostic_accuracy_uno(y, p, range(5))
    # permuting the novel head's ids (5..9) changes none of UNO's numbers
    perm = np.r_[np.arange(5), 5 + r.permutation(5)]
    assert _split(M.task_agnostic_accuracy_uno(y, perm[p], range(5))) == _split(base)
    # any injective relabeling of the predictions on novel images keeps the novel score
    novel = y >= 5
    relabel = r.permutation(100)[:10] + 50
    p3 = np.where(novel, relabel[p], p)
    res = M.task_agnostic_accuracy_uno(y, p3, range(5))
    assert res["novel"] == base["novel"] and res["known"] == base["known"]


def test_task_agnostic_empty_splits():
    for fn in (M.task_agnostic_accuracy_uno, M.task_agnostic_accuracy_global):
        only_known = fn([0, 1, 1], [0, 1, 0], [0, 1])
        assert np.isnan(only_known["novel"]) and only_known["known"] == only_known["all"] == 2 / 3
        only_novel = fn([2, 3], [3, 2], [0, 1])
        assert np.isnan(only_novel["known"]) and only_novel["novel"] == only_novel["all"] == 1.0
        empty = fn([], [], [0, 1])
        assert all(np.isnan(empty[k]) for k in ("all", "known", "novel"))
        assert empty["mapping"] == {}
        with pytest.raises(ValueError):
            fn([0, 1], [0], [0])
