"""Images/s of each method's train step, XLA FLOPs, and the fraction of the machine's matmul peak.

    python benchmarks/step_throughput.py                          # every pair, every method
    python benchmarks/step_throughput.py --pairs=lenet,r34_r18 --methods=kd --steps=5

One step = what `kd_jax.train` runs: teacher forward + student forward/backward + the method's
losses + the optimizer update, jitted over a 1-D mesh of all devices with the state donated.
Pairs: LeNet-5 → LeNet-5-half (32 px, 1 channel), ResNet-34 → ResNet-18 CIFAR (32 px),
ResNet-50 → ResNet-18 ImageNet (224 px, small batch), DeepLabV3-ResNet50 → DeepLabV3-MobileNetV2
(256 px, 13 classes, per-pixel losses; DFAD's NYUv2 protocol). Methods: every KD method
`kd_jax.methods.get_method` can build (kd, odsd, eikd, sckd) and the generator baselines
(dafl, dfad, deepinv: `method = generator` with that preset, its full-size generator; one step
= g_steps generator updates + s_steps student updates, so images/s counts one batch per step
while DFAD's step trains the student on 5 batches); one that cannot be built or stepped on
synthetic data is skipped with the reason printed (deepinv needs a BatchNorm teacher: not lenet).

FLOPs per step come from XLA's cost analysis of the step compiled with XLA's own convolutions
(`model.conv = "xla"`, benchmarks/xla_cost.py, shared with offline_cost.py); the peak is measured here by
timing a large `jnp.dot` in the step's dtype, so "% peak" = achieved FLOP/s / measured matmul
FLOP/s. Runs unchanged on CPU, GPU and TPU (sizes of the peak matmul adapt to the backend).
The teacher has random weights (speed does not depend on them) and no checkpoint is read.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import xla_cost  # noqa: E402  (the FLOPs counting shared with offline_cost.py)

# name: (teacher, student, image size, channels, classes, config dataset, batch on CPU, on accel)
PAIRS = {
    "lenet": ("lenet5", "lenet5_half", 32, 1, 10, "mnist", 256, 1024),
    "r34_r18": ("resnet34_cifar", "resnet18_cifar", 32, 3, 10, "cifar10", 64, 256),
    "r50_r18_224": ("resnet50", "resnet18", 224, 3, 1000, "cifar10", 8, 64),
    # DFAD's NYUv2 pair (13 classes, 256 px), per-pixel; methods with a configs/<m>_segmnist.py
    "dlv3_r50_mbv2_256": (
        "deeplabv3_resnet50",
        "deeplabv3_mobilenetv2",
        256,
        3,
        13,
        "segmnist",
        2,
        16,
    ),  # fmt: skip
}
METHODS = ("kd", "odsd", "eikd", "sckd", "dafl", "dfad", "deepinv")
# generator presets -> their config file per dataset (the full settings, not the smoke ones)
GENERATOR_CONFIGS = {
    "mnist": {"dafl": "dafl_mnist.py", "dfad": "dfad_mnist.py", "deepinv": "dfad_mnist.py:deepinv"},
    "cifar10": {p: f"generator_cifar10.py:{p}" for p in ("dafl", "dfad", "deepinv")},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated of {list(PAIRS)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated method names")
    p.add_argument("--batch", type=int, default=0, help="global batch (default: per pair)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = p.parse_args(argv)
    args.pairs = [s for s in args.pairs.split(",") if s]
    args.methods = [s for s in args.methods.split(",") if s]
    bad = [s for s in args.pairs if s not in PAIRS]
    if bad:
        p.error(f"unknown pair(s) {bad}; choose from {list(PAIRS)}")
    if args.steps < 1 or args.batch < 0:
        p.error("--steps must be >= 1 and --batch >= 0")
    return args


def matmul_peak(dtype) -> float:
    """FLOP/s of a large square matmul, best of a few runs (the machine's practical peak)."""
    import jax
    import jax.numpy as jnp

    n = 2048 if jax.default_backend() == "cpu" else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), dtype)
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=dtype))
    f(a, b).block_until_ready()
    best = float("inf")
    for _ in range(5 if jax.default_backend() == "cpu" else 20):
        t = time.perf_counter()
        f(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n**3 / best


def build_method(name: str, pair: str, batch: int, dtype: str, mesh, conv: str = "auto"):
    """`train.build` of the method for `pair`, handed a random teacher (no checkpoint read);
    `conv` is `config.model.conv` (the convolution algorithm of both models)."""
    from kd_jax import config_utils

    teacher, student, size, channels, classes, dataset, _, _ = PAIRS[pair]
    if name in GENERATOR_CONFIGS.get(dataset, {}):
        file, _, arg = GENERATOR_CONFIGS[dataset][name].partition(":")
        c = config_utils.load_config(os.path.join(ROOT, "configs", file), arg or None)
    else:
        path = os.path.join(ROOT, "configs", f"{name}_{dataset}.py")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no config file configs/{name}_{dataset}.py")
        try:
            c = config_utils.load_config(path, "smoke")
        except ValueError:  # the file takes no `smoke` argument
            c = config_utils.load_config(path)
    c.model.name, c.teacher.model = student, teacher
    c.num_classes = classes
    c.data.image_size, c.data.channels = size, channels
    if size >= 224:
        c.data.normalization = "imagenet"
    c.batch_size = c.eval_batch_size = batch
    c.dtype = dtype
    c.model.conv = conv
    c.num_steps = 1000  # the schedule's length (the lr does not change the step's cost)
    return xla_cost.build(c, mesh), c


def bench_one(name, pair, batch, steps, dtype, mesh) -> dict:
    import jax

    built, c = build_method(name, pair, batch, dtype, mesh)
    method, state = built.method, built.state
    gbatch, key = xla_cost.step_inputs(built, c, mesh)
    t = time.perf_counter()
    compiled = built.train_step.lower(state, method.teacher_vars, gbatch, key).compile()
    compile_s = time.perf_counter() - t
    # FLOPs of the same step with XLA's own convolutions (xla_cost: loop bodies count once)
    flops = xla_cost.step_cost(c, mesh)["flops"]
    for _ in range(2):  # warm-up
        state, metrics = compiled(state, method.teacher_vars, gbatch, key)
    jax.block_until_ready(metrics)
    t = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, method.teacher_vars, gbatch, key)
    jax.block_until_ready((state, metrics))
    seconds = (time.perf_counter() - t) / steps
    return {
        "images_per_s": batch / seconds,
        "step_ms": 1e3 * seconds,
        "flops": flops,
        "compile_s": compile_s,
    }


