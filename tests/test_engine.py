"""The shared engine: device-count invariance, resume, teacher chaining, bad input."""

import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, config, max_distance, record

from kd_jax import config_utils, parallel, train
from kd_jax.data import pipeline
from kd_jax.methods import get_method


class _PerDeviceBatchNorm(nn.Module):
    """The bug a data-parallel engine must not have: BatchNorm statistics over each device's
    block of the batch (pmap without `axis_name`) instead of the global batch."""

    use_running_average: bool
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: object = None
    param_dtype: object = None
    devices: int = 8

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        ra_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(c))
        ra_var = self.variable("batch_stats", "var", lambda: jnp.ones(c))
        if self.use_running_average:
            y = (x - ra_mean.value) / jnp.sqrt(ra_var.value + self.epsilon)
        else:
            g = x.reshape(self.devices, -1, *x.shape[1:])
            axes = tuple(range(1, g.ndim - 1))
            mean, var = g.mean(axes, keepdims=True), g.var(axes, keepdims=True)
            y = ((g - mean) / jnp.sqrt(var + self.epsilon)).reshape(x.shape)
            m = self.momentum
            ra_mean.value = m * ra_mean.value + (1 - m) * mean.mean(0).reshape(c)
            ra_var.value = m * ra_var.value + (1 - m) * var.mean(0).reshape(c)
        return y * scale + bias


def test_eight_devices_equal_one_device(monkeypatch):
    """Three teacher steps of LeNet-5 (BatchNorm-free) and WRN-16-1 (BatchNorm), in float64: the
    8-device trajectory (params, BatchNorm statistics, optimizer state) equals the 1-device one.

    8 devices only regroup the batch's sums, which moves a float64 step by ~1e-15 of its
    scale; a real sharding error moves it by orders of magnitude more, which the test shows by
    scaling one device's 4 images by 1.01 and with BatchNorm statistics per device. (In float32
    the comparison was decided by rounding: WRN-16-1's steps on noise fall into order-dependent
    modes 1e-4..1e-3 apart.)"""
    assert jax.device_count() == 8
    with jax.enable_x64(True):
        for model in ("lenet5", "wrn16_1"):
            c = config(
                "teacher_mnist.py",
                "smoke",
                **{
                    "model.name": model,
                    "batch_size": 32,
                    "eval_batch_size": 32,
                    "dtype": "float64",
                },
            )
            meshes = parallel.make_mesh(jax.devices()[:1]), parallel.make_mesh(jax.devices())
            runs = []
            for mesh in meshes:
                method = get_method("teacher")(c, "/tmp/unused", mesh)
                method.build_optimizer(10)
                runs.append(
                    (jax.jit(method.train_step, out_shardings=parallel.replicated(mesh)), mesh)
                )
            init = jax.jit(method.init_state)(jax.random.PRNGKey(0))
            assert jax.tree.leaves(init.params)[0].dtype == np.float64

            def step(run, state, batch):
                run, mesh = run
                state = jax.device_put(state, parallel.replicated(mesh))
                return jax.device_get(
                    run(state, None, parallel.global_batch(batch, mesh), jax.random.PRNGKey(1))[0]
                )

            rng = np.random.default_rng(0)
            one = eight = jax.device_get(init)
            for i in range(3):
                batch = {
                    "image": rng.normal(size=(32, 32, 32, 1)),
                    "label": rng.integers(0, 10, 32),
                }
                broken = {**batch, "image": batch["image"].copy()}
                broken["image"][4:8] *= 1.01  # the second device's shard
                wrong = step(runs[1], eight, broken)
                one, eight = step(runs[0], one, batch), step(runs[1], eight, batch)
                same = record(f"8 vs 1 devices, {model} step {i + 1}", max_distance(one, eight))
                off = record(
                    f"8 vs 1 devices, {model} step {i + 1}, one shard x1.01 (broken)",
                    max_distance(wrong, eight),
                )
                assert same < 1e-10, (model, i + 1, same)
                assert off > 1e-6, (model, i + 1, off)
        # WRN-16-1's first step again, with per-device BatchNorm statistics on 8 devices.
        from kd_jax.models import wrn

        monkeypatch.setattr(
            wrn,
            "batch_norm",
            lambda train, *, dtype, name: _PerDeviceBatchNorm(
                use_running_average=not train, name=name
            ),
        )
        method = get_method("teacher")(c, "/tmp/unused", meshes[1])
        method.build_optimizer(10)
        broken_run = (
            jax.jit(method.train_step, out_shardings=parallel.replicated(meshes[1])),
            meshes[1],
        )
        batch = {
            "image": np.random.default_rng(0).normal(size=(32, 32, 32, 1)),
            "label": np.random.default_rng(0).integers(0, 10, 32),
        }
        first = step(runs[0], jax.device_get(init), batch)
        off = record(
            "8 vs 1 devices, wrn16_1 step 1, per-device BatchNorm statistics (broken)",
            max_distance(step(broken_run, jax.device_get(init), batch), first),
        )
        assert off > 1e-6, off


