#!/usr/bin/env bash
# Runs kd_jax on GPUs: one host with all its GPUs, or several hosts (one process per host).
#
# One host (one process sees every GPU; the batch is sharded over all of them):
#   launch/gpu.sh --config=configs/kd_cifar10.py --workdir=/data/kd/c10
#
# Several hosts: run the same command on every host, each with its own --process-id; host 0's
# address is the coordinator. The workdir must be on a file system every host sees (NFS, ...).
#   host0$ launch/gpu.sh --coordinator=10.0.0.1:8476 --num-processes=2 --process-id=0 \
#              --config=configs/kd_cifar10.py --workdir=/shared/kd/c10
#   host1$ launch/gpu.sh --coordinator=10.0.0.1:8476 --num-processes=2 --process-id=1 \
#              --config=configs/kd_cifar10.py --workdir=/shared/kd/c10
# Under SLURM (`srun`), --slurm lets jax.distributed.initialize() read the SLURM variables.
#
# Flags (--flag=value or --flag value):
#   --config PATH[:ARG]      config file (required)
#   --workdir DIR            checkpoints, metrics, results (required)
#   --coordinator HOST:PORT  host 0's address and a free port (multi-host)
#   --num-processes N        number of hosts (processes) in the job (multi-host)
#   --process-id I           this host's index in [0, N) (multi-host)
#   --slurm                  multi-host under srun: coordinator and ids come from SLURM
#   --gpus LIST              restrict to these GPUs (CUDA_VISIBLE_DEVICES), e.g. 0,1,2,3
#   --python PYTHON          interpreter (default: python3, or $PYTHON)
#   --dry-run                print the environment and command instead of running it (no checks
#                            of the interpreter: works without jax)
#   -- ARGS...               passed on to kd_jax.main, e.g. -- --config.batch_size=512
#
# Before it starts, it checks that the interpreter is a Python kd_jax accepts (setup.cfg's
# python_requires, >= 3.11), that it imports jax and that jax sees a GPU, and otherwise stops
# with the fix (the exact pip command, with setup.cfg's jax range). A GPU environment, e.g.:
#   uv venv --seed --python 3.12 ~/kd_jax_venv    # or: python3.12 -m venv ~/kd_jax_venv
#   ~/kd_jax_venv/bin/python -m pip install "jax[cuda12]<setup.cfg's jax range>" -e .
#   launch/gpu.sh --python ~/kd_jax_venv/bin/python --config=... --workdir=...
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu.sh: error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="" WORKDIR="" COORD="" NPROC="" PID_="" SLURM=0 GPUS="" PY="${PYTHON:-python3}" DRY_RUN=0
EXTRA=()

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --slurm) SLURM=1; shift; continue ;;
    --*=*) key="${arg%%=*}"; val="${arg#*=}"; shift ;;
    --*) key="$arg"; [[ $# -ge 2 ]] || die "$key needs a value"; val="$2"; shift 2 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
  case "$key" in
    --config) CONFIG="$val" ;;
    --workdir) WORKDIR="$val" ;;
    --coordinator) COORD="$val" ;;
    --num-processes|--num_processes) NPROC="$val" ;;
    --process-id|--process_id) PID_="$val" ;;
    --gpus) GPUS="$val" ;;
    --python) PY="$val" ;;
    *) die "unknown flag '$key' (see --help)" ;;
  esac
done

