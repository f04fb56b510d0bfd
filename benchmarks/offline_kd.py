"""Offline benchmark, engine baselines: teachers and Hinton KD transfer sets (3 seeds).

    python benchmarks/offline_kd.py [--out=/tmp/kd_bench] [--seeds=0,1,2]

Trains LeNet-5 (teacher) and LeNet-5-half (with data) on the MNIST-5k train split, then KD
LeNet-5 -> LeNet-5-half from the seed-0 teacher with the original images (no labels), the whole
bundled open-world pool, or a random pool subset of 4,000 images. Accuracy is on the held-out
1,000-image test split. Writes benchmarks/results/offline_kd.md. About 30 min on 2 CPU cores.
"""

import argparse
import os

import harness

parser = argparse.ArgumentParser()
parser.add_argument("--out", default="/tmp/kd_bench")
parser.add_argument("--seeds", default="0,1,2")
args = parser.parse_args()
seeds = [int(s) for s in args.seeds.split(",")]

teachers = {
    name: [harness.run(cfg, os.path.join(args.out, name, f"seed{s}"), {"seed": s}) for s in seeds]
    for name, cfg in (
        ("teacher LeNet-5", "configs/teacher_mnist.py"),
        ("LeNet-5-half with labels", "configs/teacher_mnist.py:half"),
    )
}
teacher_dir = os.path.join(args.out, "teacher LeNet-5", f"seed{seeds[0]}")
kd = harness.run_variants(
    {
        f"KD, {t} transfer set": (f"configs/kd_mnist.py:{t}", {})
        for t in ("original", "pool", "random")
    },
    seeds,
    args.out,
    teacher_dir,
)
columns = {
    "test accuracy (%)": lambda r: harness.mean_std([x["final_accuracy"] for x in r]),
    "best (%)": lambda r: harness.mean_std([x["best_accuracy"] for x in r]),
    "wall (s)": lambda r: harness.mean_std([x["wall_seconds"] for x in r], 1.0, 0),
    "train images/s": lambda r: harness.mean_std([x["images_per_second"] for x in r], 1.0, 0),
}
table = harness.markdown({**teachers, **kd}, columns)
text = (
    f"Offline benchmark (MNIST-5k, held-out 1,000 test digits), seeds {seeds}; KD students "
    f"are LeNet-5-half taught by the seed-{seeds[0]} LeNet-5 teacher.\n\n{table}\n"
)
print(text)
os.makedirs(os.path.join(harness.ROOT, "benchmarks", "results"), exist_ok=True)
with open(os.path.join(harness.ROOT, "benchmarks", "results", "offline_kd.md"), "w") as f:
    f.write(text)
