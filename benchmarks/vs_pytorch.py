"""kd_jax's train step vs a straightforward PyTorch eager version of it, same CPU, side by side.

Two workloads (`--workload`):

* `kd_rkd` (default): ResNet-34 → ResNet-18 (CIFAR, 32 px) KD + RKD step.
* `dafl`: the generator method's DAFL step at configs/dafl_mnist.py's sizes (LeNet-5 →
  LeNet-5-half, 32×32×1, batch 128, latent 100, ngf 16), issue 22's comparison.

    python benchmarks/vs_pytorch.py                      # kd_rkd: torch, then kd_jax variants
    python benchmarks/vs_pytorch.py --batch=64 --steps=10 --variants=baseline,onednn
    python benchmarks/vs_pytorch.py --variants=baseline --repeats=3   # interleaved, medians
    python benchmarks/vs_pytorch.py --workload dafl --repeats 3 --torch_subpixel  # DAFL

Results (tables, the machine, its load) belong in the README / benchmarks/results/, not here.

kd_rkd step: frozen teacher forward (eval-mode BN) + student forward/backward (train-mode BN) +
loss = KD(T=4) + 25·RKD-distance + 50·RKD-angle on the pooled features + SGD (momentum 0.9,
coupled weight decay 5e-4). Both sides use the same batch and architecture (the PyTorch models
are kd_jax.tools.torch_reference's CIFAR ResNets, the reference kd_jax's are checked against).

dafl step: kd_jax's side is the library's own compiled step (`method = generator`, preset dafl,
built from configs/dafl_mnist.py by benchmarks/step_throughput.py's `build_method`, jitted by
`train.build` with the state donated, on a one-device mesh; random teacher weights). PyTorch's
side is DAFL-train.py's step written out in eager float32 with the settings read from the same
config: a DCGAN generator (below, the shape of kd_jax.models.generator's), the frozen LeNet-5
teacher (eval, no parameter gradients) and the LeNet-5-half student of
kd_jax.tools.torch_reference; g_steps generator updates, each z → G(z) → teacher (logits, the
ReLU'd 120-d conv3 features) → w_oh·CE(logits, argmax) − w_a·mean|features| − w_ie·H(mean
softmax) → Adam on G; then s_steps student updates, each on a fresh G(z) (G in train mode, no
gradient into G) with KD at the config's temperature → Adam(W) on the student, cosine lr. The
config's g_steps / s_steps are mirrored. images/s counts the generated images the student
trains on (batch × s_steps per step). Differences in work between the two, for a fair reading:
kd_jax's step also computes a few diagnostics (the generator's and the student's global
gradient norms, teacher–student agreement, the teacher's class histogram of the batch as a
balance score: O(batch) work) and the step counter / rng folding; the timed kd_jax steps reuse one
latent batch drawn on the host beforehand (training draws it on the host, outside the step),
while PyTorch draws z with torch.randn inside its step, as DAFL does; PyTorch's no-grad G(z) of
the student update updates G's running BatchNorm statistics, kd_jax's discards them. DAFL-train.py
itself trains G and the student on one generated batch per iteration (one G and one teacher
forward fewer); both sides here do kd_jax's fresh-batch student update instead. kd_jax computes
the generator's two "upsample x2 -> conv3x3" pairs in their sub-pixel form (one 2x2 conv of the
low-res map, 2.25x fewer multiplies, the same function: kd_jax.models.generator);
`--torch_subpixel` also times PyTorch with that form (checked against DAFL's layers in float64
in the child), so the table separates the algorithm from the framework.

Every measurement runs in a fresh subprocess (one framework's thread pool never competes with
the other's, and XLA flags only take effect at start-up); kd_jax children run on one CPU device
(a `--xla_force_host_platform_device_count` in XLA_FLAGS is dropped). Each prints images/s, ms
per step and, for kd_rkd, the share of the step spent in the teacher forward (timed alone); the
header names the CPU model, the footer the thread counts. kd_jax variants (all but `separate`
apply to dafl too):

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
  separate   teacher and student in two jitted calls instead of one program (kd_rkd only)

An unknown flag (a different jaxlib) makes its variant fail; it is reported and skipped.
torch is a benchmark-only dependency (`pip install torch`); kd_jax never imports it.
"""

