"""UNO's published recipe: both views strongly augmented, multi-crop (small crops predict the
large views' targets), and the CIFAR / ImageNet configs that set it. The former two-view default
stays bit for bit what it was."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import config
from scipy.special import log_softmax

from kd_jax import losses, parallel
from kd_jax.data import pipeline
from kd_jax.methods import get_method, sckd

# ----- augmentation ---------------------------------------------------------------------------


def _uno_ncd(**overrides):
    ncd = sckd.default_config()["ncd"]
    ncd.update({"strong_views": "both", "strong_augment": "uno_cifar", "num_small_crops": 2})
    ncd.update(overrides)
    return ncd


def _batches(views, seed=3, channels=3, start_step=0, n=2):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 32, 32, channels)).astype(np.uint8)
    ds, _ = pipeline._array_source(images, np.arange(16) % 4, 0, 1)
    it = pipeline.train_iterator(
        ds,
        local_batch=8,
        steps_per_epoch=2,
        domain=pipeline.Domain(32, channels, "cifar10" if channels == 3 else "mnist"),
        augment="crop_flip",
        seed=seed,
        start_step=start_step,
        view_augments=views,
    )
    return [next(it) for _ in range(n)]


def test_strong_views_deterministic_in_the_seed_and_different_across_views():
    views = sckd.view_augments(_uno_ncd())
    assert list(views) == ["image", "image2", "image_small_0", "image_small_1"]
    first, again, other = _batches(views), _batches(views), _batches(views, seed=4)
    for b, b_again in zip(first, again):
        for key in b:
            np.testing.assert_array_equal(b[key], b_again[key])
    # A resumed stream repeats the batch at its position.
    resumed = _batches(views, start_step=1, n=1)[0]
    for key in resumed:
        np.testing.assert_array_equal(resumed[key], first[1][key])
    b = first[0]
    assert b["image"].shape == b["image2"].shape == (8, 32, 32, 3)
    assert b["image_small_0"].shape == b["image_small_1"].shape == (8, 18, 18, 3)
    assert not np.allclose(b["image"], other[0]["image"])
    assert not np.allclose(b["image"], b["image2"])
    assert not np.allclose(b["image_small_0"], b["image_small_1"])
    assert all(np.isfinite(v).all() for v in b.values())
    # Both large views are strong: UNO's jitter moves view 1 too, unlike the plain one.
    plain = _batches(dict(views, image=pipeline.PLAIN_VIEW), n=1)[0]
    assert not np.allclose(plain["image"], b["image"])
    # 1-channel images: the colour ops are skipped, the rest runs.
    gray = _batches(sckd.view_augments(_uno_ncd(small_crop_size=12)), channels=1, n=1)[0]
    assert gray["image"].shape == (8, 32, 32, 1) and gray["image_small_1"].shape == (8, 12, 12, 1)


def test_imagenet_recipe_small_crops_and_configured_scale():
    views = sckd.view_augments(
        _uno_ncd(strong_augment="uno_imagenet", small_crop_size=20, small_crop_scale=(0.2, 0.4))
    )
    assert views["image_small_0"].scale == (0.2, 0.4) and views["image_small_0"].blur_p == 0.5
    b = _batches(views, n=1)[0]
    assert b["image_small_0"].shape == (8, 20, 20, 3) and b["image"].shape == (8, 32, 32, 3)
    assert sckd.view_augments(_uno_ncd(strong_augment="uno_imagenet"))["image_small_0"].size == 96


def test_default_views_are_the_former_pair_bit_for_bit():
    """`ncd` defaults: view 1 plain, view 2 + SimCLR jitter, no small crop -- `views=2`."""
    views = sckd.view_augments(sckd.default_config()["ncd"])
    assert views == {"image": pipeline.PLAIN_VIEW, "image2": pipeline.SIMCLR_VIEW}
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (16, 32, 32, 3)).astype(np.uint8)
    ds, _ = pipeline._array_source(images, None, 0, 1)
    kw = dict(
        local_batch=8,
        steps_per_epoch=2,
        domain=pipeline.Domain(32, 3, "cifar10"),
        augment="crop_flip",
        seed=5,
    )
    a = next(pipeline.train_iterator(ds, views=2, **kw))
    b = next(pipeline.train_iterator(ds, view_augments=views, **kw))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def _np_equalize(image):
    """Pillow's ImageOps.equalize, per channel of a uint8 image (its loop, transcribed)."""
    out = np.empty_like(image)
    for c in range(image.shape[-1]):
        h = np.bincount(image[..., c].ravel(), minlength=256)
        histo = h[h > 0]
        step = (histo.sum() - histo[-1]) // 255
        if len(histo) <= 1 or not step:
            lut = np.arange(256)
        else:
            lut = np.minimum((step // 2 + np.concatenate([[0], np.cumsum(h)[:-1]])) // step, 255)
        out[..., c] = lut[image[..., c]]
    return out


def test_equalize_is_pillows():
    rng = np.random.default_rng(2)
    tf = pipeline.tf
    for shape, lo, hi in (((32, 32, 3), 0, 256), ((18, 18, 1), 40, 90), ((9, 7, 3), 100, 102)):
        image = rng.integers(lo, hi, shape).astype(np.uint8)
        ours = pipeline._equalize(tf.constant(image, tf.float32)).numpy()
        np.testing.assert_array_equal(ours, _np_equalize(image))
    flat = np.full((8, 8, 3), 7, np.uint8)
    np.testing.assert_array_equal(pipeline._equalize(tf.constant(flat, tf.float32)).numpy(), flat)


# ----- the multi-crop loss --------------------------------------------------------------------


def _method(name="uno", **overrides):
    c = config(
        "sckd_mnist.py",
        "smoke",
        **{"ncd.pretrain.enabled": False, "batch_size": 16, **overrides},
    )
    c.method = name
    return get_method(name)(c, "/tmp/unused", parallel.make_mesh(jax.devices()[:1]))


def _outs(m, num_views, b=16, seed=0, dtype=np.float64):
    """Random cosine logits of every head for `num_views` views, half the rows unlabeled."""
    rng = np.random.default_rng(seed)
    n, h = m.config.ncd, m.config.ncd.num_heads
    labels = rng.integers(0, m.num_known, b)
    labels[b // 2 :] = -1
    outs = [
        {
            "known": rng.uniform(-1, 1, (b, m.num_known)).astype(dtype),
            "novel": rng.uniform(-1, 1, (h, b, m.num_novel)).astype(dtype),
            "over": rng.uniform(-1, 1, (h, b, m.num_novel * n.overcluster_factor)).astype(dtype),
        }
        for _ in range(num_views)
    ]
    return outs, labels


def _np_sinkhorn(logits, iters, eps):
    """UNO's utils/sinkhorn_knopp.py."""
    q = np.exp(logits / eps).T
    q /= q.sum()
    k, b = q.shape
    for _ in range(iters):
        q /= q.sum(1, keepdims=True) * k
        q /= q.sum(0, keepdims=True) * b
    return (q * b).T


def _np_uno_loss(outs, labels, num_known, t, iters, eps, num_large=2):
    """UNO's main_discover.py training_step: targets from the large views, then
    `swapped_prediction` -- CE(logits[other], targets[view]) for every large view and every
    other view, / (num_large · (num_crops - 1))."""
    lab = labels >= 0

    def per_head(key):
        h = outs[0][key].shape[0]
        logits = [
            np.concatenate([np.broadcast_to(o["known"], (h, *o["known"].shape)), o[key]], -1)
            for o in outs
        ]
        targets = []
        for v in range(num_large):
            tv = np.zeros_like(logits[v])
            tv[:, lab, :num_known] = np.eye(num_known)[labels[lab]]
            for j in range(h):
                tv[j][np.ix_(~lab, np.arange(num_known, tv.shape[-1]))] = _np_sinkhorn(
                    outs[v][key][j][~lab], iters, eps
                )
            targets.append(tv)
        loss = 0.0
        for v in range(num_large):
            for u in np.delete(np.arange(len(outs)), v):
                loss = loss + np.mean(-np.sum(targets[v] * log_softmax(logits[u] / t, -1), -1), -1)
        return loss / (num_large * (len(outs) - 1))

    cluster, over = per_head("novel"), per_head("over")
    return 0.5 * (cluster.mean() + over.mean()), cluster


def test_multicrop_loss_is_unos_pair_average():
    with jax.enable_x64(True):
        m = _method(**{"ncd.num_small_crops": 2, "ncd.small_crop_size": 32, "dtype": "float64"})
        n = m.config.ncd
        for num_views in (4, 2):
            outs, labels = _outs(m, num_views)
            loss, cluster, _ = m.uno_loss(
                [{k: jnp.asarray(v) for k, v in o.items()} for o in outs], jnp.asarray(labels)
            )
            ref_loss, ref_cluster = _np_uno_loss(
                outs, labels, m.num_known, n.temperature, n.sk_iters, n.sk_epsilon
            )
            np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-10)
            np.testing.assert_allclose(np.asarray(cluster), ref_cluster, rtol=1e-10)
        # The small crops count: dropping them changes the loss.
        outs, labels = _outs(m, 4)
        four = _np_uno_loss(outs, labels, m.num_known, n.temperature, n.sk_iters, n.sk_epsilon)
        two = _np_uno_loss(outs[:2], labels, m.num_known, n.temperature, n.sk_iters, n.sk_epsilon)
        assert abs(four[0] - two[0]) > 1e-3


def _former_uno_loss(m, outs, labels):
    """The two-view UNO loss as it was before multi-crop (its code, kept here)."""
    t, h = m.config.ncd.temperature, m.config.ncd.num_heads
    labeled = labels >= 0

    def swapped(key):
        logits, targets = [], []
        for o in outs:
            kh = jnp.broadcast_to(o["known"], (h, *o["known"].shape))
            logits.append(jnp.concatenate([kh, o[key]], axis=-1))
            targets.append(m._targets(kh, o[key], labels, labeled))
        return jax.vmap(
            lambda l1, l2, t1, t2: losses.swapped_prediction_loss(l1, l2, t1, t2, temperature=t)
        )(logits[0], logits[1], targets[0], targets[1])

    cluster, over = swapped("novel"), swapped("over")
    return 0.5 * (cluster.mean() + over.mean()), cluster


def test_without_small_crops_the_loss_is_the_former():
    """Two large views only: the multi-crop loss is the former two-view loss. Two different
    programs, so compared in float64 (float32 fusion and summation order differ across CPUs)."""
    with jax.enable_x64(True):
        m = _method(dtype="float64")
        outs, labels = _outs(m, 2)
        outs = [{k: jnp.asarray(v) for k, v in o.items()} for o in outs]
        new = jax.jit(lambda o, y: m.uno_loss(o, y)[:2])(outs, jnp.asarray(labels))
        old = jax.jit(lambda o, y: _former_uno_loss(m, o, y))(outs, jnp.asarray(labels))
        for a, b in zip(new, old):
            assert np.asarray(a).dtype == np.float64
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-14)


def test_small_crops_reach_the_step_but_not_the_sckd_terms():
    """The step forwards every view; SCKD's extra terms see the two large views only."""
    m = _method("sckd", **{"ncd.num_small_crops": 2, "ncd.small_crop_size": 32})
    seen = []
    m.extra_loss = lambda outs, step, batch, frozen, rng: (seen.append(len(outs)) or 0.0, {})
    m.build_optimizer(10)
    state = m.init_state(jax.random.PRNGKey(0))
    batch = {k: jax.ShapeDtypeStruct((16, 32, 32, 1), jnp.float32) for k in m.view_augments} | {
        "label": jax.ShapeDtypeStruct((16,), jnp.int32)
    }
    jax.eval_shape(m.loss, state.params, state.batch_stats, batch, jax.random.PRNGKey(1), None, 0)
    assert list(m.view_augments)[2:] == ["image_small_0", "image_small_1"] and seen == [2]


# ----- configs --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,arg,recipe,factor",
    [
        ("sckd_cifar10.py", None, "uno_cifar", 10),
        ("sckd_cifar100.py", "80_20", "uno_cifar", 5),
        ("sckd_cifar100.py", "50_50,uno", "uno_cifar", 3),
        ("sckd_imagenet100.py", None, "uno_imagenet", 4),
    ],
)
def test_real_dataset_configs_default_to_unos_recipe(name, arg, recipe, factor):
    c = config(name, arg)
    n = c.ncd
    assert (n.strong_views, n.strong_augment, n.num_small_crops) == ("both", recipe, 2)
    assert (n.overcluster_factor, n.num_heads, n.hidden_dim, n.proj_dim) == (factor, 4, 2048, 256)
    images = 100 * 1300 if "imagenet" in name else 50000
    epochs = 60 if "imagenet" in name else 500
    assert c.num_steps == round(images / 512 * epochs)
    size = 96 if "imagenet" in name else 18
    assert sckd.view_augments(n)["image_small_1"].size == size
    # Stage 1 keeps its own schedule; `:smoke` keeps the multi-crop path at LeNet's 32 px.
    assert c.ncd.pretrain.train.num_steps != c.num_steps
    smoke = config(name, ",".join(filter(None, [arg, "smoke"])))
    assert smoke.num_steps == 2 and smoke.ncd.small_crop_size == 32


def test_offline_mnist_config_keeps_the_former_views():
    n = config("sckd_mnist.py").ncd
    assert (n.strong_views, n.strong_augment, n.num_small_crops) == ("second", "simclr", 0)


@pytest.mark.parametrize(
    "key,value",
    [
        ("strong_views", "all"),
        ("strong_augment", "uno"),
        ("num_small_crops", -1),
        ("small_crop_scale", (0.9, 0.2)),
    ],
)
def test_bad_view_values_name_their_key(key, value):
    with pytest.raises(ValueError, match=f"ncd.{key}"):
        sckd.view_augments(_uno_ncd(**{key: value}))


def test_simclr_small_crops_need_a_size():
    with pytest.raises(ValueError, match="ncd.small_crop_size"):
        sckd.view_augments(_uno_ncd(strong_augment="simclr"))