def main(argv=None):
    args = parse_args(argv)
    import jax
    import jax.numpy as jnp

    from kd_jax import parallel

    mesh = parallel.make_mesh()
    accel = jax.default_backend() != "cpu"
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    devices = f"{jax.device_count()}× {jax.devices()[0].device_kind}"
    print(
        f"step throughput: backend {jax.default_backend()} ({devices}), dtype {args.dtype}, "
        f"pairs {args.pairs}, methods {args.methods}, {args.steps} timed steps",
        flush=True,
    )
    # XLA's cost analysis counts the per-device SPMD program: both sides scale by the devices.
    peak = matmul_peak(dtype) * jax.device_count()
    print(
        f"measured matmul peak: {peak / 1e9:.1f} GFLOP/s (one device × {jax.device_count()}, "
        f"{args.dtype})",
        flush=True,
    )
    rows, notes = [], []
    for pair in args.pairs:
        batch = args.batch or PAIRS[pair][7 if accel else 6]
        batch = max(jax.device_count(), batch // jax.device_count() * jax.device_count())
        for name in args.methods:
            try:
                r = bench_one(name, pair, batch, args.steps, args.dtype, mesh)
            except Exception as e:  # a method not written yet, or one needing real data
                notes.append(
                    f"{name} on {pair}: skipped ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:160] if str(e) else ''})"
                )
                if os.environ.get("KD_JAX_BENCH_DEBUG"):
                    traceback.print_exc()
                print("  " + notes[-1], flush=True)
                continue
            achieved = (
                r["flops"] * jax.device_count() * r["images_per_s"] / batch if r["flops"] else None
            )
            rows.append((pair, name, batch, r, achieved))
            print(f"  {pair} {name}: {r['images_per_s']:.1f} img/s", flush=True)
    print(
        "\n| pair | method | batch | images/s | step (ms) | GFLOP/step (XLA) | achieved "
        "GFLOP/s | % of matmul peak | compile (s) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for pair, name, batch, r, achieved in rows:
        gf = f"{r['flops'] * jax.device_count() / 1e9:.2f}" if r["flops"] else "n/a"
        ach = f"{achieved / 1e9:.1f}" if achieved else "n/a"
        pct = f"{100 * achieved / peak:.1f}" if achieved else "n/a"
        print(
            f"| {pair} | {name} | {batch} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
            f"{gf} | {ach} | {pct} | {r['compile_s']:.1f} |"
        )
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