from __future__ import annotations

import argparse
import json
import math
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
WORKLOADS = ("kd_rkd", "dafl")
DAFL_CONFIG = os.path.join(ROOT, "configs", "dafl_mnist.py")
# per workload: batch (0: the config's), timed steps, default variants
DEFAULTS = {
    "kd_rkd": (64, 5, "baseline,native_conv,onednn,bf16,separate"),
    "dafl": (0, 20, "baseline"),
}
KD_RKD_ONLY = ("separate",)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workload", default="kd_rkd", choices=WORKLOADS)
    p.add_argument(
        "--batch", type=int, default=0, help="batch (default: kd_rkd 64, dafl the config's 128)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=0,
        help="timed steps after 2 warm-up steps (default: kd_rkd 5, dafl 20)",
    )
    p.add_argument(
        "--variants",
        default="",
        help=f"kd_jax variants, comma-separated, of {list(VARIANTS)} (default: kd_rkd "
        f"{DEFAULTS['kd_rkd'][2]}; dafl {DEFAULTS['dafl'][2]})",
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="measure everything this many times, interleaved (PyTorch, the variants, "
        "PyTorch, ...); the table gives the median and the range",
    )
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch measurement")
    p.add_argument(
        "--torch_subpixel",
        action="store_true",
        help="dafl: also time PyTorch with kd_jax's sub-pixel up+conv in the generator",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)
    p.add_argument("--child_opts", default="{}", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    batch, steps, variants = DEFAULTS[args.workload]
    args.batch = args.batch or batch
    args.steps = args.steps or steps
    args.variants = [v for v in (args.variants or variants).split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    if args.workload != "kd_rkd" and set(args.variants) & set(KD_RKD_ONLY):
        p.error(f"variant(s) {list(KD_RKD_ONLY)} apply to --workload kd_rkd only")
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    if args.workload == "kd_rkd" and args.batch < 3:
        p.error("--batch must be >= 3 (RKD angles need triplets)")
    if args.torch_subpixel and (args.workload != "dafl" or args.no_torch):
        p.error("--torch_subpixel needs --workload dafl and the PyTorch measurement")
    if args.workload == "dafl" and args.batch and args.batch < 2:
        p.error("--batch must be >= 2 (the generator's BatchNorm uses batch statistics)")
    return args


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "cpu model", "hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


def os_threads() -> int | None:
    """Threads of this process now (/proc/self/status), after its runs: every pool started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Threads:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def usable_cores() -> int:
    """CPUs this process may run on: XLA:CPU's intra-op pool size (its default)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


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
        "interop_threads": torch.get_num_interop_threads(),
        "os_threads": os_threads(),
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
        "devices": f"{jax.device_count()}× {jax.devices()[0].device_kind}",
        "xla_threads": usable_cores(),
        "os_threads": os_threads(),
        "loss_finite": bool(np.isfinite(float(step(holder["state"], t_vars, x)[1]))),
    }


# ---------------------------------------------------------------------------------------------
# DAFL: the generator method's step (configs/dafl_mnist.py) vs DAFL-train.py's step in PyTorch
# ---------------------------------------------------------------------------------------------


def dafl_settings() -> dict:
    """What the PyTorch DAFL step needs from configs/dafl_mnist.py (read in the parent: the
    torch child does not import jax)."""
    from kd_jax import config_utils

    c = config_utils.load_config(DAFL_CONFIG)
    g = c.generator
    if (c.teacher.model, c.model.name) != ("lenet5", "lenet5_half"):
        raise ValueError(f"{DAFL_CONFIG}: the PyTorch side has LeNet-5 → LeNet-5-half only")
    if g.activation_feature != "stage3" or g.model != "dcgan" or g.student_loss != "kd":
        raise ValueError(f"{DAFL_CONFIG}: the PyTorch side has DAFL's terms only ({g})")
    if g.weights.adversarial or g.weights.bn:
        raise ValueError(f"{DAFL_CONFIG}: adversarial / bn terms are not in DAFL's step")
    for name, opt in (("optimizer", c.optimizer), ("generator.optimizer", g.optimizer)):
        if opt.name != "adamw" or opt.get("grad_clip", 0.0) or opt.get("warmup_steps", 0):
            raise ValueError(f"{DAFL_CONFIG}: config.{name} is not plain Adam(W) ({opt})")
        if opt.schedule not in ("cosine", "constant"):
            raise ValueError(f"{DAFL_CONFIG}: config.{name}.schedule={opt.schedule!r}")
    adam = lambda o: {
        "lr": float(o.lr),
        "weight_decay": float(o.weight_decay),
        "schedule": o.schedule,
        "end_lr": float(o.get("end_lr", 0.0)),
    }
    return {
        "batch": int(c.batch_size),
        "image_size": int(c.data.image_size),
        "channels": int(c.data.channels),
        "num_classes": int(c.num_classes),
        "latent_dim": int(g.latent_dim),
        "ngf": int(g.ngf),
        "g_steps": int(g.g_steps),
        "s_steps": int(g.s_steps),
        "weights": {k: float(g.weights[k]) for k in ("one_hot", "activation", "entropy")},
        "temperature": float(c.kd.temperature),
        "num_steps": int(c.num_steps),
        "student_opt": adam(c.optimizer),
        "generator_opt": adam(g.optimizer),
        "dtype": str(c.dtype),
    }


def torch_dafl_child(batch, steps, settings, subpixel=False) -> dict:
    import torch
    import torch.nn as tnn
    import torch.nn.functional as F

    from kd_jax.models.generator import SUBPIXEL_TAPS
    from kd_jax.tools.torch_reference import LeNet5

    taps = torch.from_numpy(SUBPIXEL_TAPS)

    def upsample_conv(x, conv):
        """conv(interpolate(x, 2)) as kd_jax computes it (kd_jax.models.generator's
        `upsample2_conv3x3`): one 2x2 conv of the low-res map whose 4·C_out channels are the
        output phases (p, q); phase (p, q) at (i, j) lies at (i + p, j + q)."""
        b, _, h, w = x.shape
        o = conv.out_channels
        t = taps.to(conv.weight.dtype)
        k = torch.einsum("pak,qbl,ockl->pqocab", t, t, conv.weight)
        y = F.conv2d(x, k.reshape(4 * o, -1, 2, 2), padding=1).view(b, 2, 2, o, h + 1, w + 1)
        rows = [
            torch.stack([y[:, p, q, :, p : p + h, q : q + w] for q in (0, 1)], dim=-1)
            for p in (0, 1)
        ]
        out = torch.stack(rows, dim=3).reshape(b, o, 2 * h, 2 * w)  # [b, o, h, p, w, q]
        return out + conv.bias.view(1, -1, 1, 1)

    st = settings

    class Generator(tnn.Module):
        """DAFL's / DFAD's DCGAN generator, the shape of kd_jax.models.generator's `dcgan`:
        Linear → BN → up×2 → conv3×3 → BN → LeakyReLU(0.2) → up×2 → conv3×3 → BN →
        LeakyReLU(0.2) → conv3×3 → tanh → BN(affine=False); BatchNorm eps 1e-5 (as kd_jax's)."""

        def __init__(self, image_size, channels, latent_dim, ngf):
            super().__init__()
            c, self.s = 2 * ngf, image_size // 4
            self.l1 = tnn.Linear(latent_dim, c * self.s * self.s)
            self.bn0 = tnn.BatchNorm2d(c)
            self.conv1 = tnn.Conv2d(c, c, 3, 1, 1)
            self.bn1 = tnn.BatchNorm2d(c)
            self.conv2 = tnn.Conv2d(c, ngf, 3, 1, 1)
            self.bn2 = tnn.BatchNorm2d(ngf)
            self.conv3 = tnn.Conv2d(ngf, channels, 3, 1, 1)
            self.bn_out = tnn.BatchNorm2d(channels, affine=False)

        def forward(self, z):
            x = self.bn0(self.l1(z).view(z.shape[0], -1, self.s, self.s))
            x = F.leaky_relu(self.bn1(self.up_conv(x, self.conv1)), 0.2)
            x = F.leaky_relu(self.bn2(self.up_conv(x, self.conv2)), 0.2)
            return self.bn_out(torch.tanh(self.conv3(x)))

        @staticmethod
        def up_conv(x, conv):
            if subpixel:
                return upsample_conv(x, conv)
            return conv(F.interpolate(x, scale_factor=2))

    torch.manual_seed(0)
    gen = Generator(st["image_size"], st["channels"], st["latent_dim"], st["ngf"]).train()
    check = {}
    if subpixel:  # the same function as DAFL's layers (float64, away from the timed steps)
        conv = tnn.Conv2d(5, 3, 3, 1, 1).double()
        x = torch.randn(2, 5, 6, 7, dtype=torch.float64)
        with torch.no_grad():
            diff = (upsample_conv(x, conv) - conv(F.interpolate(x, scale_factor=2))).abs().max()
        if not diff < 1e-10:
            raise AssertionError(f"sub-pixel generator differs from DAFL's layers by {diff}")
        check["subpixel_max_diff_float64"] = float(diff)
    teacher = LeNet5(num_classes=st["num_classes"]).eval()
    student = LeNet5((3, 8, 60, 42), st["num_classes"]).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    # DAFL's activation feature is the ReLU'd conv3 output (lenet.py `out_feature=True`);
    # torch_reference's LeNet5 returns fc1's, so conv3's output is tapped and ReLU'd here.
    tap = {}
    teacher.conv3.register_forward_hook(lambda m, i, o: tap.__setitem__("conv3", o))

    def adam(params, o, num_updates):
        cls = torch.optim.AdamW if o["weight_decay"] else torch.optim.Adam
        opt = cls(params, lr=o["lr"], weight_decay=o["weight_decay"])
        sched = None
        if o["schedule"] == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=num_updates, eta_min=o["end_lr"]
            )
        return opt, sched

    opt_g, sched_g = adam(gen.parameters(), st["generator_opt"], st["num_steps"] * st["g_steps"])
    opt_s, sched_s = adam(student.parameters(), st["student_opt"], st["num_steps"] * st["s_steps"])
    w, T, nz = st["weights"], st["temperature"], st["latent_dim"]

    def generator_update():
        z = torch.randn(batch, nz)
        logits, _ = teacher(gen(z))
        features = F.relu(tap["conv3"]).flatten(1)
        loss_oh = F.cross_entropy(logits, logits.detach().argmax(1))
        loss_a = -features.abs().mean()
        p = F.softmax(logits, 1).mean(0)
        loss_ie = (p * torch.log(p)).sum()  # DAFL: log10 with weight 5 = log with 5 / ln 10
        loss = w["one_hot"] * loss_oh + w["activation"] * loss_a + w["entropy"] * loss_ie
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        opt_g.step()
        if sched_g is not None:
            sched_g.step()
        return loss

    def student_update():
        with torch.no_grad():
            images = gen(torch.randn(batch, nz))  # G in train mode, as DAFL's
            t_logits, _ = teacher(images)
        s_logits, _ = student(images)
        loss = (
            F.kl_div(
                F.log_softmax(s_logits / T, 1), F.softmax(t_logits / T, 1), reduction="batchmean"
            )
            * T**2
        )
        opt_s.zero_grad(set_to_none=True)
        loss.backward()
        opt_s.step()
        if sched_s is not None:
            sched_s.step()
        return loss

    losses = []

    def step():
        for _ in range(st["g_steps"]):
            g_loss = generator_update()
        for _ in range(st["s_steps"]):
            s_loss = student_update()
        losses[:] = [float(g_loss), float(s_loss)]

    seconds = _time(step, steps)
    count = lambda m: int(sum(p.numel() for p in m.parameters()))
    return {
        "images_per_s": batch * st["s_steps"] / seconds,
        "step_ms": 1e3 * seconds,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "os_threads": os_threads(),
        "version": torch.__version__,
        "params": {"generator": count(gen), "teacher": count(teacher), "student": count(student)},
        "loss_finite": all(map(math.isfinite, losses)),
        **check,
    }


