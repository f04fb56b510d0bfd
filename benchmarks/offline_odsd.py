"""The offline ODSD table (issue 4): LeNet-5 -> LeNet-5-half (or WRN-10-1 -> WRN-10-1-half) on the
bundled benchmark.

    python benchmarks/offline_odsd.py [--seeds 0 1 2] [--steps 2000] [--out /tmp/kd/offline_odsd]
    python benchmarks/offline_odsd.py --pair wrn --out /tmp/kd/offline_odsd_wrn ...
    python benchmarks/offline_odsd.py --pair wrn --teacher kd_jax/assets/teachers/mnist5k_wrn10_1 \
        --steps 400 --seeds 0 1 2 --only ODSD "KD, random pool subset (N)" "KD, whole pool" \
        --out /tmp/kd/offline_odsd_wrn_demo --table offline_odsd_wrn_demo.md   # the demo's baselines

`--pair wrn` swaps the models only (teacher WRN-10-1, student the same at half width, 32×32×1); data,
selection sizes and optimiser stay those of the configs, so the two tables differ in the
architecture alone.

Rows: the teacher · KD on the original train images (upper bound) · KD on the whole pool · KD on
a random pool subset of N = 4,000 · DFND-style global confidence top-N (an ODSD switch setting,
KD loss) · ODSD · ODSD with the adaptive refresh (§1F) · ODSD's losses on the whole pool · ODSD
without APS / LNR / L_TR / L_SR · APS with plain KD (all three loss terms off) · ODSD ranking
by the k-NN or the BatchNorm-statistics score (`odsd.score`) · EIKD at the same steps · ODSD
with LNR's `prior` rule (`odsd.lnr.rule`), and that rule alone on a random N. Columns:
student accuracy on the held-out MNIST-5k test split (mean ± std over seeds), the share of
digits (related sources) in the transfer set, and wall time per run. Every run shares one teacher (trained once into
<out>/teacher unless --teacher names a finished run). Finished runs are reused, so the table can
be rebuilt or extended cheaply. Writes benchmarks/results/offline_odsd.md and prints it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

# --pair: (teacher, student, title) -> model overrides of every run; the configs' models are lenet.
PAIRS = {
    "lenet": ("lenet5", "lenet5_half", "LeNet-5 -> LeNet-5-half"),
    "wrn": ("wrn10_1", "wrn10_1_half", "WRN-10-1 -> WRN-10-1-half"),
}

BATCHNORM_TEACHERS = ("wrn",)  # the --pair values whose teacher has BatchNorm layers

VARIANTS = {
    "KD, original data (upper bound)": ("configs/kd_mnist.py:original", {}),
    "KD, whole pool": ("configs/kd_mnist.py:pool", {}),
    "KD, random pool subset (N)": ("configs/kd_mnist.py:random", {}),
    "DFND-style global confidence top-N": ("configs/odsd_mnist.py:dfnd", {}),
    "ODSD": ("configs/odsd_mnist.py", {}),
    "ODSD + adaptive refresh (§1F, every 2 epochs)": ("configs/odsd_mnist.py:refresh", {}),
    "ODSD losses on the whole pool (no sampling)": ("configs/odsd_mnist.py:all", {}),
    "ODSD w/o APS (random N)": ("configs/odsd_mnist.py:no_aps", {}),
    "ODSD w/o LNR": ("configs/odsd_mnist.py:no_lnr", {}),
    "ODSD w/o L_TR": ("configs/odsd_mnist.py:no_tr", {}),
    "ODSD w/o L_SR": ("configs/odsd_mnist.py:no_sr", {}),
    "APS + plain KD (no LNR, L_TR, L_SR)": ("configs/odsd_mnist.py:no_lnr,no_tr,no_sr", {}),
    # ODSD with an out-of-distribution score instead of APS (README, Selection quality); the
    # quality plot's second pool pass is skipped: it does not change the selection
    "ODSD, k-NN score": (
        "configs/odsd_mnist.py",
        {"odsd.score": "knn", "odsd.diagnostics.quality_plot": False},
    ),
    "ODSD, BN-statistics score (BatchNorm teachers)": (
        "configs/odsd_mnist.py",
        {"odsd.score": "bn", "odsd.diagnostics.quality_plot": False},
    ),
    "EIKD (its defaults, same steps)": ("configs/eikd_mnist.py", {}),
    # LNR's rule=prior: the teacher's targets keep every class, minus the batch's shared lean
    "ODSD, LNR rule prior": ("configs/odsd_mnist.py", {"odsd.lnr.rule": "prior"}),
    # plain KD on a random N with only the lean removed: what the teacher's lean costs KD
    "KD targets minus the lean (random N, LNR rule prior)": (
        "configs/odsd_mnist.py:no_aps,no_tr,no_sr",
        {"odsd.lnr.rule": "prior", "odsd.diagnostics.quality_plot": False},
    ),
}

RUN_ORDER = [
    "ODSD",
    "KD, random pool subset (N)",
    "KD, whole pool",
    "DFND-style global confidence top-N",
    "ODSD w/o APS (random N)",
    "ODSD losses on the whole pool (no sampling)",
    "ODSD w/o LNR",
    "ODSD w/o L_TR",
    "ODSD w/o L_SR",
    "ODSD + adaptive refresh (§1F, every 2 epochs)",
    "APS + plain KD (no LNR, L_TR, L_SR)",
    "KD, original data (upper bound)",
    "ODSD, k-NN score",
    "ODSD, BN-statistics score (BatchNorm teachers)",
    "EIKD (its defaults, same steps)",
    "ODSD, LNR rule prior",
    "KD targets minus the lean (random N, LNR rule prior)",
]


@functools.lru_cache(maxsize=1)
def _pool_related() -> np.ndarray:
    """[M] bool: pool id -> digit source (the shards' ids are the pool positions)."""
    from kd_jax.data import offline

    pool = offline.build_offline_pool(seed=0)
    return np.isin(pool["sources"].astype(str), offline.RELATED_SOURCES)


def _related_share(result: dict, out: str, name: str):
    """Digit share of the transfer set: pool selections report it (older ODSD results at the
    top level); KD on the whole pool or the original images is computed here."""
    report = result.get("selection", result)
    if "selection_related_share" in report:
        return report["selection_related_share"]
    transfer = result["config"]["data"]["transfer"]
    if transfer["source"] == "original":
        return 1.0
    related = _pool_related()
    if transfer.get("subset") == "random":
        seed = result["config"]["seed"]
        path = os.path.join(out, name, f"seed{seed}", "selection.npz")
        with np.load(path) as z:
            return float(related[z["ids"]].mean())
    return float(related.mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=0, help="override num_steps (0: config)")
    parser.add_argument("--out", default="/tmp/kd/offline_odsd")
    parser.add_argument(
        "--pair",
        choices=sorted(PAIRS),
        default="lenet",
        help="teacher -> student models (results go to their own --out)",
    )
    parser.add_argument(
        "--teacher", default="", help="finished teacher workdir of the --pair's teacher model"
    )
    parser.add_argument("--only", nargs="*", default=None, help="run only these row names")
    parser.add_argument(
        "--table", default="", help="file name in benchmarks/results/ (default: per --pair)"
    )
    args = parser.parse_args(argv)

    teacher_model, student_model, _ = PAIRS[args.pair]
    teacher = args.teacher or os.path.join(args.out, "teacher")
    if not args.teacher:
        harness.run("configs/teacher_mnist.py", teacher, {"model.name": teacher_model})
    with open(os.path.join(teacher, "results.json")) as f:
        result = json.load(f)
    if result["config"]["model"]["name"] != teacher_model:
        raise SystemExit(
            f"--teacher {teacher} is a {result['config']['model']['name']}, but "
            f"--pair {args.pair} needs a {teacher_model}"
        )
    teacher_acc = result["final_accuracy"]

    variants = {k: v for k, v in VARIANTS.items() if args.only is None or k in args.only}
    if args.pair not in BATCHNORM_TEACHERS:  # the score reads BatchNorm layers the teacher lacks
        variants.pop("ODSD, BN-statistics score (BatchNorm teachers)", None)
    models = {"model.name": student_model, "teacher.model": teacher_model}
    variants = {k: (cfg, {**ov, **models}) for k, (cfg, ov) in variants.items()}
    if args.steps:
        variants = {k: (cfg, {**ov, "num_steps": args.steps}) for k, (cfg, ov) in variants.items()}
    done = {}
    for name in sorted(variants, key=RUN_ORDER.index):  # most informative rows first
        key = (
            name.replace(" ", "_")
            .replace(",", "")
            .replace("/", "-")
            .replace("(", "")
            .replace(")", "")
        )
        result = harness.run_variants({key: variants[name]}, args.seeds, args.out, teacher)[key]
        done[name] = [dict(r, related_share=_related_share(r, args.out, key)) for r in result]
        table = {
            f"teacher ({teacher_model})": [{"final_accuracy": teacher_acc}],
            **{k: done[k] for k in VARIANTS if k in done},
        }
        _write(table, args, argv)  # after every row, so a partial table survives


def _write(table, args, argv):
    columns = {
        "student acc. (%)": lambda rs: harness.mean_std([r.get("final_accuracy") for r in rs]),
        "best acc. (%)": lambda rs: harness.mean_std([r.get("best_accuracy") for r in rs]),
        "digit share of transfer set (%)": lambda rs: harness.mean_std(
            [r.get("related_share") for r in rs], digits=1
        ),
        "wall time / run (s)": lambda rs: (
            f"{np.mean([r['wall_seconds'] for r in rs]):.0f}" if "wall_seconds" in rs[0] else "—"
        ),
    }
    lines = harness.markdown(table, columns).splitlines()
    steps = args.steps or "config default"
    text = "\n".join(
        [
            f"# Offline ODSD benchmark: {PAIRS[args.pair][2]}",
            "",
            f"Bundled offline benchmark (kd_jax/data/offline.py): student accuracy on the held-out "
            f"MNIST-5k test split (1,000 digits), mean ± std over seeds {args.seeds}; N = 4,000 "
            f"(the original train-set size) from the 9,797-image pool (39 % digits); "
            f"steps: {steps}. Command: `python benchmarks/offline_odsd.py "
            f"{shlex.join(argv if argv is not None else sys.argv[1:])}`.",
            "",
            *lines,
            "",
        ]
    )
    os.makedirs(os.path.join(harness.ROOT, "benchmarks", "results"), exist_ok=True)
    name = args.table or (
        "offline_odsd.md" if args.pair == "lenet" else f"offline_odsd_{args.pair}.md"
    )
    path = os.path.join(harness.ROOT, "benchmarks", "results", name)
    with open(path, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
