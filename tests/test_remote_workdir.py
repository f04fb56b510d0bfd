"""Workdirs and pools on `gs://` directly (no gcsfuse): a whole run on a fake GCS.

`configs/kd_mnist.py:smoke` runs with its workdir at `gs://fake-bucket/runs/kd`: it trains its
teacher first (`configs/teacher_mnist.py:smoke`, into the stage workdir `.../kd/teacher`), is
stopped after 20 of 30 steps as a preemption would stop it, resumes from its gs:// checkpoint,
finishes, and a third call finds it finished. A second test writes and reads a TFRecord pool, a
converted teacher and every file kind of `kd_jax.fileio` there.

What is faked (the `fake_gcs` fixture), and nothing else:

1. etils.epath's backend for `gs://` paths (in production TensorFlow's GCS client,
   `tf.io.gfile`): `gs://<bucket>/<key>` is stored at `<tmp>/gcs/<bucket>/<key>`, with GCS's
   rules where they differ from a disk: a write needs no parent directory, an object appears
   whole when its upload (the file's close) completes, it cannot be appended to, and renaming a
   "directory" fails the test (on GCS it is a copy of every object, not atomic: the bug this
   layer removes).
2. Orbax's one builder of the TensorStore kvstore spec for a gs:// path
   (`gcs_utils.get_kvstore_for_gcs`): TensorStore's `file` driver at the mapped directory
   instead of its `gcs` driver.
3. Orbax's question to the bucket whether it has a hierarchical namespace (a GCS metadata
   request through google-cloud-storage, `gcs_utils.is_hierarchical_namespace_enabled`): no,
   the fake bucket is a flat one, as most are.
4. TensorFlow's C++ file systems (event files, TFRecords) are not reachable from Python and its
   GCS endpoint is fixed: the three TensorFlow entry points kd_jax hands paths to
   (`tf.summary.create_file_writer`, `tf.io.TFRecordWriter`, `tf.data.TFRecordDataset`) get the
   mapped local path.

What runs for real: all of kd_jax (train loop, methods, teacher and stage workdirs, checkpoint,
pool shards, converter, `kd_jax.fileio`), Orbax's CheckpointManager taking its gs:// code path
(`CommitFileTemporaryPath`: a step is written in place and committed by a marker file, nothing
renamed), and TensorStore writing and reading every array.

What makes a leftover `open(...)` / `os.path.*` on a workdir path fail: any `gs://` string
reaching builtins.open, os.stat (so os.path.exists / isfile / isdir), os.mkdir / makedirs,
os.listdir / scandir, os.remove / rename / replace, or `tf.io.gfile` (TensorFlow's real GCS
client) raises; and the working directory holds a regular *file* named `gs:`, so a path mangled
into a local one (`os.path.abspath("gs://b/x")` is `<cwd>/gs:/b/x`, `os.makedirs("gs://b/x")`
creates `./gs:/b/x`) cannot be written either. Afterwards the working directory must hold that
file only: nothing was written to the local path a remote name maps to by accident.
"""

import builtins
import importlib
import io
import json
import os
import shutil
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "gs://fake-bucket"


