"""Offline NCD benchmark (MNIST-5k, `configs/sckd_mnist.py`): UNO, SCKD as the paper describes it
(the replica mechanism), the relations variant and the paper's ablations; then the paper's
further experiments, a varied known/novel ratio and a wrongly estimated novel class count.

    python benchmarks/offline_sckd.py [--table main|ratios|clusters] [--seeds 0,1,2]
        [--steps 2000] [--out /tmp/kd/offline_sckd] [--variants "NAME;..."]

One stage-1 run per seed and class split (`sckd_mnist.py:pretrain`) is shared by every
discovery run of that seed and split (`ncd.pretrain.workdir`). Columns: task-aware novel
accuracy (unlabeled train part, held-out test part; best head), task-agnostic all / known /
novel accuracy on the test part in UNO's convention and in the global one (rKD / GCD), wall
seconds of discovery; mean ± std over seeds. Runs are cached per workdir
(<out>/s<steps>/<split>/<variant>/seed<k>). Writes
benchmarks/results/offline_sckd_<table>_s<steps>.md.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import harness  # noqa: E402

CONFIG = "configs/sckd_mnist.py"
VARIANTS = {
    "UNO": ("uno", {}),
    "SCKD (paper: replica, α = β = 0.1)": ("", {}),
    "SCKD relations variant": ("", {"sckd.variant": "relations"}),
    "L_k→n only": ("", {"sckd.terms": "known_to_novel"}),
    "L_n→k only": ("", {"sckd.terms": "novel_to_known"}),
    "no replica (S from the current encoder)": ("", {"sckd.similarity": "current"}),
    "uniform weights": ("", {"sckd.weights": "uniform"}),
    "random weights": ("", {"sckd.weights": "random"}),
}
# The known/novel ratio (digits 0..k-1 known, the rest novel) and the head size for 5 novel.
RATIOS = {"3/7": (3, 7), "5/5": (5, 5), "7/3": (7, 3)}
CLUSTERS = (4, 5, 6)
COLUMNS = {
    "novel train (task-aware)": "novel_train_accuracy",
    "novel test (task-aware)": "novel_test_accuracy",
    "all (UNO)": "all_accuracy_uno",
    "known (UNO)": "known_accuracy_uno",
    "novel (UNO)": "novel_accuracy_uno",
    "all (global)": "all_accuracy_global",
    "known (global)": "known_accuracy_global",
    "novel (global)": "novel_accuracy_global",
}


def _wall(results):
    import numpy as np

    w = np.asarray([r["wall_seconds"] for r in results], float)
    return f"{w.mean():.0f}"


def discovery(out, steps, split_name, split, variant, seed):
    known, novel = split
    split_overrides = {"ncd.num_known": known, "ncd.num_novel": novel}
    tag = split_name.replace("/", "_")
    pre = os.path.join(out, "pretrain", tag, f"seed{seed}")
    harness.run(f"{CONFIG}:pretrain", pre, {"seed": seed, **split_overrides})
    arg, overrides = variant
    return os.path.join(out, f"s{steps}", tag), {
        "config": f"{CONFIG}:{arg}" if arg else CONFIG,
        "overrides": {
            "seed": seed,
            "ncd.pretrain.workdir": pre,
            "num_steps": steps,
            "eval_every": steps,
            "checkpoint_every": steps,
            **split_overrides,
            **overrides,
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", default="main", choices=("main", "ratios", "clusters"))
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="/tmp/kd/offline_sckd")
    parser.add_argument("--variants", default="", help="main table: rows, separated by ;")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = {}  # row name -> (split name, split, variant name, extra overrides)
    if args.table == "main":
        names = args.variants.split(";") if args.variants else list(VARIANTS)
        rows = {n: ("5/5", RATIOS["5/5"], n, {}) for n in names}
    elif args.table == "ratios":
        for ratio, split in RATIOS.items():
            for n in ("UNO", "SCKD (paper: replica, α = β = 0.1)"):
                rows[f"{ratio} {n}"] = (ratio, split, n, {})
    else:
        for k in CLUSTERS:
            for n in ("UNO", "SCKD (paper: replica, α = β = 0.1)"):
                extra = {"ncd.num_clusters": k} if k != 5 else {}  # 5: the main table's run
                rows[f"{k} clusters, {n}"] = ("5/5", RATIOS["5/5"], n, extra)
    table = {}
    for row, (split_name, split, variant, extra) in rows.items():
        table[row] = []
        for seed in seeds:
            base, spec = discovery(args.out, args.steps, split_name, split, VARIANTS[variant], seed)
            slug = variant if not extra else f"{variant} {extra}"
            slug = "".join(ch if ch.isalnum() else "_" for ch in slug)
            workdir = os.path.join(base, slug, f"seed{seed}")
            table[row].append(harness.run(spec["config"], workdir, {**spec["overrides"], **extra}))
    columns = {
        h: (lambda k: lambda rs: harness.mean_std([r.get(k) for r in rs]))(k)
        for h, k in COLUMNS.items()
    }
    columns["wall s"] = _wall
    what = {
        "main": "MNIST-5k, digits 0–4 known / 5–9 novel",
        "ratios": "MNIST-5k, known/novel ratio varied (digits 0..k-1 known)",
        "clusters": "MNIST-5k, 0–4 known / 5–9 novel, novel heads of 4, 5 or 6 clusters",
    }[args.table]
    text = (
        f"# Offline NCD benchmark ({what})\n\n"
        f"`python benchmarks/offline_sckd.py --table {args.table} --seeds {args.seeds} "
        f"--steps {args.steps}`; discovery {args.steps} steps (stage 1: 300); accuracy in %, "
        f"mean ± std over {len(seeds)} seed(s) {seeds}; LeNet-5, `{CONFIG}`; wall = discovery "
        f"seconds per run (up to six runs shared the 2 cores: compare within a table only).\n\n"
        + harness.markdown(table, columns)
        + "\n"
    )
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    name = f"offline_sckd_{args.table}_s{args.steps}.md"
    path = os.path.join(ROOT, "benchmarks", "results", name)
    with open(path, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
