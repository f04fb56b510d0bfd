"""Two real JAX processes (4 fake CPU devices each) train a KD student through the engine.

Pins what a pod run relies on: `jax.distributed.initialize` on 127.0.0.1 through the env vars
launch/ sets; each process reads a disjoint, file-level share of the pool and together all of
it; the parameters equal a 1-process × 8-device run (this pytest process) on the same global
batches; the Orbax checkpoint the 2-process run wrote restores in a 1-process run. Takes about a
minute on an idle 2-core machine (mostly XLA compiles in three processes).
"""

import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from helpers import max_distance, record

from kd_jax import checkpoint, parallel, train
from kd_jax.data import shards
from kd_jax.methods import get_method
from kd_jax.methods.kd import KD

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import multiprocess_worker  # noqa: E402

WORKER = os.path.join(HERE, "multiprocess_worker.py")
NUM_STEPS = 4
BATCH = 64
POOL_SIZE = 256  # 2 processes × 128 ids = 4 local batches of 32: 4 steps read every id once
TIMEOUT_S = 900  # generous: the 2-core dev box is shared; ~1 min when idle


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env.update(
        JAX_PLATFORMS="cpu",
        CUDA_VISIBLE_DEVICES="",
        TF_CPP_MIN_LOG_LEVEL="2",
        PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), env.get("PYTHONPATH", "")]),
    )
    for key in (
        "KD_JAX_DISTRIBUTED",
        "KD_JAX_COORDINATOR",
        "KD_JAX_NUM_PROCESSES",
        "KD_JAX_PROCESS_ID",
    ):
        env.pop(key, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _run_all(commands, envs, logs, timeout=TIMEOUT_S):
    """Starts every process, waits for all with one deadline, and always reaps them."""
    procs = []
    try:
        for cmd, env, log in zip(commands, envs, logs):
            procs.append(
                subprocess.Popen(cmd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
            )
        deadline = time.time() + timeout
        while any(p.poll() is None for p in procs):
            if time.time() > deadline:
                raise TimeoutError(f"workers still running after {timeout}s")
            # One failed process leaves the others blocked in a collective: stop early.
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    for p, log in zip(procs, logs):
        if p.returncode != 0:
            with open(log) as f:
                tail = f.read()[-4000:]
            raise AssertionError(f"worker {log} exited with {p.returncode}:\n{tail}")


def _worker_cmd(workdir, teacher, pattern, out):
    return [
        sys.executable,
        WORKER,
        f"--workdir={workdir}",
        f"--teacher_workdir={teacher}",
        f"--pool_pattern={pattern}",
        f"--out={out}",
        f"--num_steps={NUM_STEPS}",
        f"--batch_size={BATCH}",
    ]


def _replay(config, workdir, records, scale_second=1.0):
    """The 1-process × 8-device run (this process, float64), on the recorded global batches:
    process 0's local batch then process 1's, the row order of the global array.
    `scale_second` != 1 scales process 1's images: a deliberately broken replay."""

    def train_batches(self, start_step):
        for t in range(start_step, records[0]["batch_ids"].shape[0]):
            batch = {
                k: np.concatenate([r[f"batch_{k}s"][t] for r in records])
                for k in ("image", "label", "id")
            }
            batch["image"][len(records[0]["batch_ids"][t]) :] *= scale_second
            yield batch
        raise RuntimeError("the loop asked for more steps than were recorded")

    original = KD.train_batches
    KD.train_batches = train_batches
    try:
        with jax.enable_x64(True):
            train.train_and_evaluate(config, workdir)
    finally:
        KD.train_batches = original


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multiprocess")
    # A tiny synthetic pool (28×28 grey, resized to the teacher's 32 px) in 8 shards.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (POOL_SIZE, 28, 28), dtype=np.uint8)
    shards.write_shards(tmp / "pool", images, num_shards=8)
    pattern = shards.shard_pattern(tmp / "pool")
    # A tiny teacher, trained once in this (8-device) process.
    teacher = str(tmp / "teacher")
    c = multiprocess_worker.make_config(
        multiprocess_worker.parse_args(
            [
                f"--workdir={tmp / 'run1'}",
                f"--teacher_workdir={teacher}",
                f"--pool_pattern={pattern}",
                "--out=unused",
                f"--num_steps={NUM_STEPS}",
                f"--batch_size={BATCH}",
            ]
        )
    )
    tcfg = c.teacher.train
    tcfg.num_steps, tcfg.batch_size = 2, 64
    tcfg.log_every = tcfg.eval_every = tcfg.checkpoint_every = 2
    tcfg.data.target.max_eval_examples = 64
    tcfg.async_checkpoints = False
    train.train_and_evaluate(tcfg, teacher)

    paths = [str(tmp / f"record{i}.npz") for i in range(2)]
    port = _free_port()
    _run_all(
        [_worker_cmd(str(tmp / "run2"), teacher, pattern, paths[i]) for i in range(2)],
        [
            _env(
                4,
                JAX_ENABLE_X64=1,
                KD_JAX_DISTRIBUTED=1,
                KD_JAX_COORDINATOR=f"127.0.0.1:{port}",
                KD_JAX_NUM_PROCESSES=2,
                KD_JAX_PROCESS_ID=i,
            )
            for i in range(2)
        ],
        [str(tmp / f"record{i}.log") for i in range(2)],
    )
    records = [dict(np.load(p)) for p in paths]
    _replay(c, str(tmp / "run1"), records)
    _replay(c, str(tmp / "run1_broken"), records, scale_second=1.01)
    return {"tmp": tmp, "pattern": pattern, "c": c, "records": records}


def test_processes_read_disjoint_shares_covering_the_pool(runs):
    recs = runs["records"]
    assert [int(r["process_index"]) for r in recs] == [0, 1]
    assert all(int(r["process_count"]) == 2 and int(r["device_count"]) == 8 for r in recs)
    shares = [set(r["share_ids"].tolist()) for r in recs]
    assert not shares[0] & shares[1]
    assert shares[0] | shares[1] == set(range(POOL_SIZE))
    # The shares are by file: process i holds exactly the ids of files i, i+2, ...
    files = shards.list_shard_files(runs["pattern"])
    for i, share in enumerate(shares):
        assert share == set(shards.read_ids(files[i::2]).tolist())
    # What each process trained on came from its own share, and together covered the pool.
    read = [set(r["batch_ids"].ravel().tolist()) for r in recs]
    assert read[0] <= shares[0] and read[1] <= shares[1]
    assert read[0] | read[1] == set(range(POOL_SIZE))
    assert all(r["batch_ids"].shape == (NUM_STEPS, BATCH // 2) for r in recs)


def test_two_process_checkpoint_restores_and_equals_one_process_run(runs):
    """Both runs in float64: the 2-process parameters, BatchNorm statistics and optimizer state
    equal the 1-process run's up to reduction order (~1e-16); the replay with process 1's
    images scaled by 1.01 is far from both."""
    assert jax.process_count() == 1 and jax.device_count() == 8
    c = runs["c"]
    mesh = parallel.make_mesh()
    with jax.enable_x64(True):
        method = get_method(c.method)(c, str(runs["tmp"] / "unused"), mesh)
        method.build_optimizer(c.num_steps)
        template = jax.jit(method.init_state, out_shardings=parallel.replicated(mesh))(
            method.init_rng()  # as train.py: the true init
        )
        init = jax.device_get(template)

        def restore(workdir):  # a checkpoint restored in this single process (8 devices)
            ckpt = checkpoint.Checkpointer(workdir, async_save=False)
            try:
                assert ckpt.latest_step() == NUM_STEPS
                return jax.device_get(ckpt.restore(template))
            finally:
                ckpt.close()

        two, one, broken = (
            restore(str(runs["tmp"] / name)) for name in ("run2", "run1", "run1_broken")
        )
    assert int(two.step) == int(one.step) == NUM_STEPS
    assert jax.tree.leaves(two.params)[0].dtype == np.float64
    # Training moved the parameters (else the equality below would be vacuous) ...
    assert max_distance(two.params, init.params) > 1e-4
    # ... and both runs moved them identically, up to float reduction order.
    fields = lambda s: (s.params, s.batch_stats, s.opt_state)  # noqa: E731
    same = record("2 processes vs 1 process", max_distance(fields(two), fields(one)))
    off = record(
        "2 processes vs 1 process, process 1's images x1.01 (broken)",
        max_distance(fields(two), fields(broken)),
    )
    assert same < 1e-10, same
    assert off > 1e-6, off
