"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere; a persistent XLA cache;
one small offline teacher shared by the end-to-end student tests."""

import fcntl
import os
import tempfile

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# XLA:CPU compiles dominate the suite (e.g. ~12 s for LeNet's random init): many tests build the
# same programs, and subprocess tests inherit the cache through the environment.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "kd_jax_test_xla_cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def offline_teacher(tmp_path_factory, worker_id):
    """Workdir of a finished `configs/teacher_mnist.py:smoke` run (LeNet-5, ~0.95 accuracy),
    trained once per test session; under pytest-xdist the workers share it (a file lock, and a
    finished run is not trained again)."""
    from kd_jax import config_utils, train

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if worker_id != "master" else base
    workdir = shared / "offline_teacher"
    with open(shared / "offline_teacher.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        c = config_utils.load_config(os.path.join(ROOT, "configs", "teacher_mnist.py"), "smoke")
        c.async_checkpoints = False
        train.train_and_evaluate(c, str(workdir))
    return str(workdir)
