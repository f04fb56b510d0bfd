"""ODSD for segmentation (§5): the per-image statistics of pixel logits and the per-pixel LNR
against float64 NumPy references, padded / ignored pixels, the streamed segmentation pool pass
(= in memory, invariant to the pool's order) and `odsd_segmnist.py:smoke` end to end."""

import functools
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from helpers import config, write_teacher

from kd_jax import losses, models, pool, sampling
from kd_jax.data import pipeline, segmnist, shards
from kd_jax.methods import odsd

C, BG = 11, segmnist.BACKGROUND


# ----- float64 NumPy references --------------------------------------------------------------


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference_stats(logits, background, mask):
    """Pixel loops: per image the means over its counted pixels."""
    out = {k: [] for k in ("confidence", "entropy", "energy", "margin", "share", "pred")}
    for b in range(logits.shape[0]):
        z = logits[b][mask[b] > 0]  # [P, C]
        c = z.shape[-1]
        if not len(z):
            for k in ("confidence", "entropy", "energy", "margin"):
                out[k].append(0.0)
            out["share"].append(np.zeros(c))
            out["pred"].append(1 if background == 0 else 0)
            continue
        p = _softmax(z)
        top = np.sort(p, -1)
        out["confidence"].append(top[:, -1].mean())
        out["margin"].append((top[:, -1] - top[:, -2]).mean())
        out["entropy"].append(-(p * np.log(p)).sum(-1).mean())
        out["energy"].append(
            (z.max(-1) + np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1))).mean()
        )
        share = p.mean(0)
        out["share"].append(share)
        fg = [k for k in range(c) if k != background]
        out["pred"].append(fg[int(np.argmax(share[fg]))])
    return {k: np.asarray(v) for k, v in out.items()}


def _reference_lnr(s, t, tau, rho, k_max, weights, confidence_weight, apply_to):
    """Per pixel: K = smallest top set with cumulative p_T >= rho (|K| in [1, k_max]), the target
    softmax over K of z_T/τ, then τ²·Σ_p w_p KL / Σ_p w_p."""
    c = t.shape[-1]
    s, t, w = s.reshape(-1, c), t.reshape(-1, c), weights.reshape(-1).astype(np.float64)
    c1 = _softmax(t).max(-1)
    if confidence_weight:
        w = w * c1 / ((w * c1).sum() / w.sum())
    num = 0.0
    for i in np.flatnonzero(w > 0):
        p = _softmax(t[i])
        order = np.argsort(-p, kind="stable")
        size = 0
        while size < c and p[order[:size]].sum() < rho:
            size += 1
        kept = order[: int(np.clip(size, 1, k_max))]
        target = _softmax(t[i][kept] / tau)
        zs = s[i][kept] if apply_to == "both" else s[i]
        logq = np.log(_softmax(zs / tau))
        logq = logq if apply_to == "both" else logq[kept]
        num += w[i] * np.sum(target * (np.log(target) - logq))
    return tau**2 * num / w[w > 0].sum()


def test_segmentation_image_statistics_against_float64_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 5, 6, 5))
    mask = (rng.uniform(size=(4, 5, 6)) > 0.3).astype(np.float64)
    mask[3] = 0  # an image without a counted pixel
    logits[0, ..., 4] += 4  # background-dominated image: pred is still a foreground class
    with jax.enable_x64(True):
        for background, pixel_mask in ((4, mask), (None, mask), (0, None)):
            got = sampling.segmentation_image_statistics(
                jnp.asarray(logits), background=background, pixel_mask=pixel_mask
            )
            m = np.ones(logits.shape[:3]) if pixel_mask is None else pixel_mask
            ref = _reference_stats(logits, background, m)
            for k in ("confidence", "entropy", "energy", "margin", "share"):
                np.testing.assert_allclose(np.asarray(got[k]), ref[k], rtol=1e-12, atol=1e-12)
            np.testing.assert_array_equal(np.asarray(got["pred"]), ref["pred"])
            if background is not None:
                assert (np.asarray(got["pred"]) != background).all()


