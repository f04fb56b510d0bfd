#!/usr/bin/env bash
# Runs kd_jax on a Cloud TPU VM slice (single host or pod): create the slice, install kd_jax on
# every worker, start the same `python -m kd_jax.main` on all workers, stream worker 0's log,
# delete the slice.
#
#   launch/tpu_pod.sh all --name=kd-v4-32 --zone=us-central2-b --type=v4-32 \
#       --config=configs/kd_cifar10.py --workdir=gs://my-bucket/kd/cifar10_r34_r18
#
# Subcommands (several may be given, in this order):
#   create   create the TPU VM slice (--type, --version, --spot)
#   install  copy this checkout (git archive of HEAD, or --git=URL[@REF]) and
#            launch/worker_setup.sh to every worker and run it there: it builds ~/kd_jax_venv
#            with its own Python >= 3.11 (uv-managed CPython 3.12, whatever the image's python3
#            is) and pip installs jax[tpu] (setup.cfg's jax range) and kd_jax into it; then
#            prints worker 0's Python, jax, jaxlib and libtpu versions
#   run      start the training with ~/kd_jax_venv/bin/python on every worker (detached;
#            survives a dropped ssh) and stream worker 0's log (Ctrl-C stops the streaming,
#            not the job)
#   logs     stream worker 0's log again
#   stop     stop the training on every worker (by the PID it recorded)
#   delete   delete the slice
#   all      create install run
#
# Every worker runs the same program with KD_JAX_DISTRIBUTED=1: kd_jax calls
# jax.distributed.initialize(), which finds the coordinator on a TPU VM by itself. Each process
# reads its own share of the data and writes checkpoints into the shared --workdir, so the
# workdir must be visible to every worker: a gs:// URL, passed to kd_jax as is (kd_jax reads and
# writes gs:// itself; nothing is mounted), or an absolute path on a shared file system (NFS /
# Filestore) that you mounted on every worker.
#
# TPU software versions (--version): Google's table (https://cloud.google.com/tpu/docs/runtimes)
# gives tpu-ubuntu2204-base for v4 and older, v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for
# v5p and v2-alpha-tpuv6e for v6e (Trillium); --version defaults to that from --type. The
# page says an image holds Ubuntu, Docker and the TPU software, but names no Python version.
# tpu-ubuntu2204-base is Ubuntu 22.04, whose python3 is 3.10 (pytorch/xla moved its TPU VM
# wheels to cp310 for that image: github.com/pytorch/xla/pull/5294), where pip refuses kd_jax
# ("requires a different Python: 3.10.x not in '>=3.11'"). For the v2-alpha-* images we found
# no Python version from Google itself: AI-Hypercomputer/maxdiffusion's
# docs/getting_started/first_run.md has said 3.10, 3.11 and 3.12 for v2-alpha-tpuv6e in
# different revisions, and the vLLM TPU guide (docs.vllm.ai/projects/tpu, installation) makes
# its own `uv venv --python 3.12`. So the install step never uses the image's python3 for
# kd_jax: it brings its own interpreter (launch/worker_setup.sh).
#
# Flags (--flag=value or --flag value):
#   --name NAME           TPU VM name (required)
#   --zone ZONE           e.g. us-central2-b (required)
#   --project PROJECT     default: `gcloud config get-value project`
#   --type TYPE           accelerator type, e.g. v4-8, v4-32, v5litepod-16, v6e-8 (create;
#                         default v4-8)
#   --version VERSION     TPU software version (create; default from --type: see above)
#   --spot                create a Spot slice (preemptible; kd_jax resumes from its workdir)
#   --git URL[@REF]       install from a git URL instead of copying this checkout
#   --config PATH[:ARG]   config file, relative to the repository root (run)
#   --workdir DIR         gs://bucket/path, or an absolute path on a shared file system (run)
#   --dry-run             print the commands instead of running them
#   -- ARGS...            passed on to kd_jax.main, e.g. -- --config.batch_size=1024
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "tpu_pod.sh: error: $*" >&2; exit 2; }

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
NAME="" ZONE="" PROJECT="" TYPE="v4-8" VERSION="" SPOT=0 GIT_URL=""
CONFIG="" WORKDIR="" DRY_RUN=0
STEPS=() EXTRA=()
# shellcheck disable=SC2016  # expanded on the worker, not here
REMOTE_DIR='$HOME/kd_jax' VENV='$HOME/kd_jax_venv' SETUP='$HOME/kd_jax_worker_setup.sh'

