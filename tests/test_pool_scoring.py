"""The streamed pool scorer (correct per-item scores, a killed pass resumes shard by shard), the
selection lifecycle, and how every pass over a pool treats a damaged or foreign file."""

import json
import logging
import os

import jax
import ml_collections
import numpy as np
import pytest

from kd_jax import models, pool
from kd_jax.data import pipeline, shards

NUM_SHARDS, PER_SHARD = 4, 6


def _score(tmp_path, teacher, variables):
    spec = ml_collections.ConfigDict(
        {"source": "shards", "pattern": shards.shard_pattern(tmp_path / "pool")}
    )
    domain = pipeline.Domain(image_size=32, channels=1, normalization="mnist")
    return pool.score_pool(
        str(tmp_path / "work"),
        spec,
        teacher_model=teacher,
        teacher_vars=variables,
        domain=domain,
        num_classes=10,
        batch_size=8,
        heap_size=2,
    )


def test_resume_rescores_only_the_missing_shard(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (NUM_SHARDS * PER_SHARD, 28, 28), dtype=np.uint8)
    shards.write_shards(
        tmp_path / "pool", images, num_shards=NUM_SHARDS, sources=["a", "b"] * (len(images) // 2)
    )
    teacher = models.create_model("lenet5", 10)
    variables = jax.device_get(
        teacher.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32))
    )
    first = _score(tmp_path, teacher, variables)

    # Every item once, with the teacher's own statistics (a direct forward pass as reference).
    np.testing.assert_array_equal(first.ids, np.arange(len(images)))
    x = (
        np.asarray(
            jax.image.resize(
                images[..., None].astype(np.float32),
                (len(images), 32, 32, 1),
                "bilinear",
                antialias=True,
            )
        )
        / 255.0
        - 0.1307
    ) / 0.3081
    logits, _ = teacher.apply(variables, x, train=False)
    p = np.asarray(jax.nn.softmax(logits))
    top2 = np.sort(p, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-3  # argmax is well defined despite resize round-off
    np.testing.assert_array_equal(first.pred[clear], p.argmax(-1)[clear])
    np.testing.assert_allclose(first.confidence, p.max(-1), rtol=1e-3, atol=1e-4)
    np.testing.assert_array_equal(first.sources, np.asarray(["a", "b"] * (len(images) // 2)))
    assert len(first.cand_ids) <= 2 * 10 and first.cand_feat.shape[1] == 84

    # A pass killed after three shards: one result file is missing.
    out = tmp_path / "work" / "pool_scores"
    files = sorted(f for f in os.listdir(out) if f.endswith(".tfrecord.npz"))
    assert len(files) == NUM_SHARDS
    stamp = lambda f: (os.stat(out / f).st_ino, os.stat(out / f).st_mtime_ns)
    before = {f: stamp(f) for f in files}
    os.remove(out / files[2])
    t_rerun = os.stat(out / files[0]).st_mtime_ns
    second = _score(tmp_path, teacher, variables)
    assert all(stamp(f) == before[f] for f in files if f != files[2])  # not rescored
    assert stamp(files[2])[1] > t_rerun  # rescored
    for name in ("ids", "pred", "confidence", "entropy", "cand_ids", "cand_class", "cand_feat"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name), err_msg=name)


def _teacher():
    teacher = models.create_model("lenet5", 10)
    return teacher, jax.device_get(
        teacher.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32))
    )


def test_every_pass_skips_a_foreign_and_a_truncated_file_naming_them(tmp_path, caplog):
    """A glob that also catches make_shards' manifest, and a shard cut short: counting, scoring
    and training read the same images and each warns about the same two files."""
    images = np.random.default_rng(0).integers(0, 256, (24, 28, 28), dtype=np.uint8)
    shards.write_shards(tmp_path / "pool", images, num_shards=4)
    cut = tmp_path / "pool" / "pool-00001-of-00004.tfrecord"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    bad = {str(cut), str(tmp_path / "pool" / "pool.json")}
    spec = ml_collections.ConfigDict({"source": "shards", "pattern": str(tmp_path / "pool" / "*")})

    def named():
        files = {f for r in caplog.records for f in bad if f in r.getMessage()}
        caplog.clear()
        return files

    with caplog.at_level(logging.WARNING, logger="kd_jax.data.shards"):
        ds, count = pipeline.open_source(spec, "train")  # the count pass
        assert named() == bad
        trained = sorted(int(e["id"]) for e in ds.as_numpy_iterator())  # the training pass
        assert named() == bad and len(trained) == count and 12 < count < 24
        teacher, variables = _teacher()
        scores = pool.score_pool(
            str(tmp_path / "work"),
            spec,
            teacher_model=teacher,
            teacher_vars=variables,
            domain=pipeline.Domain(32, 1, "mnist"),
            num_classes=10,
            batch_size=8,
        )
        assert named() == bad
    assert scores.ids.tolist() == trained


def test_select_transfer_set_selects_once_and_resumes(tmp_path):
    shards.write_shards(
        tmp_path / "pool",
        np.random.default_rng(1).integers(0, 256, (40, 28, 28), dtype=np.uint8),
        num_shards=2,
        sources=["a", "b"] * 20,
    )
    spec = ml_collections.ConfigDict({"source": "shards", "pattern": str(tmp_path / "pool")})
    teacher, variables = _teacher()
    calls = []

    def score_fn():
        calls.append("score")
        return pool.score_pool(
            str(tmp_path / "work"),
            spec,
            teacher_model=teacher,
            teacher_vars=variables,
            domain=pipeline.Domain(32, 1, "mnist"),
            num_classes=10,
            batch_size=8,
        )

    def run(rule):
        return pool.select_transfer_set(
            str(tmp_path / "work"),
            spec,
            rule,
            score_fn=score_fn,
            num_classes=10,
            rule_name="random 12",
            report_fn=lambda s, sel: {"extra": np.int64(3)},
        )

    selection, report = run(pool.random_rule(12, seed=0))
    want = np.sort(np.random.default_rng(0).choice(np.arange(40), 12, replace=False))
    np.testing.assert_array_equal(selection.ids, want)
    assert report["selection_size"] == 12 and report["rule"] == "random 12"
    assert sum(report["selection_per_class"]) == 12 and sum(report["pool_per_class"]) == 40
    assert report["extra"] == 3 and set(report["selection_source_share"]) == {"a", "b"}
    saved = json.loads((tmp_path / "work" / "selection_report.json").read_text())
    assert saved == report and calls == ["score"]

    def never(scores):
        raise AssertionError("a resumed run must not select again")

    again, again_report = run(never)  # resume: neither scored nor selected again
    np.testing.assert_array_equal(again.ids, selection.ids)
    assert again_report == saved and calls == ["score"]
    # An old ODSD workdir keeps its report under the earlier name.
    os.rename(
        tmp_path / "work" / "selection_report.json",
        tmp_path / "work" / "selection_diagnostics.json",
    )
    assert run(never)[1] == saved and calls == ["score"]
    # Training reads the selection (cached in memory: a fixed-shape pool).
    ds, count = pool.open_transfer_set(spec, selection.ids)
    assert count == 12 and sorted(int(e["id"]) for e in ds.as_numpy_iterator()) == want.tolist()
    with pytest.raises(ValueError, match="subset_size=41"):
        pool.random_rule(41, seed=0)(score_fn())
