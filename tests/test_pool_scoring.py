"""The streamed pool scorer: correct per-item scores, and a killed pass resumes shard by shard."""
import os

import jax
import ml_collections
import numpy as np

from kd_jax import models, pool
from kd_jax.data import pipeline, shards

NUM_SHARDS, PER_SHARD = 4, 6


def _score(tmp_path, teacher, variables):
    spec = ml_collections.ConfigDict({"source": "shards",
                                      "pattern": shards.shard_pattern(tmp_path / "pool")})
    domain = pipeline.Domain(image_size=32, channels=1, normalization="mnist")
    return pool.score_pool(str(tmp_path / "work"), spec, teacher_model=teacher,
                           teacher_vars=variables, domain=domain, num_classes=10, batch_size=8,
                           heap_size=2)


def test_resume_rescores_only_the_missing_shard(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (NUM_SHARDS * PER_SHARD, 28, 28), dtype=np.uint8)
    shards.write_shards(tmp_path / "pool", images, num_shards=NUM_SHARDS,
                        sources=["a", "b"] * (len(images) // 2))
    teacher = models.create_model("lenet5", 10)
    variables = jax.device_get(teacher.init(jax.random.PRNGKey(0),
                                            np.zeros((1, 32, 32, 1), np.float32)))
    first = _score(tmp_path, teacher, variables)

    # Every item once, with the teacher's own statistics (a direct forward pass as reference).
    np.testing.assert_array_equal(first.ids, np.arange(len(images)))
    x = (np.asarray(jax.image.resize(images[..., None].astype(np.float32),
                                     (len(images), 32, 32, 1), "bilinear", antialias=True))
         / 255.0 - 0.1307) / 0.3081
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
    assert stamp(files[2])[1] > t_rerun                                 # rescored
    for name in ("ids", "pred", "confidence", "entropy", "cand_ids", "cand_class", "cand_feat"):
        np.testing.assert_array_equal(getattr(first, name), getattr(second, name), err_msg=name)
