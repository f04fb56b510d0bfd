"""Seed spread of the end-to-end smoke runs whose accuracies the test suite bounds.

    python benchmarks/smoke_seeds.py --seeds 0 1 2 3 --out /tmp/kd/smoke_seeds

Runs, per seed, exactly what the tests run (tests/conftest.py's `teacher_mnist.py:smoke`, and on
the seed-0 teacher `eikd_mnist.py:smoke`, `odsd_mnist.py:smoke` with the adaptive refresh every
3 epochs, `sckd_mnist.py:smoke`) and prints each bounded metric's values, mean and std next to
the bound the test uses, and the margin in stds. The suite's bounds are meant to sit several
stds below the mean (a run on another CPU or library version moves like another seed: float32
reordering changes the trajectory from the first step). About 15 minutes per seed on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# metric -> (run, the test's bound, the test that holds it)
BOUNDS = {
    "teacher accuracy": ("teacher", "TEACHER_ACCURACY", "test_eikd.py::test_smoke_run_end_to_end"),
    "EIKD accuracy": ("eikd", "EIKD_ACCURACY", "test_eikd.py::test_smoke_run_end_to_end"),
    "ODSD accuracy": ("odsd", "SMOKE_ACCURACY", "test_odsd.py::test_odsd_mnist_smoke_end_to_end"),
    "SCKD novel_train_accuracy": (
        "sckd",
        "SMOKE_NOVEL_ACCURACY",
        "test_sckd.py::test_sckd_mnist_smoke_discovers_novel_digits",
    ),
    "SCKD known_accuracy_uno": (
        "sckd",
        "SMOKE_KNOWN_ACCURACY",
        "test_sckd.py::test_sckd_mnist_smoke_discovers_novel_digits",
    ),
}
KEYS = {
    "teacher accuracy": "final_accuracy",
    "EIKD accuracy": "final_accuracy",
    "ODSD accuracy": "final_accuracy",
    "SCKD novel_train_accuracy": "novel_train_accuracy",
    "SCKD known_accuracy_uno": "known_accuracy_uno",
}


def run_seed(seed: int, out: str, teacher0: str | None, only: set) -> dict:
    from helpers import config

    from kd_jax import run, train

    results = {}
    teacher = os.path.join(out, f"teacher_s{seed}")
    if only & {"teacher", "eikd", "odsd"}:
        c = config("teacher_mnist.py", "smoke", seed=seed, async_checkpoints=False)
        results["teacher"] = train.train_and_evaluate(c, teacher)
    teacher0 = teacher0 or teacher
    for name, cfg, extra in (
        ("eikd", "eikd_mnist.py", {}),
        ("odsd", "odsd_mnist.py", {"odsd.aps.refresh_epochs": 3}),
        ("sckd", "sckd_mnist.py", None),
    ):
        if name not in only:
            continue
        overrides = {"seed": seed, "async_checkpoints": False}
        if extra is not None:  # SCKD trains without a teacher
            overrides.update({"teacher.workdir": teacher0, **extra})
        c = config(cfg, "smoke", **overrides)
        results[name] = run.run(c, os.path.join(out, f"{name}_s{seed}"))  # SCKD: stage 1 first
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--out", default="/tmp/kd/smoke_seeds")
    p.add_argument("--only", default="teacher,eikd,odsd,sckd", help="runs to make, e.g. sckd")
    args = p.parse_args(argv)
    import conftest  # noqa: F401  (the tests' 8 fake devices and XLA cache)
    import test_eikd
    import test_odsd
    import test_sckd

    bound_of = {
        "TEACHER_ACCURACY": test_eikd.TEACHER_ACCURACY,
        "EIKD_ACCURACY": test_eikd.EIKD_ACCURACY,
        "SMOKE_ACCURACY": test_odsd.SMOKE_ACCURACY,
        "SMOKE_NOVEL_ACCURACY": test_sckd.SMOKE_NOVEL_ACCURACY,
        "SMOKE_KNOWN_ACCURACY": test_sckd.SMOKE_KNOWN_ACCURACY,
    }
    os.makedirs(args.out, exist_ok=True)
    per_seed = {}
    teacher0 = None
    for seed in args.seeds:
        per_seed[seed] = run_seed(seed, args.out, teacher0, set(args.only.split(",")))
        teacher0 = teacher0 or os.path.join(args.out, f"teacher_s{seed}")
    with open(os.path.join(args.out, "smoke_seeds.json"), "w") as f:
        json.dump({str(k): v for k, v in per_seed.items()}, f, indent=1, default=str)
    print(
        f"| metric | seeds {' '.join(map(str, args.seeds))} | mean ± std | bound | "
        f"margin (stds) | test |"
    )
    print("|---|---|---|---|---|---|")
    for metric, (run, bound_name, test) in BOUNDS.items():
        if run not in per_seed[args.seeds[0]]:
            continue
        v = np.array([per_seed[s][run][KEYS[metric]] for s in args.seeds])
        bound = bound_of[bound_name]
        std = v.std(ddof=1) if len(v) > 1 else float("nan")
        print(
            f"| {metric} | {' / '.join(f'{x:.3f}' for x in v)} | {v.mean():.3f} ± {std:.3f} "
            f"| {bound} | {(v.mean() - bound) / std:.1f} | {test} |"
        )


if __name__ == "__main__":
    main()
