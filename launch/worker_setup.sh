#!/usr/bin/env bash
# Sets up kd_jax on one host: launch/tpu_pod.sh copies this file to every TPU VM worker (as
# ~/kd_jax_worker_setup.sh) and runs it there over `gcloud ... ssh --worker=all`. It also runs
# by hand on any Linux host, and tests/test_launch.py runs it against a fake gcloud.
#
#   bash worker_setup.sh install SRC   # SRC: the kd_jax source tree (unpacked tarball or clone)
#   bash worker_setup.sh versions      # one line: host, Python, jax, jaxlib, libtpu, kd_jax
#   bash worker_setup.sh spec SRC      # what install would pip install (read from SRC/setup.cfg)
#
# install makes a fresh virtual environment $KD_JAX_VENV with a Python that kd_jax accepts
# (setup.cfg's python_requires, >= 3.11), whatever the image's own python3 is (Ubuntu 22.04's is
# 3.10, which pip refuses for kd_jax), then pip installs, in one resolve, 'jax[tpu]' within
# setup.cfg's jax range and kd_jax from SRC. The interpreter is
#   - $KD_JAX_PYTHON if set: an interpreter already on the host (a conda env, a deadsnakes
#     python3.12, ...); it must satisfy python_requires; uv is not needed then;
#   - otherwise CPython $KD_JAX_PYTHON_VERSION managed by uv (`uv python install`, a download),
#     with uv itself installed first if missing: `python3 -m pip install --user uv` with the
#     image's pip, or else astral's standalone installer into ~/.local/bin.
# The environment gets its pip from the interpreter's own `-m venv` (no download for that).
#
# Environment (all optional):
#   KD_JAX_VENV            the environment to (re)create (default: ~/kd_jax_venv)
#   KD_JAX_PYTHON          an interpreter to build it from, instead of a uv-managed one
#   KD_JAX_PYTHON_VERSION  the uv-managed CPython (default: 3.12; jaxlib >= 0.11 has wheels for
#                          Python >= 3.12 only, on 3.11 pip stops at jax 0.10.x)
#   KD_JAX_JAX_EXTRA       the jax extra: tpu (default), cuda12, cuda13, or none for plain jax
#   KD_JAX_EXTRAS          kd_jax's extras (default gcs: the GCS client Orbax needs for gs://
#                          checkpoints); empty for none
#                          (CPU only: what the tests use)
#   PIP_*                  pip's own settings apply to every pip call (e.g. PIP_NO_INDEX=1 and
#                          PIP_FIND_LINKS=DIR for an offline host)
set -euo pipefail
shopt -s inherit_errexit  # a failure inside $(...) stops the script too

die() { echo "worker_setup.sh: error: $*" >&2; exit 2; }
say() { echo "$(hostname): $*"; }

VENV="${KD_JAX_VENV:-$HOME/kd_jax_venv}"
PY_VERSION="${KD_JAX_PYTHON_VERSION:-3.12}"
JAX_EXTRA="${KD_JAX_JAX_EXTRA-tpu}"
KD_EXTRAS="${KD_JAX_EXTRAS-gcs}"

# The jax requirement and the minimum Python, read from SRC/setup.cfg: one place to change them.
jax_range() {  # '>=0.9,<0.14' from the `jax...` line of install_requires
  local r
  r="$(sed -n 's/^[[:space:]]*jax[[:space:]]*\([<>=!~][^#;[:space:]]*\).*$/\1/p' "$1/setup.cfg")"
  [[ -n "$r" && "$r" != *$'\n'* ]] || die "no single 'jax<range>' line in install_requires of $1/setup.cfg"
  echo "$r"
}
min_python() {  # '3.11' from `python_requires = >=3.11`
  local v
  v="$(sed -n 's/^python_requires[[:space:]]*=[[:space:]]*>=[[:space:]]*\([0-9][0-9.]*\).*$/\1/p' "$1/setup.cfg")"
  [[ -n "$v" ]] || die "no 'python_requires = >=X.Y' in $1/setup.cfg"
  echo "$v"
}
jax_spec() {
  case "$JAX_EXTRA" in
    none|"") echo "jax$(jax_range "$1")" ;;
    tpu|cuda12|cuda13|cuda12-local|cuda13-local) echo "jax[$JAX_EXTRA]$(jax_range "$1")" ;;
    *) die "KD_JAX_JAX_EXTRA='$JAX_EXTRA': one of tpu, cuda12, cuda13, none" ;;
  esac
}
py_at_least() {  # py_at_least PYTHON X.Y
  "$1" -c "import sys; sys.exit(0 if sys.version_info[:2] >= tuple(map(int, '$2'.split('.'))) else 1)" 2>/dev/null
}

