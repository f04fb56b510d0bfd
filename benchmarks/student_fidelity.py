"""How well finished offline students fit their teacher, on their own transfer set and on the test
digits, and whether their BatchNorm statistics explain their accuracy (README, "Results": why
plain KD collapses with the WRN-10-1-half student).

    python benchmarks/student_fidelity.py --teacher kd_jax/assets/teachers/mnist5k_wrn10_1 \
        --runs "KD, random subset=/tmp/kd/offline_odsd_wrn/KD_random_pool_subset_N" \
               "ODSD=/tmp/kd/offline_odsd_wrn/ODSD" --out student_fidelity_wrn.md

`--runs NAME=DIR`: DIR holds one finished run per seed (`seed<k>/`, as benchmarks/harness.py
lays them out). Per run, eval-mode networks, no augmentation: test accuracy; agreement of the
student's argmax with the teacher's on the run's transfer set (its selection.npz, else the whole
pool), split into digits and non-digits, and on the test digits; KL(p_T ‖ p_S) at the run's KD
temperature on the transfer set; the largest class share of the teacher's mean target on the
transfer set at that temperature (a class the teacher leans to on every open-world image); how
many classes the student predicts on the test digits. For BatchNorm students, the test accuracy
after the student's running statistics are replaced by the statistics of one set (up to 2,000
images: the test digits themselves, an oracle; the transfer set's digits; its non-digits),
everything else kept.
Mean ± std over the seeds found. Writes benchmarks/results/<--out> and prints it.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BATCH = 500
BN_IMAGES = 2000  # images whose statistics replace the student's running ones (one batch)
KL = 5  # the column printed with three decimals


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="the runs' finished teacher workdir")
    parser.add_argument("--runs", nargs="+", required=True, help="NAME=DIR (DIR/seed<k>/ runs)")
    parser.add_argument("--out", default="student_fidelity.md", help="file in benchmarks/results/")
    args = parser.parse_args(argv)

    import jax
    import ml_collections
    import tensorflow as tf

    from kd_jax import inference, losses, models, parallel
    from kd_jax.data import offline, pipeline
    from kd_jax.models.layers import BN_MOMENTUM
    from kd_jax.teacher import model_variables

    mesh = parallel.make_mesh(jax.devices()[:1])

    def load(workdir):
        """(results.json, eval logits of images [N, ...], the same with BatchNorm statistics
        replaced by those of a set; both compiled once per run)."""
        with open(os.path.join(workdir, "results.json")) as f:
            info = json.load(f)
        model = models.create_model(info["model"], info.get("num_classes", 10))
        variables = model_variables(workdir)
        apply = inference.BatchedApply(
            lambda v, b: {"logits": model.apply(v, b["image"], train=False)[0]}, mesh
        )
        batch_stats = jax.jit(
            lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[1]["batch_stats"]
        )

        def logits(x, v=variables):
            batches = (
                {"image": x[i : i + BATCH], "mask": np.ones(len(x[i : i + BATCH]), np.float32)}
                for i in range(0, len(x), BATCH)
            )
            return apply.gather(v, batches=batches, pad_to=BATCH)["logits"]

        def logits_with_statistics_of(statistics_images, x):
            """The running statistics replaced by those of one train-mode batch."""
            pick = np.random.default_rng(0).permutation(len(statistics_images))[:BN_IMAGES]
            new = batch_stats(variables, statistics_images[pick])
            stats = jax.tree.map(
                lambda n, o: (n - BN_MOMENTUM * o) / (1 - BN_MOMENTUM),
                new,
                variables["batch_stats"],
            )
            return logits(x, {"params": variables["params"], "batch_stats": stats})

        has_bn = bool(variables["batch_stats"])
        return info, logits, logits_with_statistics_of if has_bn else None

    t_info, t_logits, _ = load(args.teacher)
    domain = pipeline.domain_from_config(ml_collections.ConfigDict(t_info["config"]["data"]))

    def prepare(images):  # the eval geometry and normalisation of kd_jax.data.pipeline
        ds = tf.data.Dataset.from_tensor_slices(images).map(
            lambda x: pipeline.preprocess({"image": x}, domain, "none")
        )
        return np.concatenate(list(ds.batch(1024).as_numpy_iterator()))

    data = offline.mnist5k()
    x_test, y_test = prepare(data["test_images"]), data["test_labels"]
    pool = offline.build_offline_pool(seed=0)
    x_pool = prepare(pool["images"])
    related = np.isin(pool["sources"].astype(str), offline.RELATED_SOURCES)
    zt_pool, zt_test = t_logits(x_pool), t_logits(x_test)

    columns = [
        "test acc. (%)",
        "agreement on D (%)",
        "on D's digits",
        "on D's non-digits",
        "on test",
        "KL(p_T‖p_S) on D at τ",
        "teacher's mean target on D at τ: largest class (%)",
        "classes in the student's test predictions",
        "test acc., BN stats of test digits (oracle)",
        "of D's digits",
        "of D's non-digits",
    ]
    rows = []
    for spec in args.runs:
        name, _, directory = spec.partition("=")
        per_seed = []
        for workdir in sorted(glob.glob(os.path.join(directory, "seed*"))):
            if not os.path.exists(os.path.join(workdir, "results.json")):
                continue
            info, logits, logits_with_statistics_of = load(workdir)
            selection = os.path.join(workdir, "selection.npz")
            if os.path.exists(selection):
                with np.load(selection) as z:
                    ids = z["ids"]
            else:  # KD on the whole pool
                ids = np.arange(len(x_pool))
            tau = info["config"]["kd"]["temperature"]
            zs, zs_test = logits(x_pool[ids]), logits(x_test)
            agree, digit = zs.argmax(-1) == zt_pool[ids].argmax(-1), related[ids]
            values = [
                (zs_test.argmax(-1) == y_test).mean() * 100,
                agree.mean() * 100,
                agree[digit].mean() * 100,
                agree[~digit].mean() * 100,
                (zs_test.argmax(-1) == zt_test.argmax(-1)).mean() * 100,
                float(losses.kd_loss(zs, zt_pool[ids], tau)) / tau**2,  # the mean KL
                float(jax.nn.softmax(zt_pool[ids] / tau).mean(0).max()) * 100,
                len(np.unique(zs_test.argmax(-1))),
            ]
            if logits_with_statistics_of:
                for x in (x_test, x_pool[ids[digit]], x_pool[ids[~digit]]):
                    z = logits_with_statistics_of(x, x_test)
                    values.append((z.argmax(-1) == y_test).mean() * 100)
            else:
                values += [np.nan] * 3
            per_seed.append(values)
            print(name, workdir, " ".join(f"{v:.2f}" for v in values), flush=True)
        v = np.asarray(per_seed)
        cells = [
            "—" if np.isnan(m) else (f"{m:.3f} ± {s:.3f}" if j == KL else f"{m:.1f} ± {s:.1f}")
            for j, (m, s) in enumerate(zip(v.mean(0), v.std(0)))
        ]
        rows.append(f"| {name} ({len(v)} seeds) | " + " | ".join(cells) + " |")

    header = "| run | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns)
    text = (
        "# Offline students: fit to the teacher and BatchNorm statistics\n\n"
        f"Teacher: {args.teacher} ({t_info['model']}, test accuracy "
        f"{100 * t_info['final_accuracy']:.1f} %). D = the run's transfer set. Command: "
        f"`python benchmarks/student_fidelity.py "
        f"{shlex.join(argv if argv is not None else sys.argv[1:])}`.\n\n"
        + header
        + "\n"
        + "\n".join(rows)
        + "\n"
    )
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", args.out)
    with open(path, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