class FakeGcs:
    """The epath backend for gs:// paths, over a local directory (see the module docstring)."""

    def __init__(self, root):
        from etils.epath import backend

        self.root = str(root)
        self._os = backend.os_backend
        self.writes, self.file_renames, self.foreign = [], [], []

    # gs://bucket/key <-> <root>/bucket/key
    def local(self, path) -> str:
        path = os.fspath(path)
        assert path.startswith("gs://"), path
        return os.path.join(self.root, path[len("gs://") :])

    def remote(self, local: str) -> str:
        return "gs://" + os.path.relpath(local, self.root)

    def open(self, path, mode):
        local = self.local(path)
        if "a" in mode or "+" in mode:
            raise AssertionError(f"append to a GCS object: {path} (mode {mode!r})")
        if "w" not in mode:
            return self._os.open(local, mode)
        os.makedirs(os.path.dirname(local), exist_ok=True)  # GCS has no directories
        fake = self

        class Upload(io.BytesIO if "b" in mode else io.StringIO):
            def close(self):  # the object appears whole, at the end of its upload
                if not self.closed:
                    data = self.getvalue()
                    tmp = f"{local}.uploading"
                    with open(tmp, "wb") as f:
                        f.write(data if isinstance(data, bytes) else data.encode("utf-8"))
                    os.replace(tmp, local)
                    fake.writes.append(os.fspath(path))
                super().close()

        return Upload()

    def exists(self, path):
        return self._os.exists(self.local(path))

    def isdir(self, path):
        return self._os.isdir(self.local(path))

    def listdir(self, path):
        return self._os.listdir(self.local(path))

    def glob(self, path):
        return [self.remote(p) for p in self._os.glob(self.local(path))]

    def walk(self, top, *, top_down=True, on_error=None):
        for d, dirs, files in self._os.walk(self.local(top), top_down=top_down, on_error=on_error):
            yield self.remote(os.fspath(d)), dirs, files

    def makedirs(self, path, *, exist_ok=False, mode=None):
        self._os.makedirs(self.local(path), exist_ok=exist_ok)

    def mkdir(self, path, *, exist_ok=False, mode=None):
        self._os.mkdir(self.local(path), exist_ok=exist_ok)

    def rmtree(self, path):
        self._os.rmtree(self.local(path))

    def remove(self, path):
        self._os.remove(self.local(path))

    def _move(self, path, dst, overwrite):
        src, to = self.local(path), self.local(dst)
        if os.path.isdir(src):
            raise AssertionError(
                f"directory rename on GCS (a non-atomic copy of every object): {path} -> {dst}"
            )
        if not overwrite and os.path.exists(to):
            raise FileExistsError(dst)
        os.makedirs(os.path.dirname(to), exist_ok=True)
        shutil.copyfile(src, to)  # GCS: a server-side copy of the one object, then a delete
        os.remove(src)
        self.file_renames.append((os.fspath(path), os.fspath(dst)))

    def rename(self, path, dst):
        self._move(path, dst, overwrite=False)

    def replace(self, path, dst):
        self._move(path, dst, overwrite=True)

    def copy(self, path, dst, overwrite):
        if not overwrite and self.exists(dst):
            raise FileExistsError(dst)
        os.makedirs(os.path.dirname(self.local(dst)), exist_ok=True)
        shutil.copyfile(self.local(path), self.local(dst))

    def stat(self, path):
        return self._os.stat(self.local(path))


_STDLIB = os.path.dirname(os.__file__)
# Libraries that handle gs:// paths themselves: a local-API probe of theirs is let through (and
# recorded in `FakeGcs.foreign`); anything else (kd_jax, numpy, matplotlib, ...) fails.
_GS_AWARE = ("orbax", "etils", "tensorflow", "tensorstore", "absl")


def _first_caller_outside_stdlib():
    """File of the innermost frame outside the standard library and this file (None: only the
    standard library, e.g. a thread pool's worker running a library's callable)."""
    f = sys._getframe(2)
    while f is not None:
        name = f.f_code.co_filename
        if not (name.startswith((_STDLIB, "<frozen")) or name == __file__):
            return name
        f = f.f_back
    return None


def _is_gs(arg) -> bool:
    try:
        s = os.fspath(arg)
    except TypeError:  # a file descriptor, a tensor
        return False
    return s.startswith(b"gs://" if isinstance(s, bytes) else "gs://")


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    import tensorflow as tf
    from etils.epath import gpath
    from orbax.checkpoint._src.path import gcs_utils

    fake = FakeGcs(tmp_path / "gcs")
    os.makedirs(fake.root)

    # 1. epath: gs:// paths -> the fake backend (every other path keeps its own).
    original = gpath._GPath._backend
    monkeypatch.setattr(
        gpath._GPath,
        "_backend",
        property(lambda p: fake if p._uri_scheme == "gs" else original.fget(p)),
    )

    # 2. Orbax -> TensorStore: the `file` driver at the mapped directory, not the `gcs` one.
    monkeypatch.setattr(
        gcs_utils,
        "get_kvstore_for_gcs",
        lambda ckpt_path: {"driver": "file", "path": fake.local(ckpt_path)},
    )

    # 3. The bucket has a flat namespace (no request to GCS).
    monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)

    # 4. TensorFlow's C++ file systems: the mapped local path.
    def tf_local(p):
        if isinstance(p, (str, bytes, os.PathLike)):
            return fake.local(p) if _is_gs(p) else p
        if isinstance(p, (list, tuple)):
            return type(p)(tf_local(x) for x in p)
        return tf.strings.regex_replace(p, "^gs://", fake.root + "/")  # a string tensor

    def record_writer(path, *args, _fn=tf.io.TFRecordWriter, **kwargs):
        local = tf_local(path)
        os.makedirs(os.path.dirname(local), exist_ok=True)  # GCS has no directories
        return _fn(local, *args, **kwargs)

    monkeypatch.setattr(tf.io, "TFRecordWriter", record_writer)
    for module, name in ((tf.summary, "create_file_writer"), (tf.data, "TFRecordDataset")):
        monkeypatch.setattr(
            module,
            name,
            lambda path, *a, _fn=getattr(module, name), **k: _fn(tf_local(path), *a, **k),
        )

    # Guards: a gs:// string reaching the local file API or TF's real GCS client fails.
    gs_aware = tuple(d + os.sep for m in _GS_AWARE for d in importlib.import_module(m).__path__)

    def guard(module, name):
        fn = getattr(module, name)

        def guarded(*args, **kwargs):
            for a in args[:2]:
                if _is_gs(a):
                    caller = _first_caller_outside_stdlib()
                    if caller is None or caller.startswith(gs_aware):
                        fake.foreign.append((f"{module.__name__}.{name}", os.fspath(a), caller))
                        break  # e.g. Orbax's os.path.islink probe: False, as on a real pod
                    raise AssertionError(
                        f"{module.__name__}.{name}({a!r}) from {caller}: a "
                        f"gs:// path reached the local file API"
                    )
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, name, guarded)

    guard(builtins, "open")
    for name in (
        "stat",
        "lstat",
        "mkdir",
        "makedirs",
        "listdir",
        "scandir",
        "remove",
        "unlink",
        "rename",
        "replace",
        "rmdir",
    ):
        guard(os, name)
    for name in (
        "exists",
        "glob",
        "GFile",
        "makedirs",
        "mkdir",
        "isdir",
        "listdir",
        "remove",
        "rename",
        "rmtree",
        "stat",
        "walk",
        "copy",
    ):
        guard(tf.io.gfile, name)

    # The working directory: a file named `gs:` blocks every path mangled into a local one.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "gs:").write_text("not a directory")
    monkeypatch.chdir(cwd)
    yield fake
    assert sorted(os.listdir(cwd)) == ["gs:"] and (cwd / "gs:").is_file(), os.listdir(cwd)


