"""ODSD's out-of-distribution selection scores (kd_jax.sampling; pool.OODSpec): Mahalanobis with
a streamed shared-covariance fit, k-NN to a bank, the BatchNorm-statistics score — each against a
float64 NumPy reference, streamed = in-memory, invariant to permuting the pool, and ranking the
in-distribution points of a synthetic pool first. The pool pass itself (two streamed passes over
shards) is checked against the pure functions applied to a direct forward pass."""

import os

import flax.linen as nn
import helpers
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from helpers import SEED, rng

from kd_jax import models, pool
from kd_jax import sampling as S
from kd_jax.data import pipeline, shards
from kd_jax.methods import odsd

C, D = 4, 6


def close(actual, expected, rtol=1e-9, atol=1e-9, name=""):
    helpers.close(actual, expected, rtol, atol, name)


def np_fit(f, y, w, shrinkage):
    """Reference: weighted class means, pooled within-class covariance, ridge, inverse."""
    f, w = np.asarray(f, np.float64), np.asarray(w, np.float64)
    means = np.zeros((C, f.shape[1]))
    for c in range(C):
        m = (y == c) & (w > 0)
        if m.any():
            means[c] = (w[m, None] * f[m]).sum(0) / w[m].sum()
    diff = (f - means[np.clip(y, 0, C - 1)]) * np.sqrt(np.where((y >= 0) & (y < C), w, 0))[:, None]
    sigma = diff.T @ diff / w[(y >= 0) & (y < C)].sum()
    sigma += shrinkage * np.trace(sigma) / len(sigma) * np.eye(len(sigma))
    present = np.array([((y == c) & (w > 0)).any() for c in range(C)])
    return means, np.linalg.inv(sigma), present


def np_mahalanobis(f, means, prec, present):
    d2 = np.stack([np.einsum("nd,de,ne->n", f - m, prec, f - m) for m in means], 1)
    return -np.where(present[None], d2, np.inf).min(1)


def np_knn(f, bank, k, ids, bank_ids):
    fn = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    bn = bank / np.maximum(np.linalg.norm(bank, axis=1, keepdims=True), 1e-12)
    sims = fn @ bn.T
    sims[ids[:, None] == bank_ids[None, :]] = -np.inf
    return -np.sort(-sims, 1)[:, k - 1]


def _data(n=40, offset=0):
    r = rng(offset)
    f = r.normal(size=(n, D)) + 2 * r.normal(size=(C, D))[r.integers(0, C, n)]
    y = r.integers(-1, C + 1, n)  # some rows outside [0, C): never fitted
    w = r.uniform(0.2, 2.0, n) * (r.uniform(size=n) > 0.2)
    return f, y, w


def test_fit_and_scores_match_float64_numpy():
    f, y, w = _data()
    bank, bank_ids = rng(1).normal(size=(12, D)), np.arange(30, 42)
    layers = [
        (
            rng(2 + i).normal(size=(len(f), c)),
            rng(3 + i).uniform(0.1, 2, size=(len(f), c)),
            rng(4 + i).normal(size=c),
            rng(5 + i).uniform(0.1, 2, size=c),
        )
        for i, c in enumerate((3, 5))
    ]

    @jax.jit  # one program: eager float64 dispatch would compile op by op
    def run(f, y, w, bank, bank_ids, layers):
        fit = S.fit_gaussian(S.gaussian_stats(f, y, C, w), shrinkage=0.05)
        return (
            fit,
            S.mahalanobis_score(f, fit),
            S.mahalanobis_score(f, fit, classes=jnp.clip(y, 0, C - 1)),
            S.knn_score(f, bank, k=3, ids=jnp.arange(f.shape[0]), bank_ids=bank_ids),
            S.bn_statistics_score(layers, eps=1e-5),
        )

    with jax.enable_x64(True):
        fit, maha, maha_own, knn, bn = run(f, y, w, bank, bank_ids, layers)
    means, prec, present = np_fit(f, y, w, 0.05)
    close(fit.means, means)
    close(fit.precision, prec, rtol=1e-7)
    np.testing.assert_array_equal(fit.present, present)
    close(maha, np_mahalanobis(f, means, prec, present), rtol=1e-7, atol=1e-7)
    d2_own = np.einsum(
        "nd,de,ne->n", f - means[np.clip(y, 0, C - 1)], prec, f - means[np.clip(y, 0, C - 1)]
    )
    close(maha_own, -d2_own, rtol=1e-7, atol=1e-7)
    close(knn, np_knn(f, bank, 3, np.arange(len(f)), bank_ids))
    ref = sum(
        (((m - rm) ** 2 / (rv + 1e-5)) + (v - rv) ** 2 / (rv + 1e-5) ** 2).mean(1)
        for m, v, rm, rv in layers
    )
    close(bn, -ref)


