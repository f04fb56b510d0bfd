"""launch/: the TPU pod install step run for real against a fake `gcloud`, dry runs, gpu.sh checks.

The install test puts a fake `gcloud` first on PATH (its `compute tpus tpu-vm scp/ssh` copy to
and run in per-worker temporary HOMEs on this machine) and a Python 3.10 as `python3`, as on
the tpu-ubuntu2204-base image, then runs `launch/tpu_pod.sh install`: git archive, scp,
launch/worker_setup.sh on every worker (a venv with Python >= 3.11, one pip install of the jax
requirement and kd_jax from the copied tarball), the versions line of worker 0. Offline and
quick: the interpreter is this test's own (KD_JAX_PYTHON, instead of uv's managed download),
the jax requirement is plain `jax` (KD_JAX_JAX_EXTRA=none), no kd_jax extras (KD_JAX_EXTRAS="", not
the default gcs client), and pip reuses this test's
installed packages through PYTHONPATH with PIP_NO_INDEX=1, so nothing is downloaded.
"""

import configparser
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(ROOT, "launch", "tpu_pod.sh")
GPU = os.path.join(ROOT, "launch", "gpu.sh")
SETUP = os.path.join(ROOT, "launch", "worker_setup.sh")

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Fake gcloud: worker i of the slice is the folder $FAKE_GCLOUD_ROOT/w<i>, its HOME.
set -euo pipefail
root="$FAKE_GCLOUD_ROOT"; n="${FAKE_GCLOUD_WORKERS:-1}"
printf '%q ' "$@" >> "$root/calls.log"; echo >> "$root/calls.log"
if [[ "${1:-} ${2:-}" == "config get-value" ]]; then echo fake-project; exit 0; fi
[[ "${1:-} ${2:-} ${3:-}" == "compute tpus tpu-vm" ]] || { echo "fake gcloud: unsupported: $*" >&2; exit 1; }
verb="$4"; shift 4
pos=() worker=0 cmd=""
for a in "$@"; do
  case "$a" in
    --worker=*) worker="${a#--worker=}" ;;
    --command=*) cmd="${a#--command=}" ;;
    --*) ;;
    *) pos+=("$a") ;;
  esac
done
if [[ "$worker" == all ]]; then workers=$(seq 0 $((n - 1))); else workers="$worker"; fi
case "$verb" in
  create|delete) ;;
  scp)
    dest="${pos[-1]}"; path="${dest#*:}"
    [[ "$dest" == *:* && "$path" != /* ]] || { echo "fake gcloud: want NAME:relative-path, got $dest" >&2; exit 1; }
    for w in $workers; do mkdir -p "$root/w$w"; cp "${pos[@]:0:${#pos[@]}-1}" "$root/w$w/$path"; done ;;
  ssh)
    for w in $workers; do
      mkdir -p "$root/w$w"
      (cd "$root/w$w" && HOME="$root/w$w" FAKE_HOSTNAME="fake-tpu-w-$w" bash -c "$cmd")
    done ;;
  *) echo "fake gcloud: unsupported verb $verb" >&2; exit 1 ;;
esac
"""


def _version(python):
    try:
        out = subprocess.run(
            [python, "-c", "import sys; print(*sys.version_info[:2])"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.split()
        return tuple(map(int, out))
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _python310():
    """Any Python 3.10 on this machine (pyenv's on the dev machines and CI), or None."""
    candidates = sorted(glob.glob("/root/.pyenv/versions/3.10*/bin/python"))
    candidates += sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.10*/bin/python")))
    candidates += [
        p
        for p in (shutil.which("python3.10"), "/usr/bin/python3.10", "/usr/local/bin/python3.10")
        if p
    ]
    for c in candidates:
        if os.path.exists(c) and _version(c) == (3, 10):
            return c
    return None


PY310 = _python310()
needs_py310 = pytest.mark.skipif(
    PY310 is None,
    reason="no Python 3.10 on this machine (looked in "
    "~/.pyenv/versions/3.10*, python3.10 on PATH, /usr/bin)",
)


def _setup_cfg():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    reqs = [r.strip() for r in cfg["options"]["install_requires"].splitlines()]
    jax = [r for r in reqs if re.match(r"jax\s*[<>=!~]", r)]
    assert len(jax) == 1, reqs
    return cfg["options"]["python_requires"].strip(), jax[0].replace(" ", "")


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "KD_JAX_", "UV_"))}
    env.update(extra)
    return env