def _load(name, arg):
    from kd_jax import config_utils

    return config_utils.load_config(os.path.join(ROOT, "configs", name), arg)


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_kd_run_with_its_teacher_resumes_on_a_gs_workdir(fake_gcs, capsys):
    from kd_jax import run

    c = _load("kd_mnist.py", "smoke")
    assert not c.teacher.workdir  # the teacher is trained first, into <workdir>/teacher
    workdir = f"{BUCKET}/runs/kd"

    stopped = run.run(c, workdir, stop_after=20)  # preempted at step 20
    assert stopped == {"stopped_at": 20}
    results = run.run(c, workdir)
    printed = capsys.readouterr().out
    assert f"resumed {workdir} at step 20" in printed
    assert results["steps"] == 30 and 0.0 <= results["final_accuracy"] <= 1.0
    assert run.run(c, workdir) == results  # finished: read, not rerun
    assert "already finished" in capsys.readouterr().out

    local = fake_gcs.local(workdir)
    teacher = os.path.join(local, "teacher")
    # Everything lies on the fake remote, in the files the run reads back.
    with open(os.path.join(local, "results.json")) as f:
        assert json.load(f)["final_accuracy"] == results["final_accuracy"]
    assert [r["step"] for r in _lines(os.path.join(local, "metrics.jsonl"))] == [10, 15, 20, 30]
    assert os.path.isfile(os.path.join(local, "config.json"))
    assert any(f.startswith("events.") for f in os.listdir(os.path.join(local, "tensorboard")))
    # Orbax's gs:// path: steps committed by a marker, the oldest one deleted (keep 2).
    assert sorted(os.listdir(os.path.join(local, "checkpoints"))) == ["20", "30"]
    for step in ("20", "30"):
        assert os.path.isfile(os.path.join(local, "checkpoints", step, "commit_success.txt"))
    with open(os.path.join(teacher, "results.json")) as f:
        t = json.load(f)
    assert t["steps"] == 300 and results["teacher_accuracy"] == t["final_accuracy"]
    assert os.listdir(os.path.join(teacher, "checkpoints")) == ["300"]
    assert [r["step"] for r in _lines(os.path.join(teacher, "metrics.jsonl"))] == [
        50,
        100,
        150,
        200,
        250,
        300,
    ]
    # kd_jax wrote its small files as single objects and renamed nothing on the remote.
    assert f"{workdir}/results.json" in fake_gcs.writes
    assert f"{workdir}/teacher/results.json" in fake_gcs.writes
    assert fake_gcs.file_renames == []