def test_pixel_lnr_against_float64_numpy_and_kd_special_case():
    rng = np.random.default_rng(1)
    s = rng.normal(0, 2, (2, 3, 4, 6))
    t = rng.normal(0, 3, (2, 3, 4, 6))
    mask = (rng.uniform(size=(2, 3, 4)) > 0.25).astype(np.float64)
    with jax.enable_x64(True):
        for apply_to in ("teacher", "both"):
            for cw in (False, True):
                got, targets, kept = losses.pixel_low_noise_loss(
                    jnp.asarray(s),
                    jnp.asarray(t),
                    4.0,
                    pixel_mask=mask,
                    apply_to=apply_to,
                    confidence_weight=cw,
                    rule="top_p",
                    rho=0.9,
                    k_max=3,
                )
                ref = _reference_lnr(s, t, 4.0, 0.9, 3, mask, cw, apply_to)
                np.testing.assert_allclose(float(got), ref, rtol=1e-10)
                assert targets.shape == t.shape and kept.shape == t.shape
                assert bool(
                    jnp.all(kept.reshape(-1, 6)[jnp.arange(24), t.reshape(-1, 6).argmax(-1)])
                )
        # ρ = 1, k_max = C: plain per-pixel KD.
        full, _, _ = losses.pixel_low_noise_loss(
            jnp.asarray(s), jnp.asarray(t), 4.0, rule="top_p", rho=1.0, k_max=6
        )
        kd = losses.pixel_kd_loss(jnp.asarray(s), jnp.asarray(t), temperature=4.0)
        np.testing.assert_allclose(float(full), float(kd), rtol=1e-12)


def test_padded_and_ignored_pixels_change_nothing():
    """Garbage (NaN, huge logits) at uncounted pixels or in a padded image leaves the image
    statistics and the LNR loss exactly as without those pixels."""
    rng = np.random.default_rng(2)
    s = rng.normal(0, 2, (3, 4, 4, 5)).astype(np.float32)
    t = rng.normal(0, 3, (3, 4, 4, 5)).astype(np.float32)
    mask = np.ones((3, 4, 4), np.float32)
    mask[:, :, 3] = 0  # a padded column
    s2, t2 = s.copy(), t.copy()
    s2[:, :, 3], t2[:, :, 3] = np.nan, 1e4
    a = sampling.segmentation_image_statistics(t, background=4, pixel_mask=mask)
    b = sampling.segmentation_image_statistics(t2, background=4, pixel_mask=mask)
    crop = sampling.segmentation_image_statistics(t[:, :, :3], background=4)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
        np.testing.assert_allclose(np.asarray(a[k]), np.asarray(crop[k]), rtol=1e-6)
    kw = dict(rule="top_p", rho=0.9, confidence_weight=True)
    la = losses.pixel_low_noise_loss(s, t, 4.0, pixel_mask=mask, **kw)[0]
    lb = losses.pixel_low_noise_loss(s2, t2, 4.0, pixel_mask=mask, **kw)[0]
    lc = losses.pixel_low_noise_loss(s[:, :, :3], t[:, :, :3], 4.0, **kw)[0]
    assert float(la) == float(lb) and np.isfinite(float(la))
    np.testing.assert_allclose(float(la), float(lc), rtol=1e-6)
    # A padded image (weight 0) of garbage changes nothing either.
    pad_s = np.concatenate([s, np.full_like(s[:1], np.nan)])
    pad_t = np.concatenate([t, np.full_like(t[:1], 1e4)])
    w = np.array([1, 1, 1, 0], np.float32)
    pad_m = np.concatenate([mask, np.ones_like(mask[:1])])
    lp = losses.pixel_low_noise_loss(pad_s, pad_t, 4.0, weights=w, pixel_mask=pad_m, **kw)[0]
    # another batch shape regroups the float32 sums: equal up to rounding, on any CPU
    np.testing.assert_allclose(float(lp), float(la), rtol=1e-6)
    # The pipeline marks what a scale-down crop padded: `valid` 0 there, the image unchanged.
    domain = pipeline.Domain(
        image_size=16,
        channels=1,
        normalization="mnist",
        task="segmentation",
        scale_range=(0.5, 0.6),
    )
    img = rng.integers(1, 256, (16, 16, 1), dtype=np.uint8)
    e = {
        "image": tf.constant(img),
        "label": tf.constant(-1, tf.int64),
        "id": tf.constant(0, tf.int64),
    }
    seed = tf.constant([3, 4], tf.int64)
    out = pipeline._segmentation_train_element(e, domain, "scale_crop_flip", seed, views=2)
    plain, _ = pipeline.preprocess_segmentation(e, domain, "scale_crop_flip", seed)
    np.testing.assert_array_equal(out["image"].numpy(), plain.numpy())
    valid = out["valid"].numpy()
    assert 0 < valid.mean() < 1 and out["image2"].shape == (16, 16, 1)
    black = (0 - 0.1307) / 0.3081  # the normalised zero padding
    np.testing.assert_allclose(plain.numpy()[..., 0][valid == 0], black, rtol=1e-6)


