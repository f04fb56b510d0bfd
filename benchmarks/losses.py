"""Time and peak memory of every loss in `kd_jax.losses` (jitted, after warm-up).

    python benchmarks/losses.py                       # B in {128, 256, 512, 1024}, D = 512
    python benchmarks/losses.py --sizes 128 256 --no-grad --only rkd

Features are [B, D] float32 (D = 512); logits are [B, C] (C = 100). Columns:
  fwd ms      median wall time of the jitted, ahead-of-time compiled loss (block_until_ready),
              after one warm-up call (a cell slower than --budget seconds is timed once)
  grad ms     the same for jax.value_and_grad w.r.t. the student / first argument
  fwd MiB     XLA compiled memory analysis: temp + output bytes of the forward program
  grad MiB    the same for the value_and_grad program
"skipped": the cubic extrapolation from the previous size exceeded --skip-slow seconds (the
exact RKD angle loss is O(B^3 D); its memory is still reported).
Memory comes from `jax.jit(f).lower(...).compile().memory_analysis()`, so it is the
buffer-assignment peak of the program (inputs excluded), not an RSS measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import losses as L

D, C = 512, 100


def cases():
    """name -> (make_args(B, rng) -> tuple, loss(*args) -> scalar)."""

    def feats(b, r, d=D):
        return jnp.asarray(r.normal(size=(b, d)), jnp.float32)

    def two_feats(b, r):
        return feats(b, r), feats(b, r)

    def logits(b, r):
        return (
            jnp.asarray(r.normal(size=(b, C)) * 2, jnp.float32),
            jnp.asarray(r.normal(size=(b, C)) * 3, jnp.float32),
        )

    def probs(b, r):
        return (jax.nn.softmax(feats(b, r, 50) * 3), jax.nn.softmax(feats(b, r, 50) * 3))

    return {
        "kd_loss": (logits, lambda s, t: L.kd_loss(s, t, 4.0)),
        "kd_loss+class_drop": (
            logits,
            lambda s, t: L.kd_loss(s, t, 4.0, L.class_drop_mask(t, k=C // 2)),
        ),
        "low_noise (top_p) KD": (
            logits,
            lambda s, t: L.soft_target_cross_entropy(s, L.low_noise_targets(t, 4.0)[0], 4.0),
        ),
        "feature_loss l2sq": (two_feats, L.feature_loss),
        "rkd_distance_loss": (two_feats, L.rkd_distance_loss),
        "rkd_angle_loss (exact)": (two_feats, L.rkd_angle_loss),
        "rkd_angle_loss (gram)": (two_feats, lambda s, t: L.rkd_angle_loss(s, t, method="gram")),
        "similarity_preserving": (two_feats, L.similarity_preserving_loss),
        "pkt_loss": (two_feats, L.pkt_loss),
        "relation_kl_loss": (two_feats, lambda s, t: L.relation_kl_loss(s, t, 0.5)),
        "info_nce": (two_feats, lambda q, k: L.info_nce(q, k, 0.1)),
        "nt_xent": (two_feats, lambda a, b: L.nt_xent(a, b, 0.5)),
        "nt_xent supcon": (
            two_feats,
            lambda a, b: L.nt_xent(a, b, 0.5, positives=jnp.arange(a.shape[0]) % 10),
        ),
        "sinkhorn_knopp (K=100)": (logits, lambda a, _: jnp.sum(L.sinkhorn_knopp(jnp.tanh(a)))),
        "swapped_prediction": (
            logits,
            lambda a, b: L.swapped_prediction_loss(
                a, b, L.sinkhorn_knopp(b), L.sinkhorn_knopp(a), 0.1
            ),
        ),
        "spatial_MI (50/50 probs)": (probs, lambda a, b: L.spatial_mutual_information(a, b)),
        "self_cooperation (50/50)": (probs, lambda a, b: L.self_cooperation_loss(a, b)),
    }


def _compile(fn, args):
    return jax.jit(fn).lower(*args).compile()


def _time(compiled, args, reps, budget_s):
    """Median wall ms of the AOT-compiled program; the first call is a warm-up when it is fast."""
    times = []
    start = time.perf_counter()
    while len(times) < reps + 1 and (len(times) < 1 or time.perf_counter() - start < budget_s):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    if len(times) > 1:
        times = times[1:]  # drop the warm-up call
    return 1e3 * statistics.median(times)


def _mib(compiled):
    mem = compiled.memory_analysis()
    if mem is None:
        return float("nan")
    return (mem.temp_size_in_bytes + mem.output_size_in_bytes) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512, 1024])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--budget", type=float, default=2.0, help="seconds of timed reps per cell")
    ap.add_argument("--no-grad", action="store_true")
    ap.add_argument("--only", default="", help="substring filter on the loss name")
    ap.add_argument(
        "--skip-slow",
        type=float,
        default=120.0,
        help="skip timing a cell whose cubic extrapolation from the previous size "
        "exceeds this many seconds (memory is still reported)",
    )
    args = ap.parse_args()

    dev = jax.devices()[0]
    print(
        f"# kd_jax.losses benchmark: jax {jax.__version__}, {dev.platform} ({dev.device_kind}), "
        f"{len(jax.devices())} device(s) visible, 1 used; D={D}, C={C}, float32"
    )
    header = f"| {'loss':26s} | {'B':>5s} | {'fwd ms':>9s} | {'grad ms':>9s} | {'fwd MiB':>8s} | {'grad MiB':>8s} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    r = np.random.default_rng(0)
    for name, (make, loss) in cases().items():
        if args.only and args.only not in name:
            continue
        prev = {}  # kind -> (B, seconds) of the last timed cell
        for b in args.sizes:
            inputs = make(b, r)
            row = {}
            for kind, fn in (
                ("fwd", loss),
                ("grad", None if args.no_grad else jax.value_and_grad(loss)),
            ):
                if fn is None:
                    row[kind] = (float("nan"), float("nan"))
                    continue
                compiled = _compile(fn, inputs)
                mib = _mib(compiled)
                if kind in prev and prev[kind][1] * (b / prev[kind][0]) ** 3 > args.skip_slow:
                    row[kind] = (None, mib)
                    continue
                ms = _time(compiled, inputs, args.reps, args.budget)
                prev[kind] = (b, ms / 1e3)
                row[kind] = (ms, mib)

            def fmt(ms):
                return f"{'skipped':>9s}" if ms is None else f"{ms:9.2f}"

            print(
                f"| {name:26s} | {b:5d} | {fmt(row['fwd'][0])} | {fmt(row['grad'][0])} | "
                f"{row['fwd'][1]:8.1f} | {row['grad'][1]:8.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