def jax_dafl_child(batch, steps, dtype="float32", donate=True, conv="auto") -> dict:
    """The library's own DAFL step: `train.build` of configs/dafl_mnist.py (via
    step_throughput.build_method) on a one-device mesh, compiled once, then timed."""
    import jax
    import numpy as np

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import step_throughput
    import xla_cost

    from kd_jax import parallel

    mesh = xla_cost.one_device_mesh()
    built, c = step_throughput.build_method("dafl", "lenet", batch, dtype, mesh, conv=conv)
    method, state = built.method, built.state
    step = built.train_step  # jax.jit(method.train_step, donate_argnums=(0,), ...)
    if not donate:
        rep = parallel.replicated(mesh)
        step = jax.jit(method.train_step, out_shardings=(rep, rep))
    gbatch, key = xla_cost.step_inputs(built, c, mesh)
    teacher_vars = method.teacher_vars
    t = time.perf_counter()
    compiled = step.lower(state, teacher_vars, gbatch, key).compile()
    compile_s = time.perf_counter() - t
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], teacher_vars, gbatch, key)
        holder["metrics"] = jax.block_until_ready(metrics)

    seconds = _time(run, steps)
    m = jax.device_get(holder["metrics"])
    count = lambda tree: int(sum(np.size(x) for x in jax.tree.leaves(tree)))
    params = holder["state"].params
    return {
        "images_per_s": batch * int(c.generator.s_steps) / seconds,
        "step_ms": 1e3 * seconds,
        "compile_s": compile_s,
        "version": jax.__version__,
        "devices": f"{jax.device_count()}× {jax.devices()[0].device_kind}",
        "xla_threads": usable_cores(),
        "os_threads": os_threads(),
        "params": {
            "generator": count(params["generator"]),
            "teacher": count(teacher_vars["params"]),
            "student": count(params["model"]),
        },
        "loss_finite": bool(np.isfinite(float(m["loss"])) and np.isfinite(float(m["g_loss"]))),
        "metrics": sorted(m),
    }


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def measure(kind, args, env_extra=None, opts=None) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    # one CPU device: a forced host device count (the test suite's 8) would split the step
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env["XLA_FLAGS"] = " ".join(flags)
    for key, value in (env_extra or {}).items():
        env[key] = (env.get(key, "") + " " + value).strip() if key == "XLA_FLAGS" else value
    if not env["XLA_FLAGS"]:
        del env["XLA_FLAGS"]
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        f"--workload={args.workload}",
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