def test_streamed_fit_equals_in_memory():
    """Chunked statistics merged in any order = one pass over everything (float64), so a
    sharded pool fits the same Gaussian whatever its shard count."""
    f, y, w = _data(n=57)
    cuts = np.sort(rng(7).choice(np.arange(1, len(f)), 4, replace=False))
    chunks = list(zip(np.split(f, cuts), np.split(y, cuts), np.split(w, cuts)))
    order = rng(8).permutation(len(chunks))

    @jax.jit
    def run(f, y, w, chunks):
        streamed = S.init_gaussian_stats(C, D, jnp.float64)
        for i in order:
            streamed = S.merge_gaussian_stats(
                streamed, S.gaussian_stats(chunks[i][0], chunks[i][1], C, chunks[i][2])
            )
        return S.gaussian_stats(f, y, C, w), streamed

    with jax.enable_x64(True):
        whole, streamed = run(f, y, w, chunks)
    for a, b in zip(streamed, whole):
        close(a, b, rtol=1e-10, atol=1e-10)


def test_permuting_the_pool_changes_nothing():
    """Fit, scores and ODSD's class-balanced selection by each score are invariant to the
    order of the pool (float64)."""
    f, y, w = _data(n=48)
    perm = rng(9).permutation(len(f))
    bank = f[:10]

    @jax.jit
    def scores(f, y, w, ids):
        fit = S.fit_gaussian(S.gaussian_stats(f, y, C, w))
        return {
            "mahalanobis": S.mahalanobis_score(f, fit),
            "knn": S.knn_score(f, bank, 2, ids=ids, bank_ids=jnp.arange(10)),
        }

    with jax.enable_x64(True):
        ids = np.arange(len(f))
        a = jax.device_get(scores(f, y, w, ids))
        b = jax.device_get(scores(f[perm], y[perm], w[perm], ids[perm]))
        for k in a:
            close(a[k][perm], b[k], rtol=1e-10, atol=1e-10)
            pred = np.clip(y, 0, C - 1)
            sel = lambda s, p, i: np.sort(
                i[np.asarray(S.select_class_balanced(s, p, 5, C, ids=i, total=18))]
            )
            np.testing.assert_array_equal(sel(a[k], pred, ids), sel(b[k], pred[perm], ids[perm]))