find_uv() {  # prints the path of a uv binary, installing uv if there is none
  local bin="$HOME/.local/bin/uv"
  if command -v uv >/dev/null; then command -v uv; return; fi
  if [[ -x "$bin" ]]; then echo "$bin"; return; fi
  say "installing uv (python3 -m pip install --user uv)" >&2
  if python3 -m pip install -q --user --disable-pip-version-check uv >&2 \
      && bin="$(python3 -m site --user-base)/bin/uv" && [[ -x "$bin" ]]; then
    echo "$bin"; return
  fi
  say "pip could not install uv; trying the standalone installer" >&2
  bin="$HOME/.local/bin/uv"
  command -v curl >/dev/null || die "no uv, pip failed and no curl: install uv, or set KD_JAX_PYTHON"
  curl -LsSf https://astral.sh/uv/install.sh | env UV_UNMANAGED_INSTALL="$HOME/.local/bin" sh >&2
  [[ -x "$bin" ]] || die "the uv installer left no $bin"
  echo "$bin"
}

find_python() {  # prints the interpreter to build the environment from
  local py min="$1"
  if [[ -n "${KD_JAX_PYTHON:-}" ]]; then
    py="$(command -v "$KD_JAX_PYTHON" || true)"
    [[ -n "$py" ]] || die "KD_JAX_PYTHON='$KD_JAX_PYTHON' is not an interpreter on $(hostname)"
    py_at_least "$py" "$min" || die "KD_JAX_PYTHON='$py' is Python $("$py" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'); kd_jax needs >= $min"
    echo "$py"; return
  fi
  local uv; uv="$(find_uv)"
  say "uv python install $PY_VERSION ($("$uv" --version))" >&2
  "$uv" python install "$PY_VERSION" >&2 || die "'uv python install $PY_VERSION' failed (no download? set KD_JAX_PYTHON to a Python >= $min on the host)"
  py="$("$uv" python find "$PY_VERSION")" || die "'uv python find $PY_VERSION' found nothing"
  py_at_least "$py" "$min" || die "uv found '$py' for $PY_VERSION, older than kd_jax's >= $min (KD_JAX_PYTHON_VERSION)"
  echo "$py"
}

do_install() {
  local src="$1" min spec py
  [[ -f "$src/setup.cfg" ]] || die "no kd_jax source tree at '$src' (no setup.cfg)"
  min="$(min_python "$src")"; spec="$(jax_spec "$src")"
  [[ "$VENV" == /?*/* || "$VENV" == "$HOME"/?* ]] || die "KD_JAX_VENV='$VENV': a path of its own (it is deleted and rebuilt)"
  py="$(find_python "$min")"
  say "system python3: $(python3 --version 2>&1 || echo none); building $VENV from $py ($("$py" --version 2>&1))"
  rm -rf "$VENV"
  "$py" -m venv "$VENV" || die "'$py -m venv' failed (Debian/Ubuntu: install python3.X-venv, or use uv's Python)"
  py_at_least "$VENV/bin/python" "$min" || die "$VENV/bin/python is older than $min"
  local target="$src${KD_EXTRAS:+[$KD_EXTRAS]}"
  say "pip install '$spec' $target"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --progress-bar off "$spec" "$target"
  say "kd_jax environment ready: $VENV/bin/python"
}

do_versions() {
  [[ -x "$VENV/bin/python" ]] || die "no environment at $VENV: run install first"
  "$VENV/bin/python" - "$(hostname)" <<'EOF'
import importlib.metadata as md, platform, sys
def v(*names):
    for n in names:
        try:
            return md.version(n)
        except md.PackageNotFoundError:
            pass
    return "not installed"
print(f"{sys.argv[1]}: {sys.executable}: Python {platform.python_version()}, jax {v('jax')}, "
      f"jaxlib {v('jaxlib')}, libtpu {v('libtpu', 'libtpu-nightly')}, kd_jax {v('kd_jax')}")
EOF
}

case "${1:-}" in
  install) [[ $# -eq 2 ]] || die "usage: $0 install SRC"; do_install "$2" ;;
  versions) do_versions ;;
  spec) [[ $# -eq 2 ]] || die "usage: $0 spec SRC"; echo "python>=$(min_python "$2") $(jax_spec "$2")" ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
  *) die "usage: $0 install SRC | versions | spec SRC (see --help)" ;;
esac
