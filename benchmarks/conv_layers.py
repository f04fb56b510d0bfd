"""Per-layer cost of a convolution on this machine: XLA's own vs kd_jax's chunked im2col and
Winograd convolutions (kd_jax/models/cpu_conv.py), and PyTorch's when torch is installed. The
table behind the per-layer rule there.

    python benchmarks/conv_layers.py [--steps 7] [--no_torch]

For each layer shape of the benchmark models (LeNet-5, WRN-10-1 and its half, CIFAR ResNet-18/34):
ms for the forward pass and for a training pass (forward + input and kernel gradient of
sum(conv(x, w)²)) under each `config.model.conv` choice: XLA's convolution (`xla`), the im2col
convolution forced (`im2col`), Winograd F(2x2, 3x3) forced where the shape allows it
(`winograd`: 3x3, stride 1, pad 1, even sizes), and the automatic choice (`auto`, with the
method it took).
Every call of every mode is timed in turn, `--steps` rounds, and the median is printed (this
machine's neighbours move single timings by 10-30 %). PyTorch (NCHW, its default oneDNN path)
runs in a subprocess so that the two thread pools never compete.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (batch, input H = W, C_in, C_out, kernel, stride)
SHAPES = [
    (128, 32, 1, 6, 5, 1),
    (128, 14, 6, 16, 5, 1),
    (128, 16, 32, 32, 3, 1),  # DAFL / DFAD generator (configs/dafl_mnist.py, ngf 16)
    (128, 32, 32, 16, 3, 1),
    (128, 32, 16, 1, 3, 1),
    (128, 32, 8, 8, 3, 1),
    (128, 32, 16, 16, 3, 1),
    (128, 32, 8, 16, 3, 2),
    (128, 16, 16, 16, 3, 1),
    (128, 16, 32, 32, 3, 1),
    (128, 8, 64, 64, 3, 1),
    (64, 32, 3, 64, 3, 1),
    (64, 32, 64, 64, 3, 1),
    (64, 32, 64, 128, 3, 2),
    (64, 32, 64, 128, 1, 2),
    (64, 16, 128, 128, 3, 1),
    (64, 16, 128, 256, 3, 2),
    (64, 8, 256, 256, 3, 1),
    (64, 8, 256, 512, 3, 2),
    (64, 4, 512, 512, 3, 1),
]


def _padding(k):
    return 1 if k == 3 else 0


def _timed(f, steps):
    f()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return 1e3 * sorted(times)[(steps - 1) // 2]


def torch_times(steps):
    """{shape: (forward ms, training ms)} of torch.nn.Conv2d, printed as JSON lines."""
    import torch

    torch.set_num_threads(os.cpu_count())
    for b, h, c, o, k, s in SHAPES:
        conv = torch.nn.Conv2d(c, o, k, s, _padding(k), bias=False)
        x = torch.randn(b, c, h, h)
        with torch.no_grad():
            fwd = _timed(lambda: conv(x), steps)
        xg = x.clone().requires_grad_(True)

        def train():
            conv.zero_grad()
            xg.grad = None
            (conv(xg) ** 2).sum().backward()

        print(json.dumps([b, h, c, o, k, s, fwd, _timed(train, steps)]), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=7, help="timed rounds (median)")
    p.add_argument("--no_torch", action="store_true", help="skip the PyTorch columns")
    p.add_argument(
        "--only", default="", help="comma-separated rows of SHAPES to time (0-based; default all)"
    )
    p.add_argument("--torch_child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.only:
        global SHAPES
        SHAPES = [SHAPES[int(i)] for i in args.only.split(",")]
    if args.torch_child:
        return torch_times(args.steps)
    torch = {}
    if not args.no_torch:
        run = subprocess.run(
            [sys.executable, __file__, "--torch_child", "--steps", str(args.steps)]
            + (["--only", args.only] if args.only else []),
            capture_output=True,
            text=True,
        )
        if run.returncode:
            print(f"(PyTorch columns skipped: {run.stderr.strip().splitlines()[-1]})")
        for line in run.stdout.splitlines():
            *shape, fwd, train = json.loads(line)
            torch[tuple(shape)] = (fwd, train)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from kd_jax.models import cpu_conv

    rng = np.random.default_rng(0)
    modes = ("xla", "im2col", "winograd", "auto")
    print(
        f"backend {jax.default_backend()}, {os.cpu_count()} cores, load "
        f"{os.getloadavg()[0]:.1f}; ms per call, median of {args.steps}\n\n"
        f"| batch | input | C_in→C_out | k, stride | auto takes | forward XLA | im2col | "
        f"winograd | auto | PyTorch | train XLA | im2col | winograd | auto | PyTorch | "
        f"auto / XLA (train) |\n|{'---|' * 16}",
        flush=True,
    )
    for b, h, c, o, k, s in SHAPES:
        x = jnp.asarray(rng.normal(size=(b, h, h, c)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
        pad = ((_padding(k),) * 2,) * 2
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        winograd_fits = cpu_conv.winograd_fits(x.shape, w.shape, (s, s), pad)

        calls = {}
        for mode in modes:
            if mode == "winograd" and not winograd_fits:
                continue
            conv = functools.partial(
                cpu_conv.conv_general_dilated,
                window_strides=(s, s),
                padding=pad,
                dimension_numbers=dn,
                conv=mode,
            )
            fwd = jax.jit(conv)
            train = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(conv(x, w) ** 2), (0, 1)))
            jax.block_until_ready((fwd(x, w), train(x, w)))  # compiled before timing
            calls[mode, "fwd"] = lambda fwd=fwd: jax.block_until_ready(fwd(x, w))
            calls[mode, "train"] = lambda train=train: jax.block_until_ready(train(x, w))
        takes = cpu_conv.conv_method(x.shape, w.shape, (s, s), pad, conv="auto")
        times = {key: [] for key in calls}
        for _ in range(args.steps):  # round-robin: drift in the machine hits every mode alike
            for key, call in calls.items():
                t = time.perf_counter()
                call()
                times[key].append(1e3 * (time.perf_counter() - t))
        ms = {key: sorted(v)[(len(v) - 1) // 2] for key, v in times.items()}
        pt = torch.get((b, h, c, o, k, s))

        def cells(kind):
            return " | ".join(f"{ms[m, kind]:.1f}" if (m, kind) in ms else "–" for m in modes)

        print(
            f"| {b} | {h}×{h} | {c}→{o} | {k}, {s} | {takes} | {cells('fwd')} | "
            f"{f'{pt[0]:.1f}' if pt else '–'} | {cells('train')} | "
            f"{f'{pt[1]:.1f}' if pt else '–'} | "
            f"{ms['xla', 'train'] / ms['auto', 'train']:.2f}× |",
            flush=True,
        )


if __name__ == "__main__":
    main()