def test_synthetic_pool_ranks_in_distribution_first():
    """In-distribution: C Gaussian classes (shared covariance) whose BN-layer inputs follow the
    teacher's running statistics; shifted: the same noise around a point away from every class
    mean, with shifted layer statistics. Every score puts all in-distribution points first."""
    r = rng(11)
    n_in, n_out, d = 120, 120, 16
    mu = r.normal(size=(C, d))
    # class means on a sphere of radius 24: every in-distribution logit of its own class
    # (~24 ± noise) clears any shifted point's (< ~12), so energy separates on every seed
    mu = 24.0 * mu / np.linalg.norm(mu, axis=1, keepdims=True)
    cls = r.integers(0, C, n_in)
    f_in = mu[cls] + r.normal(size=(n_in, d))
    f_out = mu.mean(0) + 6.0 * np.eye(d)[0] * np.sign(r.normal()) + r.normal(size=(n_out, d))
    f = np.concatenate([f_in, f_out])
    inside = np.arange(len(f)) < n_in
    head = mu / np.linalg.norm(mu, axis=1, keepdims=True)  # a linear teacher head
    logits = f @ head.T
    pred = logits.argmax(1)
    conf_fit = inside  # the confident images: here, the in-distribution ones
    rm, rv = r.normal(size=8), r.uniform(0.5, 2.0, size=8)
    x_in = rm + np.sqrt(rv) * r.normal(size=(n_in, 49, 8))
    x_out = rm + 1.5 + 2.0 * np.sqrt(rv) * r.normal(size=(n_out, 49, 8))
    x = np.concatenate([x_in, x_out])

    @jax.jit
    def run(f, logits, pred, fit_w, layer):
        return {
            "energy": S.energy_score(logits),
            "mahalanobis": S.mahalanobis_score(
                f, S.fit_gaussian(S.gaussian_stats(f, pred, C, fit_w))
            ),
            "knn": S.knn_score(f, f[:60], k=5, ids=jnp.arange(f.shape[0]), bank_ids=jnp.arange(60)),
            "bn": S.bn_statistics_score([layer]),
        }

    layer = (x.mean(1), x.var(1), rm, rv)
    scores = jax.device_get(run(f, logits, pred, conf_fit.astype(np.float32), layer))
    for name, s in scores.items():
        s = np.asarray(s, np.float64)
        assert s[inside].min() > s[~inside].max(), (name, f"KD_TEST_SEED={SEED}")


def test_unknown_score_names_the_key():
    cfg = odsd.default_config()
    cfg.score = "mahalanobus"
    with pytest.raises(ValueError, match=r"config\.odsd\.score='mahalanobus'"):
        odsd.ood_spec(cfg, 4000, 10)