def test_killed_run_resumes_identically(tmp_path, monkeypatch):
    """A run stopped after 3 of 8 steps and resumed from its checkpoint ends where the
    uninterrupted run ends, in float64 (the same program and data order: ~0 apart). A resume
    that restarts the data stream at step 0 instead of step 3 ends far away."""
    from kd_jax import checkpoint
    from kd_jax.methods.base import Method

    c = config(
        "teacher_mnist.py",
        "smoke",
        num_steps=8,
        log_every=2,
        eval_every=8,
        checkpoint_every=4,
        async_checkpoints=False,
        dtype="float64",
    )
    with jax.enable_x64(True):
        full = train.train_and_evaluate(c, str(tmp_path / "full"))
        for name in ("resumed", "restarted_data"):
            stopped = train.train_and_evaluate(c, str(tmp_path / name), stop_after=3)
            assert stopped == {"stopped_at": 3}
        resumed = train.train_and_evaluate(c, str(tmp_path / "resumed"))
        original = Method.train_batches
        monkeypatch.setattr(Method, "train_batches", lambda self, start: original(self, 0))
        train.train_and_evaluate(c, str(tmp_path / "restarted_data"))
        a, b, wrong = (
            checkpoint.load_variables(str(tmp_path / name))
            for name in ("full", "resumed", "restarted_data")
        )
    assert jax.tree.leaves(a)[0].dtype == np.float64
    same = record("resumed vs uninterrupted run", max_distance(a, b))
    off = record(
        "resumed vs uninterrupted run, data restarted at step 0 (broken)", max_distance(wrong, a)
    )
    assert same < 1e-10, same
    assert off > 1e-6, off
    assert resumed["final_accuracy"] == full["final_accuracy"]


def test_non_finite_loss_stops_with_step_named(tmp_path):
    c = config(
        "teacher_mnist.py",
        "smoke",
        num_steps=20,
        log_every=1,
        checkpoint_every=2,
        async_checkpoints=False,
        **{"optimizer.lr": 1e12},
    )
    with pytest.raises(FloatingPointError, match=r"at step \d+"):
        train.train_and_evaluate(c, str(tmp_path))


def test_train_steps_trace_without_tensorflow():
    """Every method's train step builds and traces with TensorFlow unimportable (an accelerator
    host may have JAX but no TF: `benchmarks/step_throughput.py` runs there on synthetic data);
    only the input pipelines import TF, at first use."""
    code = """
import sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None  # import raises
sys.path.insert(0, "benchmarks")
import jax, numpy as np
import step_throughput
from kd_jax import parallel
mesh = parallel.make_mesh()
for name in step_throughput.METHODS:
    if name == "deepinv":  # matches BatchNorm statistics: LeNet-5 has none
        continue
    built, c = step_throughput.build_method(name, "lenet", 16, "float32", mesh)
    method, state = built.method, built.state
    batch = {"image": np.zeros((16, 32, 32, 1), np.float32), "label": np.zeros(16, np.int64),
             "id": np.arange(16)}
    if hasattr(method, "latents"):  # a generator method's batch: its latent vectors
        batch = {"z": method.latents(0)}
    if getattr(method, "views", 1) == 2:
        batch["image2"] = batch["image"]
    jax.eval_shape(method.train_step, state, method.teacher_vars, batch, jax.random.PRNGKey(1))
    print(name, "traced")
"""
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("traced") == 6, proc.stdout  # all but deepinv


def test_unknown_config_key_is_named(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_jax.main",
            "--config=configs/teacher_mnist.py:smoke",
            f"--workdir={tmp_path}",
            "--config.optimizer.lrr=0.1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "lrr" in proc.stderr


def test_unknown_config_argument_is_named():
    with pytest.raises(ValueError, match="bogus"):
        config("kd_mnist.py", "bogus")


def test_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match=r"config.batch_size=12 .* 8"):
        parallel.check_batch_size(12, parallel.make_mesh())