def test_pool_converter_and_file_kinds_on_gs(fake_gcs):
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kd_jax import checkpoint, fileio, pool
    from kd_jax.data import shards
    from kd_jax.tools import convert_torch as ct

    # fileio on gs://: no local interpretation anywhere.
    d = f"{BUCKET}/misc"
    assert fileio.is_remote(d) and fileio.absolute(d + "/") == d
    assert not fileio.exists(d) and fileio.glob(f"{d}/*") == []
    fileio.makedirs(d)  # a no-op on GCS
    fileio.write_json_atomic(f"{d}/a.json", {"x": np.float32(1.5)}, default=float)
    assert fileio.read_json(f"{d}/a.json") == {"x": 1.5}
    fileio.save_npy_atomic(f"{d}/g.npy", np.arange(3.0))
    np.testing.assert_array_equal(fileio.load_npy(f"{d}/g.npy"), np.arange(3.0))
    sel = pool.Selection(ids=np.arange(5), classes=np.zeros(5, np.int32))
    sel.save(f"{d}/selection.npz")
    np.testing.assert_array_equal(pool.Selection.load(f"{d}/selection.npz").ids, np.arange(5))
    fig, ax = plt.subplots()
    ax.plot([0, 1])
    fileio.save_figure_atomic(f"{d}/plot.png", fig)
    plt.close(fig)
    assert fileio.read_bytes(f"{d}/plot.png")[:4] == b"\x89PNG"
    log = fileio.LineLog(f"{d}/m.jsonl", min_interval=3600)
    log.append('{"step": 1}')
    log.append('{"step": 2}')
    log.flush()
    assert fileio.LineLog(f"{d}/m.jsonl").read_lines() == ['{"step": 1}', '{"step": 2}']
    assert fileio.glob(f"{d}/*.json") == [f"{d}/a.json"]
    assert fileio.listdir(d) == ["a.json", "g.npy", "m.jsonl", "plot.png", "selection.npz"]

    # A TFRecord pool: written (shards published one object each, manifest last), listed,
    # counted from the manifest and read back.
    images = np.random.default_rng(0).integers(0, 255, (12, 8, 8, 1), dtype=np.uint8)
    out = f"{BUCKET}/pools/p"
    man = shards.write_shards(out, images, num_shards=3, prefix="p")
    pattern = shards.shard_pattern(out, "p")
    assert shards.list_shard_files(pattern) == [f"{out}/{n}" for n in man["shards"]]
    assert shards.read_manifest(out, "p")["count"] == 12 and shards.count_records(pattern) == 12
    got = {int(e["id"]): e["image"] for e in shards.read_shards(pattern).as_numpy_iterator()}
    assert sorted(got) == list(range(12))
    np.testing.assert_array_equal(got[7], images[7])
    assert len(fake_gcs.file_renames) == 3  # the shards; the manifest is one object write
    with pytest.raises(FileExistsError):
        shards.write_shards(out, images, num_shards=3, prefix="p")

    # A converted teacher workdir on gs:// (no temporary directory renamed into place).
    arch = "lenet5_half"
    sd, _ = ct.read_state_dict(
        os.path.join(ROOT, "tests", "fixtures", "torch", "lenet5_half.safetensors")
    )
    conv = ct.convert(arch, 10, sd)
    teacher = f"{BUCKET}/teachers/lenet"
    assert ct.write_teacher(teacher, conv, accuracy=0.5) == teacher
    with pytest.raises(ct.ConversionError):
        ct.write_teacher(teacher, conv)
    ct.write_teacher(teacher, conv, accuracy=0.75, overwrite=True)
    assert fileio.read_json(f"{teacher}/results.json")["final_accuracy"] == 0.75
    variables = checkpoint.load_variables(teacher)
    jax.tree.map(
        np.testing.assert_array_equal, variables["params"]["model"], conv.variables["params"]
    )


def test_local_files_keep_their_semantics(tmp_path):
    """Local paths: atomic writes leave no temporary file, `absolute` is os.path.abspath, and
    an append after a run killed mid-line starts a new line (the trainer skips the cut one)."""
    from kd_jax import fileio, train

    path = tmp_path / "new" / "r.json"  # a missing parent is created, as on GCS
    fileio.write_json_atomic(path, {"a": 1})
    fileio.write_json_atomic(path, {"a": 2})
    assert fileio.read_json(path) == {"a": 2} and os.listdir(path.parent) == ["r.json"]
    assert fileio.absolute("x") == os.path.abspath("x") and not fileio.is_remote(tmp_path)
    assert fileio.glob(str(tmp_path / "new" / "*.json")) == [str(path)]

    (tmp_path / "metrics.jsonl").write_text('{"step": 10}\n{"step": 2')  # killed mid-line
    logger = train._Logger.__new__(train._Logger)  # the history/append half, no TensorBoard
    logger.enabled, logger.log = True, fileio.LineLog(tmp_path / "metrics.jsonl")
    assert logger.history() == [{"step": 10}]
    logger.log.append('{"step": 20}')
    logger.log.append('{"step": 30}')
    assert logger.history() == [{"step": 10}, {"step": 20}, {"step": 30}]
