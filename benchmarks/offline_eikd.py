"""Offline benchmark, EIKD (issue 5): LeNet-5 -> LeNet-5-half from the bundled open-world pool.

    python benchmarks/offline_eikd.py --teacher=/tmp/kdw/teacher_mnist [--seeds=0,1,2] \
        [--steps=2000 --batch=128] [--out=/tmp/kd_bench_eikd]

Rows: the teacher; KD on the original images (upper bound), on the whole pool and on a random
pool subset of N = 4,000 (configs/kd_mnist.py); DFND's global confidence top-N with plain KD;
EIKD (configs/eikd_mnist.py) and its ablations (no class dropping / no feature term / no relation
term / global instead of balanced selection); ODSD (configs/odsd_mnist.py) when that config
exists. Columns: final and best test accuracy (held-out 1,000 MNIST digits), accuracy at 25 %,
50 % and 100 % of the steps (read from each run's metrics.jsonl; `eval_every` is set so those
points exist), and the digit (related-source) share of each transfer set. Every run uses the
same teacher, lr (0.05) and cosine schedule; `--steps` / `--batch` shrink all of them alike. The
KD and ODSD rows clip the gradient norm at 5 after a 100-step warmup (kd_mnist.py /
odsd_mnist.py), the EIKD rows clip at 2 without warmup (eikd_mnist.py: its RKD terms need the
tighter clip from step 0).
Also draws benchmarks/results/curves.png (accuracy vs step: EIKD, ODSD, KD on a random subset).
Writes benchmarks/results/offline_eikd.md and prints it. Full protocol (2,000 steps, 3 seeds,
10 variants): about 2.5 h on 2 idle CPU cores.
"""

import argparse
import glob
import json
import os

