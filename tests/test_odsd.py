"""ODSD (odsd.md): APS invariants, LNR and DCRD properties, end-to-end offline and ImageNet runs."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kd_jax import config_utils, diagnostics, losses, models, parallel, pool, train
from kd_jax.data import pipeline, shards
from kd_jax.methods import odsd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C = 10


# Candidates per class = HEAP_FACTOR * n_c: large enough that a randomly initialised teacher,
# which puts the pool into few classes, still leaves >= N candidates (|D| = N).
HEAP_FACTOR = 10.0


def _aps(**overrides):
    aps = odsd.default_config().aps
    aps.heap_factor = HEAP_FACTOR
    for k, v in overrides.items():
        aps[k] = v
    return aps


def _teacher():
    model = models.create_model("lenet5", C)
    variables = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 32, 32, 1)))
    return model, variables


def _pool_images(n=240, seed=0):
    """Structured random 28x28 images (blobs of different sizes) so a random LeNet spreads them
    over several classes."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:28, :28]
    images = []
    for _ in range(n):
        cy, cx, r = rng.uniform(6, 22), rng.uniform(6, 22), rng.uniform(2, 12)
        blob = 255.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r)
        images.append(np.clip(blob + rng.normal(0, 40, (28, 28)), 0, 255))
    return np.asarray(images, np.uint8)[..., None]


def _write_pool(path, images, ids, num_shards=3):
    shards.write_shards(
        path, images, ids=ids, num_shards=num_shards, sources=["a" if i % 3 else "b" for i in ids]
    )
    return shards.shard_pattern(path)


def _score(workdir, pattern, heap):
    model, variables = _teacher()
    spec = ml_collections.ConfigDict({"source": "shards", "pattern": pattern})
    domain = pipeline.Domain(32, 1, "mnist")
    return pool.score_pool(
        str(workdir),
        spec,
        teacher_model=model,
        teacher_vars=variables,
        domain=domain,
        num_classes=C,
        batch_size=64,
        heap_size=heap,
    )


def _top_l_per_class(ids, classes, confidence, num_classes, heap_len):
    """In-memory reference of the streamed heaps: per class the L most confident items
    (confidence desc, id asc). Returns indices into the inputs, sorted."""
    keep = []
    for c in range(num_classes):
        idx = np.flatnonzero(classes == c)
        order = np.lexsort((ids[idx], -confidence[idx]))
        keep.append(idx[order[:heap_len]])
    return np.sort(np.concatenate(keep))


def _select(scores, aps, size, gamma=None):
    model, variables = _teacher()
    if gamma is None:
        gamma = np.asarray(
            odsd.sampling.quantile_gate(
                jnp.asarray(scores.confidence, jnp.float32),
                jnp.asarray(scores.pred),
                C,
                q=aps.gate_quantile,
            )[0]
        )
    conf = pool.lookup(scores.ids, scores.confidence, scores.cand_ids)
    head = odsd.head_kernel(variables["params"], 84, C)
    return odsd.aps_select(
        scores.cand_ids,
        scores.cand_class,
        scores.cand_feat,
        conf,
        num_classes=C,
        size=size,
        aps=aps,
        gamma=gamma,
        head_weight=head,
    )


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """One pool, scored twice: shards in one order and (permuted) in another."""
    base = tmp_path_factory.mktemp("pool")
    images = _pool_images()
    ids = np.arange(1000, 1000 + len(images))
    size = 60
    heap = odsd.heap_size(_aps(heap_factor=HEAP_FACTOR), size, C)
    pattern = _write_pool(base / "a", images, ids)
    a = _score(base / "wa", pattern, heap)
    perm = np.random.default_rng(1).permutation(len(images))
    b = _score(base / "wb", _write_pool(base / "b", images[perm], ids[perm], num_shards=4), heap)
    return {"a": a, "b": b, "size": size, "heap": heap, "pattern": pattern}


def test_aps_is_permutation_invariant_and_balanced(scored):
    a, size = scored["a"], scored["size"]
    assert np.bincount(a.pred, minlength=C).max() < len(a.pred)  # several classes are present
    sel_a = _select(a, _aps(), size)
    sel_b = _select(scored["b"], _aps(), size)
    np.testing.assert_array_equal(sel_a["ids"], sel_b["ids"])
    assert len(sel_a["ids"]) == size and len(np.unique(sel_a["ids"])) == size
    # Quota: every class with enough teacher-assigned images gets exactly n_c = ceil(N/C).
    n_c = odsd.per_class_quota(size, C)
    supply = np.bincount(a.pred, minlength=C)
    counts = np.bincount(sel_a["classes"], minlength=C)
    rich = supply >= n_c
    if (supply[~rich].sum() + n_c * rich.sum()) >= size and (~rich).any():
        assert (counts[~rich] == supply[~rich]).all()  # poor classes give everything they have
    assert (counts[rich] >= n_c).all()