while [[ $# -gt 0 ]]; do
  arg="$1"
  case "$arg" in
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift; continue ;;
    --spot) SPOT=1; shift; continue ;;
    --*=*) key="${arg%%=*}"; val="${arg#*=}"; shift ;;
    --*) key="$arg"; [[ $# -ge 2 ]] || die "$key needs a value"; val="$2"; shift 2 ;;
    create|install|run|logs|stop|delete) STEPS+=("$arg"); shift; continue ;;
    all) STEPS+=(create install run); shift; continue ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
  case "$key" in
    --name) NAME="$val" ;;
    --zone) ZONE="$val" ;;
    --project) PROJECT="$val" ;;
    --type|--accelerator-type) TYPE="$val" ;;
    --version|--runtime-version) VERSION="$val" ;;
    --git) GIT_URL="$val" ;;
    --config) CONFIG="$val" ;;
    --workdir) WORKDIR="$val" ;;
    *) die "unknown flag '$key' (see --help)" ;;
  esac
done

# ----- check inputs ---------------------------------------------------------------------------
[[ ${#STEPS[@]} -gt 0 ]] || { usage; die "give a subcommand: create install run logs stop delete all"; }
[[ -n "$NAME" ]] || die "--name is required"
[[ "$NAME" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name='$NAME': lowercase letters, digits, '-'"
[[ -n "$ZONE" ]] || die "--zone is required (e.g. us-central2-b)"
if [[ -z "$PROJECT" ]]; then
  if command -v gcloud >/dev/null; then PROJECT="$(gcloud config get-value project 2>/dev/null || true)"; fi
  [[ -n "$PROJECT" ]] || die "--project is required (no default project in gcloud config)"
fi
if [[ $DRY_RUN -eq 0 ]]; then command -v gcloud >/dev/null || die "gcloud is not installed"; fi
[[ "$TYPE" =~ ^v[0-9a-z]+-[0-9]+$ ]] || die "--type='$TYPE' is not an accelerator type such as v4-32 or v5litepod-16"
if [[ -z "$VERSION" ]]; then  # Google's table, see the header
  case "$TYPE" in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    *) VERSION=tpu-ubuntu2204-base ;;
  esac
fi
for s in "${STEPS[@]}"; do
  if [[ "$s" == run ]]; then
    [[ -n "$CONFIG" ]] || die "run needs --config (e.g. configs/kd_cifar10.py)"
    [[ -n "$WORKDIR" ]] || die "run needs --workdir (gs://bucket/path or a shared mount)"
    [[ "$WORKDIR" == gs://?* || "$WORKDIR" == /* ]] || die "--workdir='$WORKDIR': a gs://bucket/path URL or an absolute path on a file system every worker mounts"
    [[ -f "$REPO_ROOT/${CONFIG%%:*}" ]] || die "--config: no file $REPO_ROOT/${CONFIG%%:*}"
  fi
done

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=(--zone="$ZONE" --project="$PROJECT")

# Prints a command (shell-quoted), then runs it unless --dry-run.
run_cmd() {
  printf '+'; printf ' %q' "$@"; printf '\n'
  [[ $DRY_RUN -eq 1 ]] || "$@"
}
on_workers() {  # on_workers WORKER 'remote command' (printed verbatim: easier to read)
  echo "+ ${GCLOUD[*]} ssh $NAME ${WHERE[*]} --worker=$1 --command='$2'"
  [[ $DRY_RUN -eq 1 ]] || "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" --worker="$1" --command="$2"
}

# ----- subcommands ----------------------------------------------------------------------------
do_create() {
  echo "== create $TYPE slice '$NAME' ($VERSION) in $ZONE, project $PROJECT"
  local extra=()
  [[ $SPOT -eq 1 ]] && extra+=(--spot)
  run_cmd "${GCLOUD[@]}" create "$NAME" "${WHERE[@]}" --accelerator-type="$TYPE" \
    --version="$VERSION" "${extra[@]}"
}

do_install() {
  local stage="${TMPDIR:-/tmp}/kd_jax-launch-$NAME" fetch files=()
  echo "== stage the install files in $stage"
  run_cmd mkdir -p "$stage"
  run_cmd cp "$REPO_ROOT/launch/worker_setup.sh" "$stage/kd_jax_worker_setup.sh"
  files+=("$stage/kd_jax_worker_setup.sh")
  if [[ -n "$GIT_URL" ]]; then
    local url="${GIT_URL%@*}" ref=""
    [[ "$GIT_URL" == *@* && "${GIT_URL##*@}" != *[:/]* ]] && ref="${GIT_URL##*@}"
    echo "== install kd_jax from $url${ref:+ @ $ref} on every worker of '$NAME'"
    fetch="rm -rf $REMOTE_DIR && git clone -q $(printf '%q' "$url") $REMOTE_DIR"
    [[ -n "$ref" ]] && fetch+=" && git -C $REMOTE_DIR checkout -q $(printf '%q' "$ref")"
  else
    git -C "$REPO_ROOT" rev-parse HEAD >/dev/null 2>&1 || die "$REPO_ROOT is not a git checkout; use --git=URL"
    if [[ -n "$(git -C "$REPO_ROOT" status --porcelain --untracked-files=no)" ]]; then
      echo "tpu_pod.sh: warning: uncommitted changes are NOT copied (git archive of HEAD)" >&2
    fi
    echo "== copy HEAD of $REPO_ROOT ($(git -C "$REPO_ROOT" rev-parse --short HEAD)) to every worker of '$NAME' and install"
    run_cmd git -C "$REPO_ROOT" archive --format=tar.gz -o "$stage/kd_jax.tar.gz" HEAD
    files+=("$stage/kd_jax.tar.gz")
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf \$HOME/kd_jax.tar.gz -C $REMOTE_DIR"
  fi
  # `NAME:` = each worker's home directory.
  run_cmd "${GCLOUD[@]}" scp "${files[@]}" "$NAME:" "${WHERE[@]}" --worker=all
  # worker_setup.sh: its own Python >= 3.11 in $VENV, then jax[tpu] and kd_jax (see its header).
  on_workers all "$fetch && KD_JAX_VENV=$VENV bash $SETUP install $REMOTE_DIR"
  echo "== installed on worker 0:"
  on_workers 0 "KD_JAX_VENV=$VENV bash $SETUP versions"
}

do_run() {
  local cmd=(-m kd_jax.main "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
  local quoted mk=""; quoted="$(printf '%q ' "${cmd[@]}")"
  # A gs:// workdir goes to kd_jax as is (nothing mounted); a shared path is created first.
  [[ "$WORKDIR" == gs://* ]] || mk="mkdir -p $(printf '%q' "$WORKDIR") && "
  echo "== run on every worker of '$NAME': KD_JAX_DISTRIBUTED=1 $VENV/bin/python ${cmd[*]}"
  echo "   workdir $WORKDIR; log: ~/kd_jax_run.log; stop with: $0 stop --name=$NAME --zone=$ZONE"
  # setsid + nohup: the job keeps running when this ssh session ends; its PID is kept for `stop`.
  on_workers all "test -x $VENV/bin/python || { echo \"\$(hostname): no $VENV/bin/python: run install first\" >&2; exit 1; }; cd $REMOTE_DIR && ${mk}(KD_JAX_DISTRIBUTED=1 setsid nohup $VENV/bin/python $quoted> \$HOME/kd_jax_run.log 2>&1 < /dev/null & echo \$! > \$HOME/kd_jax_run.pid) && echo \"\$(hostname): started PID \$(cat \$HOME/kd_jax_run.pid)\""
  do_logs
}

do_logs() {
  echo "== worker 0 log (Ctrl-C stops streaming; the job keeps running)"
  on_workers 0 "tail -n +1 -F \$HOME/kd_jax_run.log"
}

do_stop() {
  echo "== stop the kd_jax job on every worker of '$NAME' (SIGTERM: it saves a checkpoint first)"
  on_workers all "if [ -f \$HOME/kd_jax_run.pid ]; then kill -TERM -- -\$(cat \$HOME/kd_jax_run.pid) 2>/dev/null || kill -TERM \$(cat \$HOME/kd_jax_run.pid) || true; fi"
}

do_delete() {
  echo "== delete TPU VM '$NAME' in $ZONE (the workdir on gs:// is kept)"
  run_cmd "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
}

mode=""; [[ $DRY_RUN -eq 1 ]] && mode=" (dry run: printing the commands only)"
echo "tpu_pod.sh: ${STEPS[*]} | name=$NAME zone=$ZONE project=$PROJECT type=$TYPE version=$VERSION$mode"
for s in "${STEPS[@]}"; do
  case "$s" in
    create) do_create ;;
    install) do_install ;;
    run) do_run ;;
    logs) do_logs ;;
    stop) do_stop ;;
    delete) do_delete ;;
  esac
done
