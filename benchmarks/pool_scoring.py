"""Streamed pool scoring: peak memory vs pool size, throughput, and resume after a kill.

    python benchmarks/pool_scoring.py                       # pools of 10k and 100k images
    python benchmarks/pool_scoring.py --sizes=10000,1000000 --teacher_workdir=/tmp/kd/teacher_mnist

For each pool size it writes a synthetic pool of 28×28 grey images as TFRecord shards in the
kd_jax shard format (`kd_jax.data.shards`: same file names, same `tf.train.Example` records;
a bank of 1,000 distinct PNGs is encoded once and reused under fresh ids, because encoding
100k PNGs eagerly would dominate the run), then runs `kd_jax.pool.score_pool` with a LeNet-5
teacher in a *fresh* subprocess and prints that process's peak RSS (`resource.getrusage`
ru_maxrss) and images/s. A streamed pass keeps memory independent of the pool size: the peak
RSS of the two pools should differ by < 10 %.

Then it kills a scoring pass of the largest pool mid-way (SIGKILL, as a preempted VM would) and
runs it again: the shards finished before the kill keep their files (same inode, not rescored)
and only the rest are scored.

Without `--teacher_workdir` the teacher is a randomly initialised LeNet-5 (memory and speed do
not depend on the weights). Takes ~2 min on an idle 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="10000,100000", help="comma-separated pool sizes")
    p.add_argument("--shard_size", type=int, default=5000, help="images per TFRecord shard")
    p.add_argument("--batch_size", type=int, default=512)
    p.add_argument(
        "--heap_size",
        type=int,
        default=64,
        help="per-class candidates kept with features (ODSD); 0 = scalars only",
    )
    p.add_argument(
        "--teacher_workdir",
        default="",
        help="a finished LeNet-5 teacher run; default: random LeNet-5 weights",
    )
    p.add_argument("--dir", default="", help="where pools and scores go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the pools and scores")
    p.add_argument("--no_resume_demo", action="store_true")
    # Internal: the scoring child.
    p.add_argument("--child_pattern", default="", help=argparse.SUPPRESS)
    p.add_argument("--child_out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    try:
        args.sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        p.error(f"--sizes={args.sizes!r} must be comma-separated integers")
    if not args.sizes or min(args.sizes) < 1 or args.shard_size < 1 or args.batch_size < 1:
        p.error("--sizes, --shard_size and --batch_size must be positive")
    if args.teacher_workdir and not os.path.exists(
        os.path.join(args.teacher_workdir, "results.json")
    ):
        p.error(f"--teacher_workdir={args.teacher_workdir!r} holds no finished run")
    return args


# ---------------------------------------------------------------------------------------------
# Synthetic pools
# ---------------------------------------------------------------------------------------------


def write_pool(out_dir: str, size: int, shard_size: int, seed: int = 0) -> str:
    """Writes `size` records in ceil(size / shard_size) shards; returns the file pattern."""
    import numpy as np
    import tensorflow as tf

    from kd_jax.data import shards

    pattern = shards.shard_pattern(out_dir)
    num_shards = -(-size // shard_size)
    if len(tf.io.gfile.glob(pattern)) == num_shards:
        return pattern  # already written (--dir reused)
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    # Blobs on noise: images that decode like real digits-sized PNGs (not all-zero).
    bank = []
    yy, xx = np.mgrid[:28, :28]
    for _ in range(1000):
        cy, cx, r = rng.uniform(6, 22), rng.uniform(6, 22), rng.uniform(3, 9)
        img = 200.0 * ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r) + rng.normal(0, 20, (28, 28))
        bank.append(shards.encode_image(np.clip(img, 0, 255).astype(np.uint8)[..., None]))
    tags = (b"blob", b"noise")
    for s in range(num_shards):
        final = os.path.join(out_dir, shards.shard_name("pool", s, num_shards))
        with tf.io.TFRecordWriter(final + ".partial") as writer:
            for i in range(s * shard_size, min(size, (s + 1) * shard_size)):
                writer.write(shards.make_example(bank[i % len(bank)], i, -1, tags[i % 2]))
        os.replace(final + ".partial", final)
    return pattern


# ---------------------------------------------------------------------------------------------
# The scoring child (a fresh process per pool, so ru_maxrss is this pass alone)
# ---------------------------------------------------------------------------------------------


def child(args) -> None:
    import resource

    import jax
    import ml_collections
    import numpy as np

    from kd_jax import checkpoint, models, pool
    from kd_jax.data import pipeline

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB

    teacher = models.create_model("lenet5", 10)
    if args.teacher_workdir:
        v = checkpoint.load_variables(args.teacher_workdir)
        variables = {
            "params": v["params"]["model"],
            "batch_stats": v["batch_stats"].get("model", {}),
        }
    else:
        variables = jax.device_get(
            teacher.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 1), np.float32))
        )
    domain = pipeline.Domain(image_size=32, channels=1, normalization="mnist")
    spec = ml_collections.ConfigDict({"source": "shards", "pattern": args.child_pattern})
    before = rss_mb()
    t = time.time()
    scores = pool.score_pool(
        args.child_out,
        spec,
        teacher_model=teacher,
        teacher_vars=variables,
        domain=domain,
        num_classes=10,
        batch_size=args.batch_size,
        heap_size=args.heap_size,
    )
    seconds = time.time() - t
    # Steady-state rate, compile excluded: items of shards 2..n over the time between the
    # first and the last shard result file (each is written when its shard is done).
    out_dir = os.path.join(args.child_out, "pool_scores")
    done = sorted(
        (os.stat(os.path.join(out_dir, f)).st_mtime, f)
        for f in os.listdir(out_dir)
        if f.endswith(".tfrecord.npz")
    )
    steady = None
    if len(done) > 1:
        later = sum(len(np.load(os.path.join(out_dir, f))["ids"]) for _, f in done[1:])
        steady = later / max(done[-1][0] - done[0][0], 1e-9)
    print(
        "RESULT "
        + json.dumps(
            {
                "steady_images_per_s": steady,
                "items": int(len(scores.ids)),
                "seconds": seconds,
                "rss_before_mb": before,
                "peak_rss_mb": rss_mb(),
                "candidates": int(len(scores.cand_ids)),
                "backend": jax.default_backend(),
                "devices": jax.local_device_count(),
            }
        ),
        flush=True,
    )


def run_child(args, pattern: str, out: str, timeout: float = 3600) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child_pattern={pattern}",
        f"--child_out={out}",
        f"--batch_size={args.batch_size}",
        f"--heap_size={args.heap_size}",
        f"--teacher_workdir={args.teacher_workdir}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"scoring child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def resume_demo(args, pattern: str, out: str) -> None:
    """Kills a scoring pass after some shards are done, reruns it, and checks what was redone."""
    from kd_jax.data import shards

    files = shards.list_shard_files(pattern)
    score_dir = os.path.join(out, "pool_scores")
    target = max(1, len(files) // 3)
    print(f"\nresume: scoring {len(files)} shards, SIGKILL once {target} are done ...", flush=True)
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child_pattern={pattern}",
        f"--child_out={out}",
        f"--batch_size={args.batch_size}",
        f"--heap_size={args.heap_size}",
        f"--teacher_workdir={args.teacher_workdir}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = []
    try:
        deadline = time.time() + 3600
        while proc.poll() is None and time.time() < deadline:
            done = (
                [f for f in os.listdir(score_dir) if f.endswith(".tfrecord.npz")]
                if os.path.isdir(score_dir)
                else []
            )
            if len(done) >= target:
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = {
        f: os.stat(os.path.join(score_dir, f)).st_ino
        for f in os.listdir(score_dir)
        if f.endswith(".tfrecord.npz")
    }
    if len(before) == len(files):
        print(
            "resume: the pass finished before the kill (machine too fast for this pool); "
            "use a larger --sizes entry to see a partial pass"
        )
        return
    print(f"resume: killed with {len(before)}/{len(files)} shards scored; running again ...")
    r = run_child(args, pattern, out)
    after = {
        f: os.stat(os.path.join(score_dir, f)).st_ino
        for f in os.listdir(score_dir)
        if f.endswith(".tfrecord.npz")
    }
    kept = sum(after.get(f) == ino for f, ino in before.items())
    new = len(set(after) - set(before))
    print(
        f"resume: {kept}/{len(before)} finished shards kept untouched, {new} scored on the "
        f"rerun, {r['items']} items merged in {r['seconds']:.1f}s "
        f"({'OK' if kept == len(before) and len(after) == len(files) else 'UNEXPECTED'})"
    )


def main(argv=None):
    args = parse_args(argv)
    if args.child_pattern:
        return child(args)
    root = args.dir or tempfile.mkdtemp(prefix="kd_pool_bench_")
    print(
        f"pool scoring benchmark: pools {args.sizes} ({args.shard_size} images/shard) in "
        f"{root}; teacher LeNet-5 ({args.teacher_workdir or 'random init'}); batch "
        f"{args.batch_size}; heap {args.heap_size}/class",
        flush=True,
    )
    try:
        rows = []
        for size in args.sizes:
            t = time.time()
            pattern = write_pool(os.path.join(root, f"pool{size}"), size, args.shard_size)
            print(f"  wrote pool of {size} in {time.time() - t:.0f}s; scoring ...", flush=True)
            out = os.path.join(root, f"scores{size}")
            shutil.rmtree(out, ignore_errors=True)
            rows.append((size, run_child(args, pattern, out)))
        print(
            "\n| pool images | shards | peak RSS (MB) | RSS before scoring (MB) | images/s "
            "(whole pass) | images/s (after shard 1) | backend |\n|---|---|---|---|---|---|---|"
        )
        for size, r in rows:
            steady = f"{r['steady_images_per_s']:.0f}" if r["steady_images_per_s"] else "—"
            print(
                f"| {size:,} | {-(-size // args.shard_size)} | {r['peak_rss_mb']:.0f} | "
                f"{r['rss_before_mb']:.0f} | {r['items'] / r['seconds']:.0f} | {steady} | "
                f"{r['backend']} ×{r['devices']} |"
            )
        peaks = [r["peak_rss_mb"] for _, r in rows]
        print(
            f"\npeak RSS spread: {100 * (max(peaks) - min(peaks)) / min(peaks):.1f} % "
            f"(goal < 10 %) over pools {min(args.sizes):,} .. {max(args.sizes):,}"
        )
        if not args.no_resume_demo:
            big = max(args.sizes)
            out = os.path.join(root, "resume")
            shutil.rmtree(out, ignore_errors=True)
            resume_demo(args, os.path.join(root, f"pool{big}", "pool-*-of-*.tfrecord"), out)
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