def _fake_cloud(tmp_path, workers=1):
    """A bin folder with the fake gcloud, python3 = Python 3.10 and a hostname per worker."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(FAKE_GCLOUD)
    (bin_dir / "hostname").write_text('#!/bin/sh\necho "${FAKE_HOSTNAME:-fake-local}"\n')
    for f in ("gcloud", "hostname"):
        os.chmod(bin_dir / f, 0o755)
    if PY310:
        os.symlink(PY310, bin_dir / "python3")
    root = tmp_path / "slice"
    root.mkdir()
    return _clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        FAKE_GCLOUD_ROOT=str(root),
        FAKE_GCLOUD_WORKERS=str(workers),
        TMPDIR=str(tmp_path),
    ), root


def _offline_pip_env(env):
    """This test's interpreter and installed packages, pip without any index or download."""
    env = dict(env)
    env.update(
        KD_JAX_PYTHON=sys.executable,
        KD_JAX_JAX_EXTRA="none",
        KD_JAX_EXTRAS="",
        PIP_NO_INDEX="1",
        PIP_CONFIG_FILE=os.devnull,
        # pip's inverted spelling: "0" turns build isolation off (no setuptools download).
        PIP_NO_BUILD_ISOLATION="0",
        PIP_DISABLE_PIP_VERSION_CHECK="1",
        PYTHONPATH=os.pathsep.join(site.getsitepackages()),
    )
    return env


def _run(cmd, env, timeout=300, **kw):
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, **kw)