def test_pool_pass_equals_in_memory(tmp_path):
    """score_pool's streamed feature scores (fit in pass 1 over 3 shards, scored in pass 2;
    the BN score in pass 1) equal the references on a direct forward pass over the whole pool
    at once; a teacher without BatchNorm is refused the BN score, naming it."""
    r = rng(12)
    n = 30
    images = r.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    shards.write_shards(tmp_path / "pool", images, num_shards=3, sources=["a"] * n)
    spec = ml_collections.ConfigDict(
        {"source": "shards", "pattern": shards.shard_pattern(tmp_path / "pool")}
    )
    model = models.create_model("wrn10_1_half", C)
    variables = jax.device_get(
        model.init(jax.random.PRNGKey(SEED % 1000), np.zeros((1, 32, 32, 1), np.float32))
    )
    # Running statistics away from init's (0, 1), so the BN score is not trivial.
    variables["batch_stats"] = jax.tree.map(
        lambda v: v + rng(13).uniform(0.0, 0.2, v.shape).astype(v.dtype),
        variables["batch_stats"],
    )
    ood = pool.OODSpec(kinds=("mahalanobis", "knn", "bn"), fit_confidence=0.0, knn_k=2, knn_bank=4)
    domain = pipeline.Domain(32, 1, "mnist")
    scored = pool.score_pool(
        str(tmp_path / "work"),
        spec,
        teacher_model=model,
        teacher_vars=variables,
        domain=domain,
        num_classes=C,
        batch_size=8,
        ood=ood,
    )
    # The in-memory reference: every image through the teacher in one batch.
    x = np.stack(
        [
            pipeline.preprocess({"image": im[..., None]}, domain, "none").numpy()
            for im in images[np.asarray(scored.ids)]
        ]
    )
    layers = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm):
            a = np.asarray(args[0], np.float64)
            bs = context.module.variables["batch_stats"]
            layers.append((a.mean((1, 2)), a.var((1, 2)), bs["mean"], bs["var"]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        logits, feats = model.apply(variables, x, train=False)
    f = np.asarray(feats["pre_logits"], np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)  # as the pass
    pred = np.asarray(logits).argmax(1)
    np.testing.assert_array_equal(scored.pred, pred)
    means, prec, present = np_fit(f, pred, np.ones(n), ood.shrinkage)
    close(scored.extra["mahalanobis"], np_mahalanobis(f, means, prec, present), 2e-3, 2e-3)
    bank = pool.knn_bank(scored, 4)
    order = np.searchsorted(scored.ids, bank["ids"])
    close(
        scored.extra["knn"],
        np_knn(f, f[order], 2, np.asarray(scored.ids), bank["ids"]),
        rtol=2e-3,
        atol=2e-3,
    )
    ref_bn = sum(
        (((m - rm) ** 2 / (rv + 1e-5)) + (v - rv) ** 2 / (rv + 1e-5) ** 2).mean(1)
        for m, v, rm, rv in layers
    )
    close(scored.extra["bn"], -ref_bn, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="BatchNorm"):  # variables without running stats
        pool.score_pool(
            str(tmp_path / "work2"),
            spec,
            teacher_model=model,
            teacher_vars={"params": variables["params"]},
            domain=domain,
            num_classes=C,
            batch_size=8,
            ood=pool.OODSpec(kinds=("bn",)),
        )


def test_quality_curves_and_plot(tmp_path):
    """selection_quality: each rule's related share at each N equals a NumPy reference of ODSD's
    class balance (per class the ceil(N/C) best, shortfall from the global ranking); the plot
    is written."""
    from kd_jax import diagnostics

    r = rng(20)
    m = 90
    scores = pool.PoolScores(
        ids=np.arange(m, dtype=np.int64) * 3,
        pred=r.integers(0, C, m).astype(np.int32),
        confidence=r.uniform(size=m).astype(np.float32),
        entropy=r.uniform(size=m).astype(np.float32),
        energy=r.normal(size=m).astype(np.float32),
        margin=r.uniform(size=m).astype(np.float32),
        sources=np.where(r.uniform(size=m) < 0.4, "digit", "other"),
        cand_ids=np.zeros(0, np.int64),
        cand_class=np.zeros(0, np.int32),
        cand_feat=np.zeros((0, 1), np.float16),
        cand_logp=np.zeros(0, np.float32),
        extra={"knn": r.normal(size=m).astype(np.float32)},
    )
    rules = odsd.quality_rules(scores, odsd.default_config().aps, C)
    assert set(rules) == {"confidence", "energy", "knn"}  # no heaps: no APS line
    curves = pool.selection_quality(scores, rules, ["digit"], sizes=(10, 40, 200))
    related = scores.sources == "digit"
    for name in rules:
        s = np.asarray(scores.score(name), np.float64)
        assert set(curves[name]) == {10, 40}  # N above the pool is skipped
        for n, share in curves[name].items():
            quota = -(-n // C)
            picked = []
            for c in range(C):
                idx = np.flatnonzero(scores.pred == c)
                picked += list(idx[np.lexsort((scores.ids[idx], -s[idx]))][:quota])
            picked = np.asarray(picked)
            picked = picked[np.lexsort((scores.ids[picked], -s[picked]))][:n]
            if len(picked) < n:
                rest = np.setdiff1d(np.arange(m), picked)
                rest = rest[np.lexsort((scores.ids[rest], -s[rest]))][: n - len(picked)]
                picked = np.concatenate([picked, rest])
            assert share == pytest.approx(related[picked].mean()), (name, n)
    path = diagnostics.plot_selection_quality(
        str(tmp_path / "q.png"), curves, pool_share=related.mean(), mark=(40, 0.5)
    )
    assert os.path.getsize(path) > 1000