import harness
import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument(
    "--teacher",
    default="/tmp/kdw/teacher_mnist",
    help="finished LeNet-5 teacher run (configs/teacher_mnist.py)",
)
parser.add_argument("--out", default="/tmp/kd_bench_eikd")
parser.add_argument("--seeds", default="0,1,2")
parser.add_argument("--steps", type=int, default=2000)
parser.add_argument("--batch", type=int, default=128)
parser.add_argument("--evals", type=int, default=20, help="evaluations per run (curve points)")
parser.add_argument(
    "--only",
    nargs="*",
    default=None,
    help="variant names to run, each one argument (names contain commas); others "
    "are tabulated only if already finished",
)
args = parser.parse_args()
seeds = [int(s) for s in args.seeds.split(",")]
if (
    args.steps % args.evals
    or (args.steps // args.evals) * args.evals != args.steps
    or args.evals % 4
):
    raise SystemExit(
        f"--steps={args.steps} must be a multiple of --evals={args.evals}, itself a "
        f"multiple of 4 (so 25 % / 50 % / 100 % of the steps are evaluated)"
    )
eval_every = args.steps // args.evals
common = {
    "num_steps": args.steps,
    "batch_size": args.batch,
    "eval_every": eval_every,
    "log_every": eval_every,
    "checkpoint_every": args.steps,
}
out = os.path.join(args.out, f"steps{args.steps}_batch{args.batch}")

# name -> (config, overrides); the table order. KD on original images sees MNIST itself.
VARIANTS = {
    "KD, original images (upper bound)": ("configs/kd_mnist.py:original", {}),
    "KD, whole pool": ("configs/kd_mnist.py:pool", {}),
    "KD, random subset (N = 4,000)": ("configs/kd_mnist.py:random", {}),
    "DFND: global confidence top-N + KD": ("configs/eikd_mnist.py:dfnd", {}),
    "EIKD": ("configs/eikd_mnist.py", {}),
    "EIKD − class dropping": ("configs/eikd_mnist.py:no_drop", {}),
    "EIKD − feature term": ("configs/eikd_mnist.py:no_feat", {}),
    "EIKD − relation terms": ("configs/eikd_mnist.py:no_rel", {}),
    "EIKD, global instead of balanced": ("configs/eikd_mnist.py:global", {}),
}
if os.path.exists(os.path.join(harness.ROOT, "configs", "odsd_mnist.py")):
    VARIANTS["ODSD"] = ("configs/odsd_mnist.py", {})
# Run the headline comparison first, so a cut-short session still has it.
RUN_ORDER = [
    "EIKD",
    "KD, random subset (N = 4,000)",
    "ODSD",
    "KD, whole pool",
    "DFND: global confidence top-N + KD",
    "EIKD − class dropping",
    "EIKD − relation terms",
    "EIKD − feature term",
    "EIKD, global instead of balanced",
    "KD, original images (upper bound)",
]
only = set(args.only or ())
unknown = only - set(VARIANTS)
if unknown:
    raise SystemExit(f"--only: unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}")


def workdir(name, seed):
    return os.path.join(
        out,
        name.replace(" ", "_")
        .replace(",", "")
        .replace("=", "")
        .replace("(", "")
        .replace(")", "")
        .replace(":", ""),
        f"seed{seed}",
    )


results = {}
for name in [n for n in RUN_ORDER if n in VARIANTS]:
    config, overrides = VARIANTS[name]
    runs = []
    for seed in seeds:
        wd = workdir(name, seed)
        if only and name not in only and not os.path.exists(os.path.join(wd, "results.json")):
            continue
        runs.append(
            (
                wd,
                harness.run(
                    config,
                    wd,
                    {"seed": seed, "teacher.workdir": args.teacher, **common, **overrides},
                ),
            )
        )
    if runs:
        results[name] = runs


# ----- read-outs -----------------------------------------------------------------------------
def curve(wd):
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return {r["step"]: r["accuracy"] for r in rows if "accuracy" in r}


def acc_at(runs, frac):
    step = int(round(frac * args.steps))
    return harness.mean_std([curve(wd).get(step) for wd, _ in runs])


def pool_sources():
    """id -> source tag of the offline pool, from any run's cached teacher pass."""
    for f in sorted(glob.glob(os.path.join(out, "*", "seed*", "pool_scores", "*.npz"))):
        z = np.load(f)
        if "sources" in z:
            files = sorted(glob.glob(os.path.join(os.path.dirname(f), "*.npz")))
            ids = np.concatenate([np.load(g)["ids"] for g in files])
            src = np.concatenate([np.load(g)["sources"] for g in files])
            return dict(zip(ids.tolist(), src.tolist()))
    return None


RELATED = ("sklearn_digits", "font_digits")  # kd_jax.data.offline.RELATED_SOURCES
sources = pool_sources()


def digit_share(runs):
    shares = []
    for wd, r in runs:
        sel = os.path.join(wd, "selection.npz")
        if r.get("config", {}).get("data", {}).get("transfer", {}).get("source") == "original":
            return "MNIST itself"
        if os.path.exists(sel) and sources is not None:
            ids = np.load(sel)["ids"]
            shares.append(np.mean([sources[int(i)] in RELATED for i in ids]))
        elif sources is not None:  # the whole pool
            shares.append(np.mean([s in RELATED for s in sources.values()]))
    return harness.mean_std(shares, 100.0, 1) if shares else "—"


teacher_acc = next(
    (
        r["teacher_accuracy"]
        for runs in results.values()
        for _, r in runs
        if "teacher_accuracy" in r
    ),
    None,
)
columns = {
    "final acc (%)": lambda runs: harness.mean_std([r["final_accuracy"] for _, r in runs]),
    "best (%)": lambda runs: harness.mean_std([r["best_accuracy"] for _, r in runs]),
    "@25 % steps": lambda runs: acc_at(runs, 0.25),
    "@50 %": lambda runs: acc_at(runs, 0.5),
    "@100 %": lambda runs: acc_at(runs, 1.0),
    "digit share of transfer set (%)": digit_share,
    "seeds": lambda runs: str(len(runs)),
    "wall (s)": lambda runs: harness.mean_std([r["wall_seconds"] for _, r in runs], 1.0, 0),
}
ordered = {name: results[name] for name in VARIANTS if name in results}
table = harness.markdown(ordered, columns)
teacher_line = (
    f"| teacher LeNet-5 ({args.teacher}) | {100 * teacher_acc:.2f} | | | | | | | |"
    if teacher_acc is not None
    else ""
)
lines = table.split("\n")
table = "\n".join(lines[:2] + ([teacher_line] if teacher_line else []) + lines[2:])
pool_share = 100 * np.mean([s in RELATED for s in sources.values()]) if sources else np.nan
text = (
    f"Offline benchmark (LeNet-5 -> LeNet-5-half, held-out 1,000 MNIST digits), seeds "
    f"{seeds}, {args.steps} steps of batch {args.batch} for every student, eval every "
    f"{eval_every} steps, teacher {args.teacher}; lr 0.05, cosine; gradient-norm clip 5 "
    f"after a 100-step warmup for KD / ODSD rows, clip 2 and no warmup for EIKD rows. "
    f"Pool: 9,797 images, {pool_share:.1f} % "
    f"digits. Command: `python benchmarks/offline_eikd.py --teacher={args.teacher} "
    f"--seeds={args.seeds} --steps={args.steps} --batch={args.batch}`\n\n{table}\n"
)

# ----- curves.png ----------------------------------------------------------------------------
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

fig = Figure(figsize=(7, 4.5))
FigureCanvasAgg(fig)
ax = fig.add_subplot(1, 1, 1)
for name, colour in (
    ("EIKD", "C0"),
    ("ODSD", "C1"),
    ("KD, random subset (N = 4,000)", "C2"),
    ("KD, whole pool", "C7"),
):
    if name not in ordered:
        continue
    curves = [curve(wd) for wd, _ in ordered[name]]
    steps = sorted(set.intersection(*[set(c) for c in curves]))
    acc = np.array([[c[s] for s in steps] for c in curves]) * 100
    ax.plot(steps, acc.mean(0), colour, label=f"{name} ({len(curves)} seed(s))")
    if len(curves) > 1:
        ax.fill_between(
            steps, acc.mean(0) - acc.std(0), acc.mean(0) + acc.std(0), color=colour, alpha=0.2
        )
if teacher_acc is not None:
    ax.axhline(100 * teacher_acc, color="k", ls="--", lw=1, label="teacher")
ax.set_xlabel("training step")
ax.set_ylabel("test accuracy (%)")
ax.set_title(f"LeNet-5 -> LeNet-5-half, offline pool (batch {args.batch})")
ax.grid(alpha=0.3)
ax.legend(loc="lower right", fontsize=8)
results_dir = os.path.join(harness.ROOT, "benchmarks", "results")
os.makedirs(results_dir, exist_ok=True)
fig.savefig(os.path.join(results_dir, "curves.png"), dpi=120, bbox_inches="tight")

print(text)
with open(os.path.join(results_dir, "offline_eikd.md"), "w") as f:
    f.write(text)