def test_missing_tfds_dataset_names_it(tmp_path):
    spec = config_utils.base_config().data.target
    spec.name, spec.data_dir = "cifar100", str(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"cifar100.*tfds build"):
        pipeline.open_source(spec, "test")


def test_empty_pool_pattern_names_it(tmp_path):
    spec = config_utils.base_config().data.transfer
    spec.source, spec.pattern = "shards", str(tmp_path / "nothing-*.tfrecord")
    with pytest.raises(ValueError, match="nothing-"):
        pipeline.open_source(spec, "train")


def test_missing_teacher_workdir_is_clear(tmp_path):
    c = config("kd_mnist.py", "pool,smoke", **{"teacher.workdir": str(tmp_path / "nope")})
    with pytest.raises(FileNotFoundError, match="holds no finished teacher"):
        train.train_and_evaluate(c, str(tmp_path / "kd"))


def test_student_config_trains_its_teacher_first(tmp_path):
    """Without teacher.workdir a KD config trains its chained teacher into <workdir>/teacher."""
    c = config(
        "kd_mnist.py",
        "random,smoke",
        num_steps=4,
        log_every=2,
        eval_every=4,
        checkpoint_every=4,
        **{
            "teacher.train.num_steps": 4,
            "teacher.train.eval_every": 4,
            "teacher.train.checkpoint_every": 4,
            "data.target.max_eval_examples": 64,
        },
    )
    from kd_jax import run

    results = run.run(c, str(tmp_path))
    teacher = json.loads((tmp_path / "teacher" / "results.json").read_text())
    assert teacher["steps"] == 4 and teacher["method"] == "teacher"
    assert results["steps"] == 4 and results["teacher_accuracy"] == teacher["final_accuracy"]


def test_eval_padding_counts_each_example_once():
    spec = config_utils.base_config().data.target
    spec.source = "offline_mnist"
    domain = pipeline.Domain(32, 1, "mnist")
    ids = []
    for p in range(3):  # three hosts, each padded to the same number of batches
        ds, n = pipeline.open_source(spec, "test", p, 3)
        batches = list(
            pipeline.eval_batches(
                ds, host_count=n, max_host_count=334, local_batch=64, domain=domain
            ).as_numpy_iterator()
        )
        assert len(batches) == 6
        for b in batches:
            ids += list(b["id"][b["mask"] > 0])
    assert sorted(ids) == list(range(1000))


def test_train_stream_is_a_function_of_the_step():
    spec = config_utils.base_config().data.target
    spec.source = "offline_mnist"
    ds, n = pipeline.open_source(spec, "train")
    kwargs = dict(
        local_batch=100,
        steps_per_epoch=n // 100,
        domain=pipeline.Domain(32, 1, "mnist"),
        augment="crop",
        seed=3,
        shuffle_buffer=1000,
    )
    full = pipeline.train_iterator(ds, **kwargs)
    batches = [next(full) for _ in range(43)]
    resumed = next(pipeline.train_iterator(ds, start_step=42, **kwargs))
    np.testing.assert_array_equal(resumed["id"], batches[42]["id"])
    np.testing.assert_array_equal(resumed["image"], batches[42]["image"])
    assert not np.array_equal(batches[0]["id"], batches[40]["id"])  # epochs reshuffle


def test_grad_clip_bounds_the_update_and_zero_is_off():
    """optimizer.grad_clip rescales the global gradient norm before weight decay / momentum."""
    import jax.numpy as jnp
    import ml_collections

    from kd_jax.methods.base import make_optimizer

    opt = ml_collections.ConfigDict(
        {"name": "sgd", "lr": 0.1, "momentum": 0.0, "weight_decay": 0.0, "grad_clip": 2.0}
    )
    params = {"w": jnp.ones(3), "b": jnp.ones(4)}
    grads = {"w": jnp.full(3, 3.0), "b": jnp.full(4, 4.0)}  # global norm sqrt(27 + 64)
    norm = float(np.sqrt(27.0 + 64.0))
    tx = make_optimizer(opt, 0.1)
    upd, _ = tx.update(grads, tx.init(params), params)
    for k in grads:
        np.testing.assert_allclose(upd[k], -0.1 * np.asarray(grads[k]) * 2.0 / norm, rtol=1e-6)
    opt.grad_clip = 0.0
    tx = make_optimizer(opt, 0.1)
    upd, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(upd["b"], -0.1 * np.asarray(grads["b"]), rtol=1e-6)
    opt.grad_clip = -1.0
    with pytest.raises(ValueError, match="grad_clip"):
        make_optimizer(opt, 0.1)
