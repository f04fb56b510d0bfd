"""Per-layer cost of a convolution's gradient on this machine: XLA's own vs kd_jax's matmul
weight gradient (kd_jax/models/layers.py). The table behind the layer rule there.

    python benchmarks/conv_grad.py [--steps 5]

For each layer shape of the benchmark models (LeNet-5, WRN-10-1 and its half, CIFAR ResNet-18):
ms for the input + kernel gradient of sum(conv(x, w)²) with XLA's gradient, with the matmul
weight gradient, and XLA's kernel gradient alone; `work` = H_out·W_out·C_in, the quantity the
automatic rule thresholds (matmul from 16,384).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (batch, input H = W, C_in, C_out, kernel, stride)
SHAPES = [(128, 32, 1, 6, 5, 1), (128, 14, 6, 16, 5, 1), (128, 32, 8, 8, 3, 1),
          (128, 32, 16, 16, 3, 1), (128, 32, 8, 16, 3, 2), (128, 16, 16, 16, 3, 1),
          (128, 16, 32, 32, 3, 1), (128, 8, 64, 64, 3, 1), (64, 32, 64, 64, 3, 1),
          (64, 32, 64, 128, 3, 2), (64, 16, 128, 128, 3, 1), (64, 8, 256, 256, 3, 1),
          (64, 4, 512, 512, 3, 1)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from kd_jax.models import layers

    def timed(f, *a):
        jax.block_until_ready(f(*a))
        t = time.perf_counter()
        for _ in range(args.steps):
            r = f(*a)
        jax.block_until_ready(r)
        return 1e3 * (time.perf_counter() - t) / args.steps

    rng = np.random.default_rng(0)
    print(f"backend {jax.default_backend()}, {os.cpu_count()} cores, load "
          f"{os.getloadavg()[0]:.1f}\n\n| batch | input | C_in→C_out | k, stride | work | XLA grad "
          f"(ms) | matmul weight grad (ms) | XLA kernel grad alone (ms) | speed-up |\n"
          f"|---|---|---|---|---|---|---|---|---|", flush=True)
    for b, h, c, o, k, s in SHAPES:
        x = jnp.asarray(rng.normal(size=(b, h, h, c)), jnp.float32)
        w = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
        pad = ((k // 2, k // 2),) * 2 if k == 3 else ((0, 0), (0, 0))

        def loss(x, w, conv):
            return jnp.sum(conv(x, w, (s, s), pad, None) ** 2)

        native = jax.jit(jax.grad(lambda x, w: loss(x, w, layers._native_conv), (0, 1)))
        matmul = jax.jit(jax.grad(lambda x, w: loss(x, w, layers._conv_matmul_grad), (0, 1)))
        kernel = jax.jit(jax.grad(lambda x, w: loss(x, w, layers._native_conv), 1))
        tn, tm, tk = timed(native, x, w), timed(matmul, x, w), timed(kernel, x, w)
        work = ((h + sum(pad[0]) - k) // s + 1) ** 2 * c
        print(f"| {b} | {h}×{h} | {c}→{o} | {k}, {s} | {work:,} | {tn:.1f} | {tm:.1f} | {tk:.1f} "
              f"| {tn / tm:.2f}× |", flush=True)


if __name__ == "__main__":
    main()
