"""The engine pieces every method uses: batched inference over padded batches, feature shapes,
partial freezing and the warm start from another run."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kd_jax import checkpoint, inference, models, parallel
from kd_jax.methods.base import make_optimizer
from kd_jax.models.shapes import feature_shapes


def _batches(n, batch):
    """Padded batches of rows 0..n-1 (mask 0 on the padding), ids and host-only strings."""
    rows = np.arange(-(-n // batch) * batch)
    for i in range(0, len(rows), batch):
        r = rows[i : i + batch]
        yield {
            "x": r.astype(np.float32),
            "id": r.astype(np.int64),
            "mask": (r < n).astype(np.float32),
            "name": np.asarray([f"r{k}" for k in r]),
        }


def test_batched_apply_keeps_real_rows_once_across_devices():
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8  # the batch is sharded over 8 devices
    double = inference.BatchedApply(lambda scale, b: {"y": scale * b["x"]}, mesh)
    rows = double.gather(2.0, batches=_batches(21, 8), keep=("id", "name"))
    np.testing.assert_array_equal(rows["y"], 2.0 * np.arange(21))
    np.testing.assert_array_equal(rows["id"], np.arange(21))
    assert rows["id"].dtype == np.int64 and rows["name"][-1] == "r20"
    count = inference.BatchedApply(
        lambda b: {"sum": jnp.sum(b["x"] * b["mask"]), "n": jnp.sum(b["mask"])}, mesh
    )
    assert count.sums(batches=_batches(21, 8)) == {"sum": float(sum(range(21))), "n": 21.0}
    assert double.gather(2.0, batches=[]) == {}


def test_batched_apply_pads_short_batches_and_threads_a_carry():
    mesh = parallel.make_mesh()
    running = inference.BatchedApply(
        lambda b, total: ({"x": b["x"]}, total + jnp.sum(b["x"] * b["mask"])), mesh, carry=True
    )
    short = [
        {"x": np.arange(8, dtype=np.float32), "mask": np.ones(8, np.float32)},
        {"x": np.asarray([8, 9, 10], np.float32), "mask": np.ones(3, np.float32)},
    ]
    rows, total = running.gather(batches=short, pad_to=8, carry=jnp.zeros(()))
    np.testing.assert_array_equal(rows["x"], np.arange(11))
    assert float(total) == sum(range(11))
    # Axis 1 as the batch axis ([H, B, K] outputs of several heads).
    heads = inference.BatchedApply(lambda b: {"h": jnp.stack([b["x"], -b["x"]])}, mesh)
    rows = heads.gather(batches=_batches(5, 8), batch_axes={"h": 1})
    np.testing.assert_array_equal(rows["h"], [np.arange(5), -np.arange(5)])


def test_feature_shapes_per_image():
    lenet = models.create_model("lenet5", 10)
    shapes = feature_shapes(lenet, 32, 1)
    assert shapes["pre_logits"] == (84,)
    assert len(shapes["stage1"]) == 3  # NHWC taps lose only the batch axis
    assert feature_shapes(models.create_model("lenet5_half", 10), 32, 1)["pre_logits"] == (42,)


def _opt():
    return ml_collections.ConfigDict(
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "grad_clip": 1.0}
    )


def test_trainable_freezes_the_other_student_modules_only():
    params = {
        "model": {"block_a": {"w": jnp.ones(3)}, "block_b": {"w": jnp.ones(3)}},
        "head": {"w": jnp.ones(3)},
    }
    grads = jax.tree.map(jnp.ones_like, params)
    tx = make_optimizer(_opt(), optax.constant_schedule(0.1), trainable=("block_b",))
    updates, _ = tx.update(grads, tx.init(params), params)
    assert not np.any(updates["model"]["block_a"]["w"])
    assert np.all(np.asarray(updates["model"]["block_b"]["w"]) != 0)
    assert np.all(np.asarray(updates["head"]["w"]) != 0)
    every = make_optimizer(_opt(), optax.constant_schedule(0.1))
    all_updates, _ = every.update(grads, every.init(params), params)
    assert np.all(np.asarray(all_updates["model"]["block_a"]["w"]) != 0)


def test_warm_start_loads_shared_subtrees_and_names_the_rest(tmp_path):
    saved = {
        "params": {"model": {"w": np.full(3, 2.0, np.float32)}},
        "batch_stats": {"model": {"mean": np.full(3, 5.0, np.float32)}},
    }
    ckpt = checkpoint.Checkpointer(str(tmp_path), async_save=False)
    ckpt.save(1, saved, force=True)
    ckpt.close()
    fresh = {"model": {"w": jnp.zeros(3)}, "head": {"w": jnp.ones(4)}}
    stats = {"model": {"mean": jnp.zeros(3)}, "head": {}}
    params, new_stats, kept = checkpoint.warm_start(fresh, stats, str(tmp_path))
    np.testing.assert_array_equal(params["model"]["w"], [2.0] * 3)
    np.testing.assert_array_equal(params["head"]["w"], [1.0] * 4)
    np.testing.assert_array_equal(new_stats["model"]["mean"], [5.0] * 3)
    assert kept == ["params/head", "batch_stats/head"]
    with pytest.raises(ValueError, match=r"params/model/w has shape \(3,\)"):
        checkpoint.warm_start({"model": {"w": jnp.zeros(4)}}, {}, str(tmp_path))


def test_heads_are_built_once_and_survive_a_traced_init():
    """`heads` is cached: the first build may happen inside a trace (jit(init_state)), and a
    second trace or an eager call must not meet that trace's values."""
    from helpers import config

    from kd_jax.methods import get_method

    c = config("sckd_mnist.py", "smoke", **{"ncd.pretrain.enabled": False})
    c.method = "uno"
    method = get_method("uno")(c, "/tmp/unused", parallel.make_mesh(jax.devices()[:1]))
    method.build_optimizer(10)
    first = jax.eval_shape(method.init_state, jax.random.PRNGKey(0))
    assert method.heads is method.heads and set(method.heads) == {"known", "discovery"}
    again = jax.eval_shape(method.init_state, jax.random.PRNGKey(1))
    assert jax.tree.structure(first) == jax.tree.structure(again)
    assert set(first.params) == {"model", "known", "discovery"}