# ----- check inputs ---------------------------------------------------------------------------
[[ -n "$CONFIG" ]] || die "--config is required (e.g. configs/kd_cifar10.py)"
[[ -n "$WORKDIR" ]] || die "--workdir is required"
cfg_file="${CONFIG%%:*}"
[[ "$cfg_file" == /* ]] || cfg_file="$REPO_ROOT/$cfg_file"
[[ -f "$cfg_file" ]] || die "--config: no file $cfg_file"
# The command runs from the repository root: make a relative workdir absolute first.
[[ "$WORKDIR" == /* || "$WORKDIR" == *://* ]] || WORKDIR="$PWD/$WORKDIR"
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus='$GPUS': a comma-separated list of GPU indices"

MULTI=0
if [[ -n "$COORD$NPROC$PID_" ]]; then
  [[ $SLURM -eq 0 ]] || die "--slurm takes the coordinator and ids from SLURM; drop --coordinator/--num-processes/--process-id"
  [[ -n "$COORD" && -n "$NPROC" && -n "$PID_" ]] || die "multi-host needs all of --coordinator, --num-processes and --process-id"
  [[ "$COORD" =~ ^[^:]+:[0-9]+$ ]] || die "--coordinator='$COORD' must be HOST:PORT (host 0's address)"
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || die "--num-processes='$NPROC' must be a positive integer"
  [[ "$PID_" =~ ^[0-9]+$ && "$PID_" -lt "$NPROC" ]] || die "--process-id='$PID_' must be in [0, $NPROC)"
  MULTI=1
elif [[ $SLURM -eq 1 ]]; then
  [[ -n "${SLURM_PROCID:-}" ]] || die "--slurm but SLURM_PROCID is not set: start this script with srun"
fi

# The interpreter: a Python kd_jax accepts, with a jax that sees GPUs (not with --dry-run).
check_python() {
  local spec pyreq jaxreq min py info pyver jaxver backend ndev
  # setup.cfg's python_requires and jax range, parsed in one place (launch/worker_setup.sh).
  spec="$(KD_JAX_JAX_EXTRA=cuda12 bash "$REPO_ROOT/launch/worker_setup.sh" spec "$REPO_ROOT")"
  read -r pyreq jaxreq <<<"$spec"
  min="${pyreq#python>=}"
  py="$(command -v "$PY" || true)"
  [[ -n "$py" ]] || die "python interpreter '$PY' not found (--python)"
  local fix="make an environment with Python >= $min and '$jaxreq' (or jax[cuda13]) and kd_jax, e.g. 'uv venv --seed --python 3.12 ~/kd_jax_venv && ~/kd_jax_venv/bin/python -m pip install \"$jaxreq\" -e $REPO_ROOT', then pass --python ~/kd_jax_venv/bin/python"
  "$py" -c "import sys; sys.exit(0 if sys.version_info[:2] >= tuple(map(int, '$min'.split('.'))) else 1)" \
    || die "interpreter $py is Python $("$py" -c 'import platform; print(platform.python_version())' 2>/dev/null || echo '?'); kd_jax needs Python >= $min: $fix"
  info="$(env ${GPUS:+CUDA_VISIBLE_DEVICES="$GPUS"} XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 "$py" -c \
    'import platform, jax; print(platform.python_version(), jax.__version__, jax.default_backend(), jax.local_device_count())' 2>/dev/null | tail -n 1)" \
    || die "interpreter $py cannot import jax: $fix"
  read -r pyver jaxver backend ndev <<<"$info"
  [[ "$backend" == gpu ]] || die "interpreter $py has jax $jaxver on the ${backend:-?} only (CPU-only jax installed, or no GPU/driver visible): install '$jaxreq' or jax[cuda13] within setup.cfg's range, e.g. $py -m pip install \"$jaxreq\""
  echo "gpu.sh: $py: Python $pyver, jax $jaxver, $ndev GPU(s)"
}

if [[ $DRY_RUN -eq 0 ]]; then
  check_python
  if command -v nvidia-smi >/dev/null; then
    echo "gpu.sh: GPUs on $(hostname): $(nvidia-smi --query-gpu=name --format=csv,noheader | sort | uniq -c | xargs)"
  else
    echo "gpu.sh: warning: nvidia-smi not found; JAX will fall back to the CPU unless it finds a GPU" >&2
  fi
fi

# ----- environment and command ----------------------------------------------------------------
ENV=(TF_CPP_MIN_LOG_LEVEL=2)
# JAX preallocates 75 % of each GPU by default; tf.data runs on the CPU only (kd_jax hides GPUs
# from TensorFlow), so give JAX most of the memory.
ENV+=(XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
[[ -n "$GPUS" ]] && ENV+=(CUDA_VISIBLE_DEVICES="$GPUS")
if [[ $MULTI -eq 1 ]]; then
  ENV+=(KD_JAX_DISTRIBUTED=1 KD_JAX_COORDINATOR="$COORD" KD_JAX_NUM_PROCESSES="$NPROC" KD_JAX_PROCESS_ID="$PID_")
  what="process $PID_ of $NPROC, coordinator $COORD"
elif [[ $SLURM -eq 1 ]]; then
  ENV+=(KD_JAX_DISTRIBUTED=1)
  what="SLURM task ${SLURM_PROCID:-?} of ${SLURM_NTASKS:-?} (jax.distributed reads SLURM_*)"
else
  what="one process, all visible GPUs"
fi
CMD=("$PY" -m kd_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")

echo "gpu.sh: $what"
printf '+ cd %q &&' "$REPO_ROOT"; printf ' %q' env "${ENV[@]}" "${CMD[@]}"; printf '\n'
if [[ $DRY_RUN -eq 1 ]]; then
  echo "gpu.sh: dry run: nothing started"
  exit 0
fi
cd "$REPO_ROOT"
exec env "${ENV[@]}" "${CMD[@]}"