def run_child(args):
    opts = json.loads(args.child_opts)
    if args.workload == "dafl":
        if args.child == "torch":
            return torch_dafl_child(args.batch, args.steps, **opts)
        opts.pop("separate", None)  # rejected by parse_args for dafl
        return jax_dafl_child(args.batch, args.steps, **opts)
    if args.child == "torch":
        return torch_child(args.batch, args.steps)
    return jax_child(args.batch, args.steps, **opts)


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(run_child(args)), flush=True)
        return
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    torch_opts = None
    if args.workload == "dafl":
        settings = dafl_settings()
        args.batch = args.batch or settings["batch"]
        torch_opts = {"settings": settings}
        what = (
            f"DAFL generator-method step (configs/dafl_mnist.py: LeNet-5 → LeNet-5-half, "
            f"{settings['image_size']}×{settings['image_size']}×{settings['channels']}, latent "
            f"{settings['latent_dim']}, ngf {settings['ngf']}, g_steps {settings['g_steps']}, "
            f"s_steps {settings['s_steps']})"
        )
    else:
        what = "ResNet-34 → ResNet-18 KD+RKD step"
    print(
        f"{what}, batch {args.batch}, {args.steps} timed steps, CPU {cpu_model()!r}, "
        f"{os.cpu_count()} CPU cores ({usable_cores()} usable), load average {load:.1f}; "
        f"measuring: {'' if args.no_torch else 'pytorch, '}kd_jax {args.variants}",
        flush=True,
    )
    runs = {}  # name -> one result per repeat
    for rep in range(args.repeats):
        todo = [] if args.no_torch else [("pytorch eager", "torch", None, torch_opts)]
        if args.torch_subpixel:
            todo.append(
                ("pytorch eager, sub-pixel G", "torch", None, dict(torch_opts, subpixel=True))
            )
        todo += [(f"kd_jax {v}", "jax", *VARIANTS[v]) for v in args.variants]
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
    dafl = args.workload == "dafl"
    third = "compile (s)" if dafl else "teacher fwd share"
    print(
        f"\n| implementation | images/s{' (median, range)' if args.repeats > 1 else ''} | "
        f"step (ms) | {third} | kd_jax / PyTorch |\n|---|---|---|---|---|"
    )
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['images_per_s'] / torch_ips:.2f}×" if torch_ips and "kd_jax" in name else ""
        spread = f" ({r['range'][0]:.1f}–{r['range'][1]:.1f})" if r["runs"] > 1 else ""
        if dafl:
            col = f"{r['compile_s']:.1f}" if "compile_s" in r else ""
        else:
            col = f"{100 * r['teacher_share']:.0f} %"
        print(
            f"| {name} | {r['images_per_s']:.1f}{spread} | {r['step_ms']:.{1 if dafl else 0}f} | "
            f"{col} | {ratio} |"
        )
    if dafl:
        print(
            "\nimages/s: generated images the student trains on (batch × s_steps per step); "
            "kd_jax / PyTorch > 1: kd_jax faster"
        )
    tr = results.get("pytorch eager", {})
    jx = next((r for n, r in results.items() if "kd_jax" in n and "error" not in r), {})
    threads = []
    if "threads" in tr:
        threads.append(
            f"torch {tr.get('version')}: {tr['threads']} intra-op threads "
            f"(torch.get_num_threads()), {tr.get('interop_threads', '?')} inter-op, "
            f"{tr.get('os_threads', '?')} OS threads in its process"
        )
    if "version" in jx:
        threads.append(
            f"jax {jx['version']}: XLA:CPU intra-op pool = {jx.get('xla_threads', usable_cores())}"
            f" usable cores (its default; 1 under no_eigen_mt), {jx.get('os_threads', '?')} OS "
            f"threads in its process, {jx.get('devices', '1 CPU device')}"
        )
    if threads:
        print("threads: " + "; ".join(threads))
    if dafl and "params" in tr and "params" in jx and tr["params"] != jx["params"]:
        print(f"WARNING: parameter counts differ: pytorch {tr['params']}, kd_jax {jx['params']}")
    print(
        f"\nload average at the end: {os.getloadavg()[0]:.1f} (numbers on a shared machine are "
        f"disturbed; rerun on an idle one)"
    )


if __name__ == "__main__":
    main()
