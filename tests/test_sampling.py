"""Tests for kd_jax.sampling: scores vs float64 NumPy, selection, streaming, APS pieces."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
from helpers import np_softmax, rng
from scipy.stats import rankdata

from kd_jax import sampling as S

NS = 48  # one pool size for most tests, so eagerly compiled ops are shared between tests


def close(actual, expected, rtol=1e-5, atol=1e-6, name=""):
    helpers.close(actual, expected, rtol, atol, name)


def np_normalize(x):
    x = np.asarray(x, np.float64)
    n = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.where(n > 0, x / np.where(n > 0, n, 1), 0)


def full_order(scores, ids):
    """Reference ranking: score desc, id asc."""
    return np.lexsort((ids, -np.asarray(scores, np.float64)))


# ---------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------


@jax.jit
def _all_scores(z, zs):
    return {
        "confidence": S.confidence_score(z),
        "entropy": S.entropy_score(z),
        "energy": S.energy_score(z),
        "energy_t2": S.energy_score(z, 2.0),
        "margin": S.margin_score(z),
        "disagreement": S.disagreement_score(z, zs),
    }


def test_scores_against_reference():
    r = rng(0)
    z = (r.normal(size=(20, 7)) * 3).astype(np.float32)
    zs = (r.normal(size=(20, 7)) * 2).astype(np.float32)
    # sign convention rows: 2 confident (one-hot-like) then 2 uniform, then a huge one-hot
    special = np.concatenate([np.eye(7)[:2] * 20, np.zeros((2, 7)), np.eye(7)[:1] * 1e4])
    z = np.concatenate([z, special.astype(np.float32)])
    zs = np.concatenate([zs, np.zeros((5, 7), np.float32)])
    v = {k: np.asarray(a) for k, a in _all_scores(z, zs).items()}
    n = 20
    z64 = z[:n].astype(np.float64)
    p = np_softmax(z64)
    close(v["confidence"][:n], p.max(-1))
    close(v["entropy"][:n], np.sum(p * np.log(p), -1))
    close(v["energy"][:n], np.log(np.exp(z64).sum(-1)))
    close(v["energy_t2"][:n], 2 * np.log(np.exp(z64 / 2).sum(-1)))
    ps = np.sort(p, -1)
    close(v["margin"][:n], ps[:, -1] - ps[:, -2])
    q = np_softmax(zs[:n])
    close(v["disagreement"][:n], np.sum(p * (np.log(p) - np.log(q)), -1))
    # sign convention: more confident / lower entropy = higher score; finite on one-hot
    for name in ("confidence", "entropy", "energy", "margin"):
        assert (v[name][n : n + 2] > v[name][n + 2 : n + 4][::-1]).all(), name
        assert np.isfinite(v[name]).all(), name
    assert np.isfinite(v["disagreement"]).all()


def test_prototypes_and_prototype_score():
    r = rng(1)
    f = r.normal(size=(NS, 6)).astype(np.float32)
    y = r.integers(0, 4, size=NS)
    y[y == 3] = 2  # class 3 empty
    w = (r.uniform(size=NS) > 0.3).astype(np.float32)
    mu = np.asarray(S.class_prototypes(f, y, 4, weights=w))
    fn = np_normalize(f)
    for c in range(4):
        sel = (y == c) & (w > 0)
        want = np_normalize(fn[sel].sum(0)) if sel.any() else np.zeros(6)
        close(mu[c], want)
    assert np.allclose(mu[3], 0)
    sims = np_normalize(f) @ np_normalize(np.asarray(mu, np.float64)).T
    close(S.prototype_similarities(f, mu), sims)
    close(S.prototype_score(f, mu, y), sims[np.arange(NS), y])
    close(S.prototype_score(f, mu), sims.max(1))


def test_rank01_against_scipy():
    r = rng(2)
    scores = np.round(r.normal(size=NS), 1).astype(np.float32)  # many ties
    classes = r.integers(0, 5, size=NS)
    classes[0] = 7  # a singleton class
    got = np.asarray(S.rank01(scores, classes))
    for c in np.unique(classes):
        sel = classes == c
        if sel.sum() == 1:
            assert got[sel][0] == 1.0
            continue
        want = (rankdata(scores[sel], method="average") - 1) / (sel.sum() - 1)
        close(got[sel], want)
    whole = np.asarray(S.rank01(scores))
    close(whole, (rankdata(scores, method="average") - 1) / (NS - 1))
    # permutation equivariance
    perm = r.permutation(NS)
    close(np.asarray(S.rank01(scores[perm], classes[perm])), got[perm])


# ---------------------------------------------------------------------------------------
# In-memory selection
# ---------------------------------------------------------------------------------------


def test_select_top_k_and_ties():
    r = rng(3)
    scores = np.round(r.normal(size=NS), 1).astype(np.float32)
    ids = r.permutation(1000)[:NS]
    got = np.asarray(S.select_top_k(scores, 10, ids))
    np.testing.assert_array_equal(got, full_order(scores, ids)[:10])
    # positions as ids
    np.testing.assert_array_equal(
        np.asarray(S.select_top_k(scores, 10)), full_order(scores, np.arange(NS))[:10]
    )
    # permuting the pool selects the same ids
    perm = r.permutation(NS)
    sel_perm = np.asarray(S.select_top_k(scores[perm], 10, ids[perm]))
    np.testing.assert_array_equal(ids[perm][sel_perm], ids[got])
    # NaN ranks last
    nan_scores = scores.copy()
    nan_scores[:5] = np.nan
    assert not set(np.asarray(S.select_top_k(nan_scores, 30))) & set(range(5))
    assert len(np.asarray(S.select_top_k(scores, 100))) == NS


def ref_class_balanced(scores, classes, per_class, num_classes, ids):
    order = full_order(scores, ids)
    chosen = []
    for c in range(num_classes):
        chosen += [i for i in order if classes[i] == c][:per_class]
    rest = [i for i in order if i not in set(chosen)]
    m = min(len(scores), per_class * num_classes)
    return set(chosen + rest[: m - len(chosen)])


def test_select_class_balanced():
    r = rng(4)
    n, num_classes = NS, 4
    scores = r.normal(size=n).astype(np.float32)
    ids = r.permutation(10_000)[:n].astype(np.int32)
    # supply suffices: exactly per_class per class
    classes = np.repeat(np.arange(num_classes), n // num_classes)
    sel = np.asarray(S.select_class_balanced(scores, classes, 5, num_classes, ids))
    assert len(sel) == len(set(sel)) == 20
    np.testing.assert_array_equal(np.bincount(classes[sel], minlength=4), [5] * 4)
    # shortfall: class 3 has 2 items, class 2 none, one item outside [0, C)
    classes = r.choice([0, 1], size=n)
    classes[:2] = 3
    classes[2] = 9
    for per_class in (5, 15, 30):
        sel = np.asarray(S.select_class_balanced(scores, classes, per_class, num_classes, ids))
        m = min(n, per_class * num_classes)
        assert len(sel) == len(set(sel)) == m
        assert set(sel) == ref_class_balanced(scores, classes, per_class, num_classes, ids)
        # permuting the pool selects the same ids, in the same order
        perm = r.permutation(n)
        sel_p = np.asarray(
            S.select_class_balanced(scores[perm], classes[perm], per_class, num_classes, ids[perm])
        )
        np.testing.assert_array_equal(ids[perm][sel_p], ids[sel])
    # total caps the size
    assert len(np.asarray(S.select_class_balanced(scores, classes, 5, 4, ids, total=7))) == 7
    # priority: gated items first inside each class
    classes = np.repeat(np.arange(num_classes), n // num_classes)
    prio = r.uniform(size=n) > 0.5
    sel = np.asarray(S.select_class_balanced(scores, classes, 3, num_classes, ids, priority=prio))
    for c in range(num_classes):
        members = np.flatnonzero(classes == c)
        gated = members[prio[members]]
        picked = sel[classes[sel] == c]
        k = min(3, len(gated))
        want_gated = gated[full_order(scores[gated], ids[gated])][:k]
        assert set(want_gated) <= set(picked)


# ---------------------------------------------------------------------------------------
# Streaming
# ---------------------------------------------------------------------------------------

CHUNK = 16


@jax.jit
def _merge(state, scores, ids, payload, mask):
    return S.merge_top_k(state, scores, ids, payload, mask)


@jax.jit
def _merge_class(state, scores, classes, ids, payload, mask):
    return S.merge_class_top_k(state, scores, classes, ids, payload, mask)


def _chunks(n, order):
    starts = np.arange(0, n, CHUNK)[order]
    for s in starts:
        idx = np.arange(s, min(s + CHUNK, n))
        pad = CHUNK - len(idx)
        mask = np.r_[np.ones(len(idx), bool), np.zeros(pad, bool)]
        yield np.r_[idx, np.zeros(pad, int)], mask


def test_merge_top_k_equals_full_sort():
    r = rng(5)
    n, k = 100, 12
    scores = np.round(r.normal(size=n), 1).astype(np.float32)  # ties broken by id
    ids = r.permutation(100_000)[:n].astype(np.int32)
    feats = r.normal(size=(n, 3)).astype(np.float32)
    spec = {
        "feat": jax.ShapeDtypeStruct((3,), jnp.float32),
        "cls": jax.ShapeDtypeStruct((), jnp.int32),
    }
    want = full_order(scores, ids)[:k]
    n_chunks = -(-n // CHUNK)
    results = []
    for order in (np.arange(n_chunks), r.permutation(n_chunks)):
        state = S.init_top_k(k, spec)
        for idx, mask in _chunks(n, order):
            state = _merge(
                state,
                scores[idx],
                ids[idx],
                {"feat": feats[idx], "cls": idx.astype(np.int32)},
                mask,
            )
        np.testing.assert_array_equal(np.asarray(state.ids), ids[want])
        close(state.scores, scores[want])
        close(state.payload["feat"], feats[want])
        results.append(state)
    # two "hosts" each see half of the chunks; merging their states gives the same result
    order = r.permutation(n_chunks)
    hosts = [S.init_top_k(k, spec), S.init_top_k(k, spec)]
    for h, part in enumerate((order[: n_chunks // 2], order[n_chunks // 2 :])):
        for idx, mask in _chunks(n, part):
            hosts[h] = _merge(
                hosts[h],
                scores[idx],
                ids[idx],
                {"feat": feats[idx], "cls": idx.astype(np.int32)},
                mask,
            )
    merged = S.merge_top_k_states(hosts[1], hosts[0])
    np.testing.assert_array_equal(np.asarray(merged.ids), ids[want])
    close(merged.payload["feat"], feats[want])
    # the same as the in-memory selection
    np.testing.assert_array_equal(
        np.asarray(merged.ids), ids[np.asarray(S.select_top_k(scores, k, ids))]
    )
    # fewer items than k: empty slots stay empty
    state = S.merge_top_k(S.init_top_k(5), scores[:3], ids[:3])
    assert (np.asarray(state.ids)[3:] == S.EMPTY_ID).all()
    assert np.isneginf(np.asarray(state.scores)[3:]).all()


N_CLS, C_CLS, K_CLS = 96, 4, 32  # one compiled merge for every class-streaming test
FEAT = jax.ShapeDtypeStruct((2,), jnp.float32)


def _stream_classes(scores, classes, ids, feats, chunk_order):
    state = S.init_class_top_k(C_CLS, K_CLS, FEAT)
    for idx, mask in _chunks(len(scores), chunk_order):
        state = _merge_class(state, scores[idx], classes[idx], ids[idx], feats[idx], mask)
    return state


def test_class_streaming_equals_per_class_sort():
    r = rng(6)
    scores = np.round(r.normal(size=N_CLS), 1).astype(np.float32)
    ids = r.permutation(100_000)[:N_CLS].astype(np.int32)
    classes = r.choice(C_CLS, size=N_CLS, p=[0.5, 0.3, 0.17, 0.03]).astype(np.int32)
    classes[:3] = -1  # no class: dropped
    feats = r.normal(size=(N_CLS, 2)).astype(np.float32)
    n_chunks = -(-N_CLS // CHUNK)
    state = _stream_classes(scores, classes, ids, feats, r.permutation(n_chunks))
    for c in range(C_CLS):
        members = np.flatnonzero(classes == c)
        want = members[full_order(scores[members], ids[members])][:K_CLS]
        got = np.asarray(state.ids[c])
        np.testing.assert_array_equal(got[: len(want)], ids[want])
        assert (got[len(want) :] == S.EMPTY_ID).all()
        close(np.asarray(state.payload[c])[: len(want)], feats[want])
    # per-host states merge class by class
    odd = _stream_classes(scores, classes, ids, feats, np.arange(1, n_chunks, 2))
    even = _stream_classes(scores, classes, ids, feats, np.arange(0, n_chunks, 2))
    merged = S.merge_class_top_k_states(odd, even)
    np.testing.assert_array_equal(np.asarray(merged.ids), np.asarray(state.ids))
    close(merged.payload, state.payload)


def test_streaming_class_balanced_equals_in_memory():
    r = rng(10)
    scores = np.round(r.normal(size=N_CLS), 1).astype(np.float32)
    ids = r.permutation(100_000)[:N_CLS].astype(np.int32)
    feats = np.zeros((N_CLS, 2), np.float32)
    select = jax.jit(S.select_class_balanced, static_argnames=("per_class", "num_classes"))
    for per_class, classes in (
        (5, np.arange(N_CLS) % C_CLS),  # supply suffices
        (30, np.r_[3, 3, np.arange(N_CLS - 2) % 3]),
    ):  # class 3 has 2 items: global fill
        classes = classes.astype(np.int32)
        mem = ids[
            np.asarray(select(scores, classes, per_class=per_class, num_classes=C_CLS, ids=ids))
        ]
        state = _stream_classes(scores, classes, ids, feats, r.permutation(-(-N_CLS // CHUNK)))
        fs, fids, fcls, _, valid = S.flatten_class_top_k(state)
        sel = np.asarray(
            select(fs, jnp.where(valid, fcls, -1), per_class=per_class, num_classes=C_CLS, ids=fids)
        )
        sel = sel[np.asarray(valid)[sel]]  # empty heap slots can only fill beyond the pool size
        np.testing.assert_array_equal(np.asarray(fids)[sel], mem)


# ---------------------------------------------------------------------------------------
# APS
# ---------------------------------------------------------------------------------------


def ref_refine(f, y, mu, top_n, rounds):
    mu = np_normalize(mu)
    for _ in range(rounds):
        new = mu.copy()
        for c in range(len(mu)):
            members = np.flatnonzero(y == c)
            if len(members) == 0:
                continue
            cos = f[members] @ mu[c]
            top = members[np.lexsort((members, -cos))][:top_n]
            new[c] = np_normalize(f[top].mean(0))
        mu = new
    return mu


def test_refine_prototypes_against_reference():
    r = rng(7)
    f = np_normalize(r.normal(size=(NS, 5))).astype(np.float32)
    y = r.integers(0, 4, size=NS)
    y[y == 2] = 1  # class 2 empty keeps its initial prototype
    mu0 = r.normal(size=(4, 5)).astype(np.float32)
    refine = jax.jit(S.refine_prototypes, static_argnames=("top_n", "rounds"))
    got = refine(f, y, mu0, top_n=7, rounds=2)
    close(got, ref_refine(f.astype(np.float64), y, mu0, 7, 2), rtol=1e-5, atol=1e-6)
    # padded candidates (weight 0) change nothing; per-class top_n as an array
    pad_f = np.concatenate([f, np.ones((6, 5), np.float32)])
    pad_y = np.r_[y, np.zeros(6, int)]
    w = np.r_[np.ones(NS), np.zeros(6)]
    close(refine(pad_f, pad_y, mu0, top_n=7, rounds=2, weights=w), got)


def test_quantile_gate_against_numpy():
    r = rng(8)
    p = r.uniform(size=NS).astype(np.float32)
    y = r.integers(0, 5, size=NS)
    y[y == 4] = 3  # class 4 empty
    for q in (0.5, 0.25, 0.9):
        gamma, passed = S.quantile_gate(p, y, 5, q)
        gamma, passed = np.asarray(gamma), np.asarray(passed)
        for c in range(4):
            close(gamma[c], np.quantile(p[y == c].astype(np.float64), q))
        assert np.isinf(gamma[4])
        np.testing.assert_array_equal(passed, p >= gamma[y])


def test_aps_scores():
    r = rng(9)
    cos = r.uniform(-1, 1, size=NS).astype(np.float32)
    logp = np.log(r.uniform(0.05, 1, size=NS)).astype(np.float32)
    y = r.integers(0, 3, size=NS)
    got = np.asarray(S.aps_scores(cos, logp, y, alpha=0.3))
    want = 0.3 * np.asarray(S.rank01(cos, y)) + 0.7 * np.asarray(S.rank01(logp, y))
    close(got, want)
    assert got.min() >= 0 and got.max() <= 1
    # alpha = 0: ranking inside each class = ranking by log p (DFND)
    only_p = np.asarray(S.aps_scores(cos, logp, y, alpha=0.0))
    for c in range(3):
        m = y == c
        np.testing.assert_array_equal(
            np.argsort(only_p[m], kind="stable"), np.argsort(logp[m], kind="stable")
        )