# ----- tpu_pod.sh install, for real, on a fake 2-worker slice ----------------------------------
@pytest.mark.slow
@needs_py310
def test_tpu_install_builds_its_own_python_env_where_python3_is_3_10(tmp_path):
    env, root = _fake_cloud(tmp_path, workers=2)
    assert _version(shutil.which("python3", path=env["PATH"])) == (3, 10)
    env = _offline_pip_env(env)
    t0 = time.time()
    r = _run(
        ["bash", TPU_POD, "install", "--name=kd-test", "--zone=z", "--project=p"], env, cwd=ROOT
    )
    took = time.time() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    print(f"tpu_pod.sh install on 2 fake workers: {took:.1f} s")

    calls = (root / "calls.log").read_text().splitlines()  # shell-quoted (printf %q)
    assert [c.split()[3] for c in calls] == ["scp", "ssh", "ssh"], calls
    assert "--worker=all" in calls[0] and "kd_jax_worker_setup.sh" in calls[0]
    assert "--worker=all" in calls[1] and r"kd_jax_worker_setup.sh\ install" in calls[1]
    assert "--worker=0" in calls[2] and r"kd_jax_worker_setup.sh\ versions" in calls[2]
    py = f"Python {sys.version_info.major}.{sys.version_info.minor}."
    for w in (0, 1):
        home = root / f"w{w}"
        assert f"fake-tpu-w-{w}: system python3: Python 3.10." in out
        assert f"fake-tpu-w-{w}: kd_jax environment ready: {home}/kd_jax_venv/bin/python" in out
        venv_py = home / "kd_jax_venv" / "bin" / "python"
        assert _version(str(venv_py)) == sys.version_info[:2] >= (3, 11)
        assert (home / "kd_jax" / "setup.cfg").exists()  # the copied tarball, unpacked
    # The versions line, from worker 0 only.
    import jax

    line = [ln for ln in out.splitlines() if ln.startswith("fake-tpu-w-0: ") and "jaxlib" in ln]
    assert len(line) == 1 and not any(
        ln.startswith("fake-tpu-w-1: ") and "jaxlib" in ln for ln in out.splitlines()
    ), out
    assert f"{py}" in line[0] and f"jax {jax.__version__}," in line[0], line
    assert "libtpu" in line[0] and "kd_jax 0.1.0" in line[0], line

    # The environment it made runs kd_jax (installed there from the tarball, not this checkout).
    home = root / "w0"
    venv_py = str(home / "kd_jax_venv" / "bin" / "python")
    r = _run([venv_py, "-m", "kd_jax.main", "--help"], env, cwd=home, timeout=120)
    # absl's --help exits with 1 after printing the flags of the module it ran.
    assert r.returncode in (0, 1) and "Traceback" not in r.stderr, r.stdout + r.stderr
    assert f"{home}/kd_jax_venv/lib/" in r.stdout and "--workdir" in r.stdout, r.stdout
    r = _run(
        [venv_py, "-c", "import jax, kd_jax, kd_jax.losses; print(kd_jax.__file__)"],
        env,
        cwd=home,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().startswith(str(home / "kd_jax_venv")), r.stdout


@needs_py310
def test_worker_setup_refuses_a_too_old_interpreter(tmp_path):
    env, _ = _fake_cloud(tmp_path)
    env = _offline_pip_env(env)
    env.update(HOME=str(tmp_path), KD_JAX_PYTHON=PY310)
    r = _run(["bash", SETUP, "install", ROOT], env)
    assert r.returncode == 2
    assert f"KD_JAX_PYTHON='{PY310}' is Python 3.10" in r.stderr and ">= 3.11" in r.stderr
    assert not (tmp_path / "kd_jax_venv").exists()


def test_worker_setup_reads_the_ranges_from_setup_cfg(tmp_path):
    python_requires, jax_req = _setup_cfg()
    env = _clean_env()
    r = _run(["bash", SETUP, "spec", ROOT], env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [f"python{python_requires}", jax_req.replace("jax", "jax[tpu]", 1)]
    r = _run(["bash", SETUP, "spec", ROOT], dict(env, KD_JAX_JAX_EXTRA="none"))
    assert r.stdout.split()[1] == jax_req
    # Read at launch time: a changed setup.cfg changes what is installed, no second copy.
    src = tmp_path / "src"
    src.mkdir()
    text = open(os.path.join(ROOT, "setup.cfg")).read()
    text = text.replace(jax_req, "jax>=0.11,<0.15").replace(python_requires, ">=3.12")
    (src / "setup.cfg").write_text(text)
    r = _run(["bash", SETUP, "spec", str(src)], env)
    assert r.stdout.split() == ["python>=3.12", "jax[tpu]>=0.11,<0.15"], r.stdout + r.stderr


# ----- tpu_pod.sh dry runs ---------------------------------------------------------------------
def _dry(*args):
    r = _run(
        ["bash", TPU_POD, "--zone=us-central2-b", "--project=p", "--dry-run", *args],
        _clean_env(),
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def test_tpu_dry_run_all_installs_an_env_and_passes_gs_workdir_through():
    out = _dry(
        "all",
        "--name=kd-v4-32",
        "--type=v4-32",
        "--config=configs/odsd_imagenet.py",
        "--workdir=gs://my-bucket/kd/odsd_r50_r18",
        "--",
        "--config.batch_size=1024",
    )
    assert "gcsfuse" not in out and "mount" not in out.lower() and "/tmp/gcs" not in out
    assert "python3 -m pip" not in out
    assert "--version=tpu-ubuntu2204-base" in out
    lines = out.splitlines()
    scp = [ln for ln in lines if " scp " in ln]
    assert len(scp) == 1 and "kd_jax_worker_setup.sh" in scp[0] and "kd_jax.tar.gz" in scp[0]
    assert "--worker=all" in scp[0]
    install = [ln for ln in lines if "kd_jax_worker_setup.sh install" in ln]
    assert len(install) == 1 and "--worker=all" in install[0]
    assert "tar xzf $HOME/kd_jax.tar.gz -C $HOME/kd_jax" in install[0]
    assert any("--worker=0" in ln and "kd_jax_worker_setup.sh versions" in ln for ln in lines)
    run = [ln for ln in lines if "setsid nohup" in ln]
    assert len(run) == 1 and "--worker=all" in run[0]
    assert (
        "$HOME/kd_jax_venv/bin/python -m kd_jax.main --config=configs/odsd_imagenet.py "
        "--workdir=gs://my-bucket/kd/odsd_r50_r18 --config.batch_size=1024 "
    ) in run[0]
    assert "mkdir" not in run[0]
    # Order: create, then install, then run.
    assert out.index("tpu-vm create") < out.index(" scp ") < out.index("setsid nohup")


def test_tpu_dry_run_install_from_git():
    out = _dry("install", "--name=kd", "--git=https://example.invalid/kd_jax.git@v1")
    lines = out.splitlines()
    scp = [ln for ln in lines if " scp " in ln]
    assert len(scp) == 1 and "kd_jax_worker_setup.sh" in scp[0] and "tar.gz" not in scp[0]
    install = [ln for ln in lines if "kd_jax_worker_setup.sh install" in ln][0]
    assert (
        "git clone -q https://example.invalid/kd_jax.git $HOME/kd_jax && "
        "git -C $HOME/kd_jax checkout -q v1 && "
    ) in install
    assert "git archive" not in out


def test_tpu_dry_run_shared_path_workdir_and_default_versions():
    out = _dry(
        "run",
        "--name=kd",
        "--type=v6e-8",
        "--config=configs/kd_cifar10.py",
        "--workdir=/mnt/nfs/kd/c10",
    )
    run = [ln for ln in out.splitlines() if "setsid nohup" in ln][0]
    assert "mkdir -p /mnt/nfs/kd/c10 && " in run and "--workdir=/mnt/nfs/kd/c10" in run
    for tpu_type, version in [
        ("v4-8", "tpu-ubuntu2204-base"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-8", "v2-alpha-tpuv5"),
        ("v6e-8", "v2-alpha-tpuv6e"),
    ]:
        assert f"--version={version}" in _dry("create", "--name=kd", f"--type={tpu_type}")
    assert "--version=my-image" in _dry("create", "--name=kd", "--version=my-image")
    r = _run(
        [
            "bash",
            TPU_POD,
            "run",
            "--name=kd",
            "--zone=z",
            "--project=p",
            "--dry-run",
            "--config=configs/kd_cifar10.py",
            "--workdir=relative/dir",
        ],
        _clean_env(),
        cwd=ROOT,
    )
    assert r.returncode == 2 and "gs://bucket/path URL or an absolute path" in r.stderr


# ----- gpu.sh ----------------------------------------------------------------------------------
GPU_ARGS = ["--config=configs/kd_cifar10.py", "--workdir=/tmp/kd_gpu_test_unused"]


@needs_py310
def test_gpu_refuses_a_too_old_interpreter_and_dry_run_still_works():
    r = _run(["bash", GPU, *GPU_ARGS, f"--python={PY310}"], _clean_env())
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"interpreter {PY310} is Python 3.10" in r.stderr
    assert "kd_jax needs Python >= 3.11" in r.stderr and "--python" in r.stderr
    r = _run(["bash", GPU, *GPU_ARGS, f"--python={PY310}", "--dry-run"], _clean_env())
    assert r.returncode == 0, r.stderr
    assert f"{PY310} -m kd_jax.main --config=configs/kd_cifar10.py" in r.stdout
    assert "dry run: nothing started" in r.stdout


def test_gpu_says_cpu_only_jax_with_the_fix():
    """This test's interpreter has jax on the CPU only (JAX_PLATFORMS=cpu, no GPU here)."""
    _, jax_req = _setup_cfg()
    r = _run(
        ["bash", GPU, *GPU_ARGS, f"--python={sys.executable}"], _clean_env(JAX_PLATFORMS="cpu")
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"interpreter {sys.executable} has jax" in r.stderr
    assert "CPU-only jax installed" in r.stderr
    assert jax_req.replace("jax", "jax[cuda12]", 1) in r.stderr and "jax[cuda13]" in r.stderr