def test_aps_quota_exact_when_supply_suffices():
    rng = np.random.default_rng(0)
    k, d = 400, 16
    cls = np.repeat(np.arange(C), k // C)
    feats = rng.normal(size=(k, d)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    conf = rng.uniform(0.2, 1.0, k).astype(np.float32)
    ids = rng.permutation(10 * k)[:k]
    for size in (50, 100, 200):
        out = odsd.aps_select(
            ids,
            cls,
            feats,
            conf,
            num_classes=C,
            size=size,
            aps=_aps(init="confident_mean"),
            gamma=np.full(C, 0.5),
        )
        assert len(out["ids"]) == size
        assert (np.bincount(out["classes"], minlength=C) == size // C).all()
        # Inside each class the gate (conf >= 0.5) is honoured first.
        for c in range(C):
            gated = (cls == c) & (conf >= 0.5)
            if gated.sum() >= size // C:
                assert out["gated"][out["classes"] == c].all()


def test_streaming_selection_equals_in_memory(scored):
    """Heaps kept while streaming == per-class top-L of the full in-memory teacher pass."""
    a, size, heap = scored["a"], scored["size"], scored["heap"]
    model, variables = _teacher()
    spec = ml_collections.ConfigDict({"source": "shards", "pattern": scored["pattern"]})
    ds, _ = pipeline.open_source(spec, "train")
    domain = pipeline.Domain(32, 1, "mnist")
    elems = sorted(
        ds.map(
            lambda e: {"image": pipeline.preprocess(e, domain, "none"), "id": e["id"]}
        ).as_numpy_iterator(),
        key=lambda e: e["id"],
    )
    xs = np.stack([e["image"] for e in elems])
    ids = np.asarray([e["id"] for e in elems])
    logits, feats = model.apply(variables, xs)
    p = jax.nn.softmax(logits)
    conf, pred = np.asarray(p.max(-1)), np.asarray(p.argmax(-1))
    f = np.asarray(feats["pre_logits"])
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    keep = _top_l_per_class(ids, pred, conf, C, heap)
    np.testing.assert_array_equal(np.sort(a.cand_ids), ids[keep])
    gamma = np.asarray(odsd.sampling.quantile_gate(jnp.asarray(conf), jnp.asarray(pred), C)[0])
    mem = odsd.aps_select(
        ids[keep],
        pred[keep],
        f[keep].astype(np.float16),
        conf[keep],
        num_classes=C,
        size=size,
        aps=_aps(),
        gamma=gamma,
        head_weight=odsd.head_kernel(variables["params"], 84, C),
    )
    streamed = _select(a, _aps(), size)
    np.testing.assert_array_equal(mem["ids"], streamed["ids"])


def test_dfnd_special_case_is_global_confidence_top_n(tmp_path):
    images = _pool_images(160, seed=5)
    ids = np.arange(len(images)) * 7 + 3
    size = 50
    aps = _aps(alpha=0.0, gate="none", balance=False)
    scores = _score(
        tmp_path / "w", _write_pool(tmp_path / "p", images, ids), odsd.heap_size(aps, size, C)
    )
    out = _select(scores, aps, size, gamma=np.zeros(C))
    order = np.lexsort((scores.ids, -scores.confidence))
    np.testing.assert_array_equal(out["ids"], np.sort(scores.ids[order[:size]]))


# ----- LNR ----------------------------------------------------------------------------------


def test_lnr_rho_one_equals_kd_and_keeps_argmax():
    rng = np.random.default_rng(0)
    zt = jnp.asarray(rng.normal(0, 3, (32, C)), jnp.float32)
    zs = jnp.asarray(rng.normal(0, 1, (32, C)), jnp.float32)
    with jax.enable_x64(True):  # one value through two programs: compared in float64
        zt64, zs64 = jnp.asarray(zt, jnp.float64), jnp.asarray(zs, jnp.float64)
        t, kept = losses.low_noise_targets(zt64, 4.0, rule="top_p", rho=1.0, k_max=C)
        assert bool(kept.all())
        np.testing.assert_allclose(
            losses.soft_target_cross_entropy(zs64, t, 4.0),
            losses.kd_loss(zs64, zt64, 4.0),
            rtol=1e-12,
        )
    for rho in (0.3, 0.9):
        _, kept = losses.low_noise_targets(zt, 4.0, rule="top_p", rho=rho)
        assert bool(kept[jnp.arange(32), jnp.argmax(zt, -1)].all())
        assert int(kept.sum(-1).max()) <= C // 2


def test_lnr_uniform_tail_against_float64_reference():
    """tail=uniform: p_tau kept on K_i, the dropped mass spread evenly outside; KD when ρ = 1."""
    rng = np.random.default_rng(1)
    zt = rng.normal(0, 3, (32, C))
    tau = 4.0
    t, kept = losses.low_noise_targets(jnp.asarray(zt, jnp.float32), tau, rho=0.9, tail="uniform")
    _, kept_drop = losses.low_noise_targets(jnp.asarray(zt, jnp.float32), tau, rho=0.9)
    kept = np.asarray(kept)
    np.testing.assert_array_equal(kept, np.asarray(kept_drop))  # same K_i, only the tail differs
    assert 0 < kept.sum(-1).min() and kept.sum(-1).max() < C  # some rows do drop classes
    p = np.exp(zt / tau - (zt / tau).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    out = (p * ~kept).sum(-1, keepdims=True) / np.maximum((~kept).sum(-1, keepdims=True), 1)
    np.testing.assert_allclose(np.asarray(t), np.where(kept, p, out), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(t).sum(-1), 1.0, rtol=1e-5)
    t1, _ = losses.low_noise_targets(
        jnp.asarray(zt, jnp.float32), tau, rho=1.0, k_max=C, tail="uniform"
    )
    np.testing.assert_allclose(np.asarray(t1), p, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="tail"):
        losses.low_noise_targets(jnp.asarray(zt, jnp.float32), tau, tail="flat")


def test_lnr_prior_rule_against_float64_reference_and_global_over_devices():
    """rule=prior: t_i = softmax(z_i/τ - log π), π the (weighted) batch mean of softmax(z/τ);
    a class every row leans to loses that lean; the mean is over the global batch."""
    rng = np.random.default_rng(2)
    tau = 4.0
    zt = rng.normal(0, 3, (32, C))
    zt[:, 3] += 6.0  # a "sink" class: every row's tail leans to class 3
    w = rng.uniform(0.5, 2.0, 32)
    w[:5] = 0.0  # rows not counted in the mean

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    pi = (w[:, None] * softmax(zt / tau)).sum(0) / w.sum()
    want = softmax(zt / tau - np.log(pi))
    with jax.enable_x64(True):
        t, kept = losses.low_noise_targets(jnp.asarray(zt), tau, rule="prior", row_weights=w)
        np.testing.assert_allclose(np.asarray(t), want, rtol=1e-12, atol=1e-15)
        assert bool(kept.all())
        # permuting the rows permutes the targets; unweighted = weights of one
        perm = rng.permutation(32)
        t_perm, _ = losses.low_noise_targets(jnp.asarray(zt[perm]), tau, rule="prior")
        t_all, _ = losses.low_noise_targets(jnp.asarray(zt), tau, rule="prior")
        np.testing.assert_allclose(np.asarray(t_perm), np.asarray(t_all)[perm], rtol=1e-12)
        # sharded over 8 devices inside jit = one device: the mean is the global batch's
        mesh = parallel.make_mesh(jax.devices()[:8])
        zt_sharded = parallel.global_batch({"z": np.asarray(zt)}, mesh)["z"]
        f = jax.jit(lambda z: losses.low_noise_targets(z, tau, rule="prior")[0])
        np.testing.assert_allclose(np.asarray(f(zt_sharded)), np.asarray(t_all), rtol=1e-12)
    # the sink class's mean target mass falls from the teacher's to about 1 / C
    p_tau = softmax(zt / tau)
    sink = float(np.asarray(t)[:, 3].mean())
    assert p_tau[:, 3].mean() > 2.5 / C and abs(sink - 1 / C) < 0.03, (p_tau[:, 3].mean(), sink)


# ----- DCRD ---------------------------------------------------------------------------------


def test_dcrd_zero_for_teacher_features_and_permutation_invariant():
    """Zero at equality and permutation invariance, in float64 (reordering moves ~1e-16)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        ft = jnp.asarray(rng.normal(size=(16, 12)))
        assert float(losses.relation_kl_loss(ft, ft, 0.5)) == pytest.approx(0.0, abs=1e-12)
        fs = jnp.asarray(rng.normal(size=(16, 7)))
        w = jnp.asarray(rng.uniform(0.1, 1, 16))
        perm = rng.permutation(16)
        np.testing.assert_allclose(
            losses.relation_kl_loss(fs, ft, 0.5, weights=w),
            losses.relation_kl_loss(fs[perm], ft[perm], 0.5, weights=w[perm]),
            rtol=1e-12,
        )
        z1 = jnp.asarray(rng.normal(size=(16, 8)))
        z2 = jnp.asarray(rng.normal(size=(16, 8)))
        np.testing.assert_allclose(
            losses.nt_xent(z1, z2), losses.nt_xent(z1[perm], z2[perm]), rtol=1e-12
        )


# ----- diagnostics --------------------------------------------------------------------------


def test_bn_statistics_distance_is_zero_on_matching_statistics():
    model = models.create_model("wrn16_1", C)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    d = diagnostics.bn_statistics_distance(model, variables, [np.asarray(x)])
    assert d is not None and d > 0
    model_l, vars_l = _teacher()
    assert diagnostics.bn_statistics_distance(model_l, vars_l, [np.zeros((2, 32, 32, 1))]) is None


# ----- end to end ---------------------------------------------------------------------------


def _config(name, arg):
    return config_utils.load_config(os.path.join(ROOT, "configs", name), arg)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, offline_teacher):
    """`odsd_mnist.py:smoke` with the adaptive refresh (§1F) every 3 epochs over D."""
    workdir = tmp_path_factory.mktemp("odsd_smoke")
    c = _config("odsd_mnist.py", "smoke")
    c.teacher.workdir = offline_teacher
    c.odsd.aps.refresh_epochs = 3
    c.async_checkpoints = False
    return c, workdir, train.train_and_evaluate(c, str(workdir))


def test_odsd_mnist_smoke_end_to_end(smoke_run):
    _, tmp_path, results = smoke_run
    report = results["selection"]
    assert report["selection_size"] == 1000 and report["rule"] == "aps"
    assert report["selection_per_class"] == [100] * C
    assert report["selection_related_share"] > report["pool_related_share"]
    assert (tmp_path / "sampling.png").stat().st_size > 0
    assert results["final_accuracy"] >= SMOKE_ACCURACY, results["final_accuracy"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["selection"]["selection_source_share"].keys() >= {"font_digits", "sklearn_digits"}
    assert json.loads((tmp_path / "selection_report.json").read_text()) == saved["selection"]


def test_adaptive_refresh_reranks_candidates_and_resumes_on_them(smoke_run):
    c, tmp_path, _ = smoke_run
    first = pool.Selection.load(str(tmp_path / "selection.npz"))
    every = 3 * (1000 // 64 + 1)  # 3 epochs of ceil(N / batch) steps
    refreshed = sorted(tmp_path.glob("selection_step*.npz"))
    assert [p.name for p in refreshed] == [
        f"selection_step{s:08d}.npz" for s in range(every, c.num_steps, every)
    ]
    for p in refreshed:
        sel = pool.Selection.load(str(p))
        assert len(sel.ids) == 1000 and len(np.unique(sel.ids)) == 1000
        assert np.bincount(sel.classes, minlength=C).tolist() == [100] * C
        assert 0 < np.isin(sel.ids, first.ids).sum() < 1000  # re-ranked, not replaced
    # A resumed run trains on the selection in force at its start step.
    method = odsd.ODSD(c, str(tmp_path), parallel.make_mesh(jax.devices()[:1]))
    method.prepare()
    method.train_batches(every + 1)
    np.testing.assert_array_equal(method.keep_ids, pool.Selection.load(str(refreshed[0])).ids)
    # η = 0: the refresh re-ranks by the APS score alone and gives back the first selection.
    c0 = c.copy_and_resolve_references()
    c0.odsd.aps.refresh_eta = 0.0
    method = odsd.ODSD(c0, str(tmp_path), parallel.make_mesh(jax.devices()[:1]))
    method.prepare()
    method.build_optimizer(10)
    state = method.init_state(jax.random.PRNGKey(0))
    selection, report = method._refreshed_selection(state)
    np.testing.assert_array_equal(selection.ids, first.ids)
    assert report["kept"] == 1000 and report["mean_kl"] > 0


# 4 seeds: 0.785 ± 0.042, 4.4 stds above (benchmarks/results/smoke_seeds.md; teacher 0.956)
SMOKE_ACCURACY = 0.6
