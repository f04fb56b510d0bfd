"""Which images each ODSD selection score finds (issue 24): the share of related (digit) images in
the class-balanced selection of N pool images, per score, for N = 250 ... 8,000, on the bundled
open-world pool (9,797 images, 3,797 of them digits) with the offline teachers.

    python benchmarks/selection_quality.py [--pairs lenet wrn] [--out /tmp/kd/selection_quality]

Teachers: `configs/teacher_mnist.py` (LeNet-5, 1,500 steps) and the same with
`model.name=wrn10_1`, trained once into <out>/teacher_<pair> unless `--teacher-lenet` /
`--teacher-wrn` name finished runs. One streamed teacher pass over the pool per teacher
(`kd_jax.pool.score_pool`, heaps for N = 8,000, every feature score; cached in <out>/<pair>),
then every selection rule of `kd_jax.methods.odsd.quality_rules` — the code ODSD runs — at every
N. Scores: APS (the paper's, ODSD's default), teacher confidence (DFND's ranking, balanced),
energy, Mahalanobis, k-NN (bank: the 400 most confident images per class, ODSD's n_c at its
N = 4,000) and, for the BatchNorm teacher, the BN-statistics score. Also the ceiling: the best any
score can do under ODSD's class balance (per teacher class ⌈N/C⌉, so classes the teacher
assigns few digits to must take non-digits). Runtime: a minute per teacher on 2 idle CPU
cores after the teachers. Writes benchmarks/results/selection_quality.md and
selection_quality.png (selection_quality_wrn.png for the second pair) and prints the tables.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

sys.path.insert(0, harness.ROOT)  # this checkout's kd_jax, as the harness's runs use

PAIRS = {"lenet": ("lenet5", "LeNet-5"), "wrn": ("wrn10_1", "WRN-10-1")}
SIZES = (250, 500, 1000, 2000, 4000, 8000)
NUM_CLASSES = 10
ODSD_SIZE = 4000  # ODSD's N in configs/odsd_mnist.py: fixes the k-NN bank (n_c = 400 per class)


def score_pair(pair: str, teacher_dir: str, out: str) -> dict:
    import jax
    import ml_collections

    from kd_jax import diagnostics, models, pool, teacher
    from kd_jax.data import offline, pipeline
    from kd_jax.methods import odsd

    model_name, _ = PAIRS[pair]
    with open(os.path.join(teacher_dir, "results.json")) as f:
        result = json.load(f)
    if result["config"]["model"]["name"] != model_name:
        raise SystemExit(f"{teacher_dir} holds a {result['config']['model']['name']}")
    model = models.create_model(model_name, NUM_CLASSES)
    variables = teacher.model_variables(teacher_dir)
    cfg = odsd.default_config()
    aps = cfg.aps
    kinds = ("mahalanobis", "knn") + (("bn",) if diagnostics.has_batch_norm(variables) else ())
    o = cfg.ood
    spec = pool.OODSpec(
        kinds=kinds,
        fit_confidence=o.fit_confidence,
        normalize=o.normalize,
        shrinkage=o.shrinkage,
        knn_k=o.knn_k,
        knn_bank=odsd.per_class_quota(ODSD_SIZE, NUM_CLASSES),
    )
    t0 = time.time()
    scores = pool.score_pool(
        os.path.join(out, pair),
        ml_collections.ConfigDict({"source": "offline_pool"}),
        teacher_model=model,
        teacher_vars=variables,
        domain=pipeline.Domain(32, 1, "mnist"),
        num_classes=NUM_CLASSES,
        batch_size=512,
        heap_size=odsd.heap_size(aps, max(SIZES), NUM_CLASSES),
        ood=spec,
    )
    seconds = time.time() - t0
    params = jax.tree.map(np.asarray, variables["params"])
    d = scores.cand_feat.shape[1]
    rules = odsd.quality_rules(scores, aps, NUM_CLASSES, odsd.head_kernel(params, d, NUM_CLASSES))
    related = np.isin(np.asarray(scores.sources).astype(str), offline.RELATED_SOURCES)
    rules["ceiling (class-balanced oracle)"] = lambda s, n: (
        odsd.select_by_score(
            dataclasses.replace(s, extra={"oracle": related.astype(np.float32)}),
            "oracle",
            n,
            NUM_CLASSES,
        ).ids
    )
    curves = pool.selection_quality(scores, rules, offline.RELATED_SOURCES, SIZES)
    return {
        "curves": curves,
        "pool_share": float(related.mean()),
        "teacher_accuracy": result["final_accuracy"],
        "score_seconds": seconds,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=["lenet", "wrn"])
    parser.add_argument("--out", default="/tmp/kd/selection_quality")
    parser.add_argument("--teacher-lenet", default="")
    parser.add_argument("--teacher-wrn", default="")
    args = parser.parse_args(argv)

    from kd_jax import diagnostics

    results = {}
    for pair in args.pairs:
        teacher_dir = getattr(args, f"teacher_{pair}") or os.path.join(args.out, f"teacher_{pair}")
        harness.run("configs/teacher_mnist.py", teacher_dir, {"model.name": PAIRS[pair][0]})
        results[pair] = score_pair(pair, teacher_dir, args.out)
    results_dir = os.path.join(harness.ROOT, "benchmarks", "results")
    os.makedirs(results_dir, exist_ok=True)
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Selection quality: the share of digits in ODSD's selection, per score",
        "",
        "Bundled pool (9,797 images, 38.8 % digits: sklearn + font digits); every rule is ODSD's "
        "class balance (per teacher class the ⌈N/C⌉ best by the score, the shortfall from the "
        "global ranking), APS with its gate and prototypes. Related share in % of the N "
        f"selected images. Command: `python benchmarks/selection_quality.py {command}`.",
    ]
    for pair, r in results.items():
        sizes = sorted({n for c in r["curves"].values() for n in c})
        lines += [
            "",
            f"## {PAIRS[pair][1]} teacher ({100 * r['teacher_accuracy']:.1f} % on the test "
            f"digits; pool pass {r['score_seconds']:.0f} s)",
            "",
            "| score | " + " | ".join(f"N = {n:,}" for n in sizes) + " |",
            "|---|" + "---|" * len(sizes),
        ]
        for name, curve in r["curves"].items():
            cells = [f"{100 * curve[n]:.1f}" if n in curve else "—" for n in sizes]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append(
            "| random N (the pool) | "
            + " | ".join(f"{100 * r['pool_share']:.1f}" for _ in sizes)
            + " |"
        )
        name = "selection_quality.png" if pair == "lenet" else f"selection_quality_{pair}.png"
        diagnostics.plot_selection_quality(
            os.path.join(results_dir, name),
            r["curves"],
            pool_share=r["pool_share"],
            title=f"selection quality, {PAIRS[pair][1]} teacher",
        )
    text = "\n".join(lines) + "\n"
    with open(os.path.join(results_dir, "selection_quality.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