# ----- the streamed segmentation pool pass ----------------------------------------------------


@functools.lru_cache(maxsize=1)
def _teacher():
    """A random DeepLabV3 with a sharpened 1×1 classifier, centred on the test pool (bias =
    minus the mean class response) so its pixel predictions spread over the classes. Returns
    (model, variables, the centred logits and the features of `_pool_images()`): one forward
    pass, compiled once for the whole file."""
    model = models.create_model("deeplabv3_resnet_small", C)
    x = _normalise(_pool_images())
    v = jax.device_get(model.init(jax.random.PRNGKey(0), x[:1]))
    head = v["params"]["classifier_4"]
    head["kernel"] = head["kernel"] * 30.0
    head["bias"] = np.zeros_like(head["bias"])
    logits, feats = jax.device_get(jax.jit(lambda v, x: model.apply(v, x, train=False))(v, x))
    head["bias"] = -logits.mean((0, 1, 2))
    return model, v, logits + head["bias"], feats


def _normalise(images):
    """The pool pass's preprocessing at the images' own size (MNIST normalisation)."""
    return (images.astype(np.float32) / 255.0 - 0.1307) / 0.3081


def _pool_images(n=32, size=32, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for _ in range(n):
        img = np.zeros((size, size))
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.uniform(4, size - 4, 2).tolist() + [rng.uniform(2, 10)]
            img = np.maximum(img, 255.0 * (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r))
        out.append(np.clip(img + rng.normal(0, 30, img.shape), 0, 255))
    return np.asarray(out, np.uint8)[..., None]


def _stats_fn(logits):
    return sampling.segmentation_image_statistics(logits, background=BG)


def _score(workdir, pattern, heap, model, variables):
    return pool.score_pool(
        str(workdir),
        ml_collections.ConfigDict({"source": "shards", "pattern": pattern}),
        teacher_model=model,
        teacher_vars=variables,
        domain=pipeline.Domain(32, 1, "mnist"),
        num_classes=C,
        batch_size=16,
        heap_size=heap,
        image_stats=_stats_fn,
    )


def _aps():
    cfg = odsd.default_config().aps
    cfg.size = 16
    return cfg


def test_segmentation_pool_pass_streamed_equals_in_memory_in_any_order(tmp_path):
    model, variables, logits, feats = _teacher()
    images = _pool_images()
    ids = np.arange(500, 500 + len(images))
    aps = _aps()
    heap = odsd.heap_size(aps, aps.size, C)
    # The shards hold the pool in another order (and split) than the in-memory pass.
    perm = np.random.default_rng(1).permutation(len(ids))
    shards.write_shards(
        tmp_path / "p", images[perm], ids=ids[perm], num_shards=3, sources=["s"] * len(ids)
    )
    streamed = _score(tmp_path / "w", shards.shard_pattern(tmp_path / "p"), heap, model, variables)

    # In memory: one forward pass over the pool in id order, the same pure statistics.
    ref = jax.device_get(_stats_fn(logits))
    assert len(np.unique(ref["pred"])) >= 3  # the balance has several classes to work with
    np.testing.assert_array_equal(streamed.ids, ids)
    np.testing.assert_array_equal(streamed.pred, ref["pred"])
    for k in ("confidence", "entropy", "energy", "margin"):
        np.testing.assert_allclose(getattr(streamed, k), ref[k], rtol=1e-5, atol=1e-6)
    f = np.asarray(feats["pre_logits"], np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    keep = []
    for c in range(C):  # per class the L most confident (confidence desc, id asc)
        idx = np.flatnonzero(ref["pred"] == c)
        keep.append(idx[np.lexsort((ids[idx], -ref["confidence"][idx]))[:heap]])
    keep = np.sort(np.concatenate(keep))
    mem = pool.PoolScores(
        ids=ids,
        pred=ref["pred"],
        confidence=ref["confidence"],
        entropy=ref["entropy"],
        energy=ref["energy"],
        margin=ref["margin"],
        sources=np.asarray(["s"] * len(ids)),
        cand_ids=ids[keep],
        cand_class=ref["pred"][keep],
        cand_feat=f[keep].astype(np.float16),
        cand_logp=np.log(ref["confidence"][keep]),
    )
    head = odsd.head_kernel(variables["params"], f.shape[1], C, conv_1x1=True)
    assert head is not None and head.shape == (f.shape[1], C)
    # The candidates listed in another order select the same images too.
    shuffled = pool.PoolScores(
        **{k: getattr(mem, k) for k in pool.PoolScores._SCALARS},
        cand_ids=mem.cand_ids[::-1],
        cand_class=mem.cand_class[::-1],
        cand_feat=mem.cand_feat[::-1],
        cand_logp=mem.cand_logp[::-1],
    )
    chosen = [odsd.aps_selection(s, aps.size, C, aps, head)[0] for s in (mem, streamed, shuffled)]
    for out in chosen[1:]:
        np.testing.assert_array_equal(np.sort(out["ids"]), np.sort(chosen[0]["ids"]))
    assert len(chosen[0]["ids"]) == aps.size and BG not in chosen[0]["classes"]


# ----- end to end ------------------------------------------------------------------------------


def _write_teacher(workdir):
    """A finished teacher workdir holding `_teacher()`: the e2e test checks the ODSD path, not a
    teacher's training."""
    write_teacher(workdir, "deeplabv3_resnet_small", C, _teacher()[1])


@pytest.mark.parametrize("arg", ["smoke"])
def test_odsd_segmnist_smoke_end_to_end(tmp_path, arg):
    """`odsd_segmnist.py:smoke` from a random teacher: the selection (APS over the canvas pool,
    |D| = N, no image balanced as background), per-pixel LNR + L_TR + L_SR steps, mIoU / pixel
    accuracy in results.json. What it guards: the path runs and reports; not that the student
    learns (a random teacher; even the trained smoke teacher only predicts background)."""
    from kd_jax import train

    _write_teacher(tmp_path / "teacher")
    c = config("odsd_segmnist.py", arg, async_checkpoints=False)
    c.teacher.workdir = str(tmp_path / "teacher")
    res = train.train_and_evaluate(c, str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    for r in (res, saved):
        assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_accuracy"] <= 1
        assert r["final_accuracy"] == r["pixel_accuracy"] and len(r["per_class_iou"]) == C
    rep = saved["selection"]
    n = c.odsd.aps.size
    assert rep["rule"] == "aps" and rep["selection_size"] == n
    assert rep["pool_size"] == c.data.transfer.pool_canvases
    assert rep["selection_per_class"][BG] == 0 and sum(rep["selection_per_class"]) == n
    assert 0 <= rep["selection_related_share"] <= 1 and "pool_related_share" in rep
    sel = pool.Selection.load(str(tmp_path / "run" / "selection.npz"))
    assert len(np.unique(sel.ids)) == n
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    train_rows = [m for m in metrics if "lnr" in m]
    assert train_rows and all(np.isfinite([m["lnr"], m["tr"], m["sr"]]).all() for m in train_rows)
