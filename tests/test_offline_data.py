"""The offline benchmark data: MNIST-5k split and the bundled-image open-world pool."""

import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from kd_jax.data import offline


def test_mnist5k_fixed_stratified_split():
    d = offline.mnist5k()
    assert d["train_images"].shape == (4000, 28, 28, 1) and d["train_images"].dtype == np.uint8
    assert d["test_images"].shape == (1000, 28, 28, 1) and d["test_images"].dtype == np.uint8
    assert np.bincount(d["train_labels"], minlength=10).tolist() == [400] * 10
    assert np.bincount(d["test_labels"], minlength=10).tolist() == [100] * 10
    assert len(np.intersect1d(d["train_index"], d["test_index"])) == 0
    assert len(np.union1d(d["train_index"], d["test_index"])) == 5000
    # White on black, like MNIST: dark background, saturated strokes.
    assert d["train_images"].mean() < 60 and d["train_images"].max() == 255
    assert (d["train_images"][:, 0, :, 0] == 0).mean() > 0.95

    offline._mnist5k_cached.cache_clear()  # recomputed from scratch: the very same split
    again = offline.mnist5k()
    for k in d:
        np.testing.assert_array_equal(d[k], again[k])
    # The documented rule: one RandomState(0), classes 0..9 in turn, first 400 to train.
    images, labels, _, _ = offline._mnist5k_cached()
    rng = np.random.RandomState(0)
    first = np.flatnonzero(labels == 0)
    perm = first[rng.permutation(len(first))]
    assert set(perm[:400]) == set(d["train_index"][d["train_labels"] == 0])


def test_pool_sizes():
    assert offline.pool_sizes() == offline.DEFAULT_SIZES
    assert sum(offline.pool_sizes().values()) == 9797
    for n in (4, 300, 5000, 25000):
        sizes = offline.pool_sizes(n)
        assert sum(sizes.values()) == n and sizes["sklearn_digits"] <= 1797
    assert offline.pool_sizes(sizes={"font_letters": 0})["font_letters"] == 0
    with pytest.raises(ValueError, match="unknown"):
        offline.pool_sizes(sizes={"cifar": 3})


def test_pool_deterministic_shapes_sources():
    a = offline.build_offline_pool(seed=0, size=300)
    b = offline.build_offline_pool(seed=0, size=300)
    c = offline.build_offline_pool(seed=1, size=300)
    assert a["images"].shape == (300, 28, 28, 1) and a["images"].dtype == np.uint8
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["sources"], b["sources"])
    assert not np.array_equal(a["images"], c["images"])

    expected = offline.pool_sizes(300)
    tags, counts = np.unique(a["sources"], return_counts=True)
    assert dict(zip(tags.tolist(), counts.tolist())) == expected
    related = np.isin(a["sources"], offline.RELATED_SOURCES)
    assert offline.related_fraction(a["sources"]) == pytest.approx(
        (expected["sklearn_digits"] + expected["font_digits"]) / 300
    )
    assert (a["digit_labels"][related] >= 0).all() and (a["digit_labels"][~related] == -1).all()
    assert set(a["digit_labels"][related].tolist()) == set(range(10))
    # Shuffled: the first items are not all one source.
    assert len(set(a["sources"][:30].tolist())) > 1

    imgs = a["images"][..., 0].astype(float)
    for s in ("sklearn_digits", "font_digits", "font_letters"):
        g = imgs[a["sources"] == s]
        border = np.concatenate(
            [g[:, :2].ravel(), g[:, -2:].ravel(), g[:, :, :2].ravel(), g[:, :, -2:].ravel()]
        )
        assert border.mean() < 10, s  # glyphs: white on black, centred
        assert g.mean() < 90 and g.max() == 255, s
    photos = imgs[a["sources"] == "photo_crops"]
    assert photos.mean() > 40  # photos: not black frames


def test_changing_one_group_keeps_the_others():
    a = offline.build_offline_pool(
        seed=0,
        sizes={"sklearn_digits": 20, "font_digits": 20, "font_letters": 20, "photo_crops": 20},
    )
    b = offline.build_offline_pool(
        seed=0,
        sizes={"sklearn_digits": 20, "font_digits": 20, "font_letters": 5, "photo_crops": 20},
    )
    for s in ("font_digits", "photo_crops"):
        x = a["images"][a["sources"] == s]
        y = b["images"][b["sources"] == s]
        assert sorted(map(bytes, x)) == sorted(map(bytes, y))


def test_ensure_offline_pool_shards_cache_and_race(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow")
    from kd_jax.data import shards

    results = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                offline.ensure_offline_pool_shards(
                    cache_dir=str(tmp_path), seed=0, num_shards=4, size=120
                )
            )
        )
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and results[0] == results[1]
    pattern = results[0]
    entries = os.listdir(tmp_path)
    assert len(entries) == 1 and entries[0].startswith("offline_pool_v")  # no temp leftovers

    man = shards.read_manifest(os.path.dirname(pattern), offline.POOL_PREFIX)
    assert man["count"] == 120 and man["num_shards"] == 4 and not man["has_labels"]
    assert man["sources"] == offline.pool_sizes(120)
    pool = offline.build_offline_pool(seed=0, size=120)
    got = list(shards.iter_numpy(shards.read_shards(pattern)))
    assert sorted(e["id"] for e in got) == list(range(120))
    for e in got:
        assert e["image"].tobytes() == pool["images"][e["id"]].tobytes()
        assert e["source"] == pool["sources"][e["id"]] and e["label"] == -1

    def boom(*a, **k):
        raise AssertionError("rebuilt although cached")

    monkeypatch.setattr(offline, "build_offline_pool", boom)
    assert (
        offline.ensure_offline_pool_shards(cache_dir=str(tmp_path), seed=0, num_shards=4, size=120)
        == pattern
    )
    monkeypatch.setenv("KD_JAX_CACHE", str(tmp_path))
    assert offline.ensure_offline_pool_shards(seed=0, num_shards=4, size=120) == pattern


def test_ensure_mnist5k_npz(tmp_path):
    path = offline.ensure_mnist5k_npz(str(tmp_path))
    with np.load(path) as z:
        assert z["train_images"].shape == (4000, 28, 28, 1)
        np.testing.assert_array_equal(z["test_labels"], offline.mnist5k()["test_labels"])
    assert offline.ensure_mnist5k_npz(str(tmp_path)) == path


def test_save_pool_preview(tmp_path):
    from PIL import Image

    pool = offline.build_offline_pool(seed=0, size=80)
    path = offline.save_pool_preview(str(tmp_path / "preview.png"), pool, per_source=6)
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 300 and im.size[1] > 200


def test_import_is_light():
    code = (
        "import sys, kd_jax.data, kd_jax.data.offline; "
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
