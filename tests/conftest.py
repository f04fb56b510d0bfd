"""Test setup: 8 fake CPU devices, set before JAX is imported anywhere; one small offline
teacher shared by the end-to-end student tests."""

import fcntl
import os

import pytest

# XLA:CPU aborts the process when a collective's participants have not all arrived within
# 40 s (its default): 8 fake devices on 2 busy cores can lag that much behind one another
# (an abort, mid-DAFL-step, took an xdist worker down at load 8), so the tests allow 10 min.
# LLVM at -O1 instead of XLA's default -O2: the suite is mostly compilation of small steps
# (measured on AMD EPYC, 2 cores: an SCKD test 61 -> 46 s, the 250-step DAFL smoke 56 -> 47 s;
# -O0 compiles faster still but the long smokes then run slower). A user's XLA_FLAGS wins.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=1"
os.environ["XLA_FLAGS"] = (
    _flags
    + " --xla_force_host_platform_device_count=8"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# No persistent XLA compilation cache (JAX_COMPILATION_CACHE_DIR): with jaxlib 0.10 an
# executable read back from it can deadlock XLA:CPU's collectives across the 8 fake devices
# (two independent all-reduces entered in different orders by different devices, then a
# fatal rendezvous timeout), which took a pytest-xdist worker down and hung the session.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

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
