"""ResNet-34 → ResNet-18 (CIFAR, 32 px) KD + RKD train step: kd_jax vs PyTorch eager, same CPU.

    python benchmarks/vs_pytorch.py                      # torch, then kd_jax variants
    python benchmarks/vs_pytorch.py --batch=64 --steps=10 --variants=baseline,onednn
    python benchmarks/vs_pytorch.py --variants=baseline --repeats=3   # interleaved, medians

One step: frozen teacher forward (eval-mode BN) + student forward/backward (train-mode BN) +
loss = KD(T=4) + 25·RKD-distance + 50·RKD-angle on the pooled features + SGD (momentum 0.9,
coupled weight decay 5e-4). Both sides use the same batch and architecture (the PyTorch models
are kd_jax.tools.torch_reference's CIFAR ResNets, the reference kd_jax's are checked against).

Every measurement runs in a fresh subprocess (one framework's thread pool never competes with
the other's, and XLA flags only take effect at start-up). Each prints images/s and the share of
the step spent in the teacher forward (timed alone). kd_jax variants:

  baseline   default XLA:CPU flags, float32, state donated (kd_jax's chunked im2col and
             Winograd convolutions on, see kd_jax/models/cpu_conv.py)
  native_conv  XLA's own convolutions everywhere (model.conv = "xla")
  im2col     chunked im2col convolutions everywhere, no Winograd (model.conv = "im2col")
  onednn     --xla_cpu_use_onednn=true (oneDNN convolutions/matmuls, what PyTorch uses)
  xnnpack    --xla_cpu_use_xnnpack=true
  fastmath   --xla_cpu_enable_fast_math=true
  legacy     --xla_cpu_use_thunk_runtime=false (the pre-thunk runtime)
  no_eigen_mt --xla_cpu_multi_thread_eigen=false
  bf16       models in bfloat16 (compute), float32 params and losses
  no_donate  state not donated (shows what donation saves)
  separate   teacher and student in two jitted calls instead of one program

An unknown flag (a different jaxlib) makes its variant fail; it is reported and skipped.
torch is a benchmark-only dependency (`pip install torch`); kd_jax never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "baseline": ({}, {}),
    "native_conv": ({}, {"conv": "xla"}),
    "im2col": ({}, {"conv": "im2col"}),
    "onednn": ({"XLA_FLAGS": "--xla_cpu_use_onednn=true"}, {}),
    "xnnpack": ({"XLA_FLAGS": "--xla_cpu_use_xnnpack=true"}, {}),
    "fastmath": ({"XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}, {}),
    "legacy": ({"XLA_FLAGS": "--xla_cpu_use_thunk_runtime=false"}, {}),
    "no_eigen_mt": ({"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}, {}),
    "bf16": ({}, {"dtype": "bfloat16"}),
    "no_donate": ({}, {"donate": False}),
    "separate": ({}, {"separate": True}),
}
KD_T, W_DIST, W_ANGLE = 4.0, 25.0, 50.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument(
        "--variants",
        default="baseline,native_conv,onednn,bf16,separate",
        help=f"kd_jax variants, comma-separated, of {list(VARIANTS)}",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure everything this many times, interleaved (PyTorch, the variants, "
        "PyTorch, ...); the table gives the median and the range",
    )
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch measurement")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--child_opts", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if args.batch < 3 or args.steps < 1 or args.repeats < 1:
        p.error("--batch must be >= 3 (RKD angles need triplets), --steps and --repeats >= 1")
    return args


def _time(fn, steps):
    for _ in range(2):
        fn()
    t = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t) / steps


# ---------------------------------------------------------------------------------------------
# PyTorch eager
# ---------------------------------------------------------------------------------------------


def torch_child(batch, steps) -> dict:
    import torch
    import torch.nn.functional as F

    from kd_jax.tools.torch_reference import CifarResNet

    torch.manual_seed(0)
    teacher = CifarResNet((3, 4, 6, 3), 10).eval()
    student = CifarResNet((2, 2, 2, 2), 10).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32)

    def pdist(e):  # lenscloth/RKD metric/loss.py
        sq = e.pow(2).sum(1)
        d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2 * e @ e.t()).clamp(min=1e-12).sqrt().clone()
        d[range(len(e)), range(len(e))] = 0
        return d

    def rkd_distance(s, t):
        with torch.no_grad():
            td = pdist(t)
            td = td / td[td > 0].mean()
        sd = pdist(s)
        sd = sd / sd[sd > 0].mean()
        return F.smooth_l1_loss(sd, td)

    def rkd_angle(s, t):
        with torch.no_grad():
            tv = F.normalize(t.unsqueeze(0) - t.unsqueeze(1), p=2, dim=2)
            ta = torch.bmm(tv, tv.transpose(1, 2)).view(-1)
        sv = F.normalize(s.unsqueeze(0) - s.unsqueeze(1), p=2, dim=2)
        sa = torch.bmm(sv, sv.transpose(1, 2)).view(-1)
        return F.smooth_l1_loss(sa, ta)

    def step():
        with torch.no_grad():
            t_logits, t_feat = teacher(x)
        s_logits, s_feat = student(x)
        kd = (
            F.kl_div(
                F.log_softmax(s_logits / KD_T, 1),
                F.softmax(t_logits / KD_T, 1),
                reduction="batchmean",
            )
            * KD_T**2
        )
        loss = kd + W_DIST * rkd_distance(s_feat, t_feat) + W_ANGLE * rkd_angle(s_feat, t_feat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def teacher_only():
        with torch.no_grad():
            teacher(x)

    seconds = _time(step, steps)
    teacher_s = _time(teacher_only, steps)
    return {
        "images_per_s": batch / seconds,
        "step_ms": 1e3 * seconds,
        "teacher_share": teacher_s / seconds,
        "threads": torch.get_num_threads(),
        "version": torch.__version__,
    }


# ---------------------------------------------------------------------------------------------
# kd_jax (jit, one XLA program per step)
# ---------------------------------------------------------------------------------------------


def jax_child(batch, steps, dtype="float32", donate=True, separate=False, conv="auto") -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from kd_jax import losses, models

    dt = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[dtype]
    teacher = models.create_model("resnet34_cifar", 10, dtype=dt, conv=conv)
    student = models.create_model("resnet18_cifar", 10, dtype=dt, conv=conv)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, 32, 32, 3)), jnp.float32)
    t_vars = teacher.init(jax.random.PRNGKey(0), x[:2], train=False)
    s_vars = student.init(jax.random.PRNGKey(1), x[:2], train=False)
    tx = optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9))
    state = {
        "params": s_vars["params"],
        "batch_stats": s_vars["batch_stats"],
        "opt": tx.init(s_vars["params"]),
    }

    def teacher_fwd(t_vars, x):
        logits, feats = teacher.apply(t_vars, x, train=False)
        return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(
            feats["pre_logits"].astype(jnp.float32)
        )

    def student_update(state, t_logits, t_feat, x):
        def loss_fn(params):
            (logits, feats), upd = student.apply(
                {"params": params, "batch_stats": state["batch_stats"]},
                x,
                train=True,
                mutable=["batch_stats"],
            )
            f = feats["pre_logits"].astype(jnp.float32)
            loss = (
                losses.kd_loss(logits, t_logits, temperature=KD_T)
                + W_DIST * losses.rkd_distance_loss(f, t_feat)
                + W_ANGLE * losses.rkd_angle_loss(f, t_feat)
            )
            return loss, upd["batch_stats"]

        (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
        updates, opt = tx.update(grads, state["opt"], state["params"])
        return {
            "params": optax.apply_updates(state["params"], updates),
            "batch_stats": stats,
            "opt": opt,
        }, loss

    donate_args = (0,) if donate else ()
    if separate:
        t_jit = jax.jit(teacher_fwd)
        s_jit = jax.jit(student_update, donate_argnums=donate_args)

        def step(state, t_vars, x):
            t_logits, t_feat = t_jit(t_vars, x)
            return s_jit(state, t_logits, t_feat, x)
    else:
        step = jax.jit(
            lambda state, t_vars, x: student_update(state, *teacher_fwd(t_vars, x), x),
            donate_argnums=donate_args,
        )
    holder = {"state": state}

    def run():
        holder["state"], loss = step(holder["state"], t_vars, x)
        loss.block_until_ready()

    t = time.perf_counter()
    run()
    compile_s = time.perf_counter() - t
    seconds = _time(run, steps)
    t_jit = jax.jit(teacher_fwd)
    teacher_s = _time(lambda: jax.block_until_ready(t_jit(t_vars, x)), steps)
    return {
        "images_per_s": batch / seconds,
        "step_ms": 1e3 * seconds,
        "teacher_share": teacher_s / seconds,
        "compile_s": compile_s,
        "version": jax.__version__,
        "loss_finite": bool(np.isfinite(float(step(holder["state"], t_vars, x)[1]))),
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def measure(kind, args, env_extra=None, opts=None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    for key, value in (env_extra or {}).items():
        env[key] = (env.get(key, "") + " " + value).strip() if key == "XLA_FLAGS" else value
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f"--child={kind}",
        f"--child_opts={json.dumps(opts or {})}",
        f"--batch={args.batch}",
        f"--steps={args.steps}",
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        tail = [line for line in (proc.stderr or "").strip().splitlines() if line.strip()][-1:] or [
            "?"
        ]
        return {"error": f"exit {proc.returncode}: {tail[0][:200]}"}
    return json.loads(lines[-1][len("RESULT ") :])


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        opts = json.loads(args.child_opts)
        r = (
            torch_child(args.batch, args.steps)
            if args.child == "torch"
            else jax_child(args.batch, args.steps, **opts)
        )
        print("RESULT " + json.dumps(r), flush=True)
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(
        f"ResNet-34 → ResNet-18 KD+RKD step, batch {args.batch}, {args.steps} timed steps, "
        f"{os.cpu_count()} CPU cores, load average {load:.1f}; measuring: "
        f"{'' if args.no_torch else 'pytorch, '}kd_jax {args.variants}",
        flush=True,
    )
    runs = {}  # name -> one result per repeat
    for rep in range(args.repeats):
        todo = ([] if args.no_torch else [("pytorch eager", "torch", None, None)]) + [
            (f"kd_jax {v}", "jax", *VARIANTS[v]) for v in args.variants
        ]
        for name, kind, env_extra, opts in todo:
            r = measure(kind, args, env_extra, opts)
            runs.setdefault(name, []).append(r)
            print(f"  [{rep + 1}/{args.repeats}] {name}: {r}", flush=True)
    results = {}
    for name, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            results[name] = rs[-1]
            continue
        ips = sorted(r["images_per_s"] for r in ok)
        median = ok[[r["images_per_s"] for r in ok].index(ips[(len(ips) - 1) // 2])]
        results[name] = dict(median, range=(ips[0], ips[-1]), runs=len(ok))
    torch_ips = results.get("pytorch eager", {}).get("images_per_s")
    print(
        f"\n| implementation | images/s{' (median, range)' if args.repeats > 1 else ''} | "
        f"step (ms) | teacher fwd share | kd_jax / PyTorch |\n|---|---|---|---|---|"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['images_per_s'] / torch_ips:.2f}×" if torch_ips and "kd_jax" in name else ""
        spread = f" ({r['range'][0]:.1f}–{r['range'][1]:.1f})" if r["runs"] > 1 else ""
        print(
            f"| {name} | {r['images_per_s']:.1f}{spread} | {r['step_ms']:.0f} | "
            f"{100 * r['teacher_share']:.0f} % | {ratio} |"
        )
    print(
        f"\nload average at the end: {os.getloadavg()[0]:.1f} (numbers on a shared machine are "
        f"disturbed; rerun on an idle one)"
    )


if __name__ == "__main__":
    main()
