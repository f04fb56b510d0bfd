"""What each data-free method costs on the offline MNIST-5k benchmark (issue 22): accuracy, wall
time, training FLOPs, trainable parameters beside the student, and accuracy at ODSD's compute.

    python benchmarks/offline_cost.py --teacher /tmp/kd/teacher_lenet --seeds 0 1 2
    python benchmarks/offline_cost.py --pair wrn --out /tmp/kd/offline_odsd_wrn --seeds 0 1 2
    python benchmarks/offline_cost.py --flops-only [--pair wrn]      # compile-only, no training

Methods (`--only` keys): kd_random (KD on a random 4,000-image pool subset, kd_mnist.py:random),
dfnd (odsd_mnist.py:dfnd), eikd (eikd_mnist.py), odsd (odsd_mnist.py), dafl (dafl_mnist.py),
dfad (dfad_mnist.py) and, with `--pair wrn` (WRN-10-1 -> WRN-10-1-half, the bundled teacher
kd_jax/assets/teachers/mnist5k_wrn10_1), deepinv (dfad_mnist.py:wrn,deepinv). The pool methods
take the pair as model overrides and their run directories are named as benchmarks/offline_odsd.py
names them, so `--out /tmp/kd/offline_odsd_wrn` reuses its finished WRN runs.
Steps: the pool methods 400 (the README tables), the generator methods their config's
num_steps; `--steps` sets every method, `--generator-steps` the generator methods.

Accounting (compile-only, benchmarks/xla_cost.py; never a timed or executed step):
* step FLOPs: XLA's cost analysis of the method's compiled train step on one device (teacher
  forward + student forward/backward + losses + optimizer; a generator step's g_steps generator
  updates and s_steps student updates are all inside it), × steps;
* pool pass: the teacher's eval-mode forward FLOPs per image (cost analysis of that compiled
  forward) × pool images × the passes the method's selection needs: 1 for DFND, EIKD and ODSD;
  0 for KD on a random subset (its run scores the pool only for its report; the draw needs no
  teacher). ODSD's diagnostic second pass (selection_quality.png) is switched off in these runs
  (`odsd.diagnostics.quality_plot=False`: it changes no result) and never counted;
* not counted: evaluation (the same 1,000 test digits for every method), start-up, the teacher's
  own training (shared by all).
Cumulative FLOPs at step s = pool-pass FLOPs + s × step FLOPs. Accuracy at equal compute: each
run's eval records (metrics.jsonl, every steps/--evals steps) as (cumulative FLOPs, accuracy),
linearly interpolated at ODSD's total FLOPs B; a run whose total is below B reports its final
accuracy (marked *: it had finished), a run whose first eval lies beyond B reports —.
Wall time: the training loop's wall seconds (results.json: steps, evaluations and the step's
compilation; start-up and the pool pass excluded) and, apart, the pool pass's seconds when the
run's log (run.log, written by harness.run) holds them.
Writes benchmarks/results/offline_cost.md (offline_cost_wrn.md) and cost.png (cost_wrn.png):
accuracy vs cumulative FLOPs and vs wall seconds, one line per method, the band the range over
seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import xla_cost  # noqa: E402

PAIRS = {
    "lenet": ("lenet5", "lenet5_half", "LeNet-5 -> LeNet-5-half"),
    "wrn": ("wrn10_1", "wrn10_1_half", "WRN-10-1 -> WRN-10-1-half"),
}
SAMPLING_STEPS = 400  # the README's offline tables


@dataclasses.dataclass(frozen=True)
class Method:
    label: str
    config: str  # configs/<file>[:arg]
    generator: bool
    passes: int  # teacher passes over the pool that the method's selection needs
    dirname: str  # offline_odsd.py's run directory name where it has the row
    pairs: tuple = ("lenet", "wrn")


METHODS = {
    "odsd": Method("ODSD", "configs/odsd_mnist.py", False, 1, "ODSD"),
    "kd_random": Method(
        "KD, random pool subset (N = 4,000)",
        "configs/kd_mnist.py:random",
        False,
        0,
        "KD_random_pool_subset_N",
    ),
    "dfnd": Method(
        "DFND (global confidence top-N, KD)",
        "configs/odsd_mnist.py:dfnd",
        False,
        1,
        "DFND-style_global_confidence_top-N",
    ),
    "eikd": Method("EIKD", "configs/eikd_mnist.py", False, 1, "EIKD"),
    "dafl": Method("DAFL (generator)", "configs/dafl_mnist.py", True, 0, "DAFL"),
    "dfad": Method("DFAD (generator)", "configs/dfad_mnist.py", True, 0, "DFAD"),
    "deepinv": Method(
        "DeepInversion (generator)",
        "configs/dfad_mnist.py:deepinv",
        True,
        0,
        "DeepInversion",
        pairs=("wrn",),
    ),
}


def config_spec(key: str, pair: str) -> tuple[str, dict]:
    """(config[:arg], overrides) of method `key` on `pair`, without steps, seed or teacher."""
    m = METHODS[key]
    config, overrides = m.config, {}
    if pair == "wrn":
        if m.generator:  # the generator configs' own `wrn` (also the activation feature)
            path, _, arg = config.partition(":")
            config = f"{path}:{','.join(['wrn'] + ([arg] if arg else []))}"
        else:  # model overrides, as benchmarks/offline_odsd.py --pair wrn
            teacher, student, _ = PAIRS[pair]
            overrides = {"model.name": student, "teacher.model": teacher}
    if m.config.startswith("configs/odsd_mnist.py"):
        overrides["odsd.diagnostics.quality_plot"] = False  # a diagnostic pass, not counted
    return config, overrides


def load_config(config: str, overrides: dict):
    from kd_jax import config_utils

    path, _, arg = config.partition(":")
    c = config_utils.load_config(os.path.join(harness.ROOT, path), arg or None)
    c.update_from_flattened_dict(overrides)
    return c


def default_steps(key: str, pair: str, args) -> int:
    m = METHODS[key]
    if m.generator and args.generator_steps:
        return args.generator_steps
    if args.steps:
        return args.steps
    if m.generator:
        return int(load_config(*config_spec(key, pair)).num_steps)
    return SAMPLING_STEPS


def run_overrides(key: str, pair: str, steps: int, evals: int) -> dict:
    every = max(1, steps // evals)
    return {
        **config_spec(key, pair)[1],
        "num_steps": steps,
        "eval_every": every,
        "log_every": every,
        "checkpoint_every": steps,
    }


# ----- FLOPs (compile-only) ----------------------------------------------------------------------


def pool_size(spec) -> int:
    """Images in the pool of `config.data.transfer` (the bundled pool: 9,797)."""
    from kd_jax.data import offline

    if spec.source != "offline_pool":
        raise ValueError(f"the cost table counts the bundled offline pool, not {spec.source!r}")
    return int(sum(offline.pool_sizes().values()))


def pool_pass_flops(config, passes: int, images: int | None = None) -> dict:
    """The teacher's pool passes: forward FLOPs per image (compile-only) × images × passes;
    `images` defaults to the config's pool."""
    if not passes:
        return {"teacher_flops_per_image": 0.0, "pool_images": 0, "passes": 0, "pool_flops": 0.0}
    per_image = xla_cost.teacher_forward_flops(config)
    images = pool_size(config.data.transfer) if images is None else images
    return {
        "teacher_flops_per_image": per_image,
        "pool_images": images,
        "passes": passes,
        "pool_flops": per_image * images * passes,
    }


def method_cost(key: str, pair: str, steps: int) -> dict:
    """Step FLOPs, pool-pass FLOPs and extra parameters of method `key`: lower + compile only."""
    c = load_config(*config_spec(key, pair))
    c.num_steps = steps  # the schedule's length (does not change the step's cost)
    return {
        **xla_cost.step_cost(c),
        **pool_pass_flops(c, METHODS[key].passes),
        "steps": steps,
        "batch_size": int(c.batch_size),
    }


def total_flops(cost: dict, steps: int | None = None) -> float:
    return cost["pool_flops"] + (cost["steps"] if steps is None else steps) * cost["flops"]


# ----- curves and equal compute -------------------------------------------------------------------


def accuracy_at(flops, accuracy, budget: float) -> tuple[float | None, str]:
    """Accuracy of an eval curve (cumulative FLOPs ascending, accuracies) at `budget` FLOPs:
    linear interpolation between the two eval records that bracket it ("interpolated"); the
    final accuracy when the run's last record lies at or below the budget ("finished"); None
    when the first record already lies beyond it ("before first eval")."""
    flops, accuracy = np.asarray(flops, float), np.asarray(accuracy, float)
    if not len(flops):
        return None, "no eval"
    if budget >= flops[-1]:
        return float(accuracy[-1]), "finished"
    if budget < flops[0]:
        return None, "before first eval"
    return float(np.interp(budget, flops, accuracy)), "interpolated"


def read_curve(workdir: str) -> list[dict]:
    """The eval records of a run's metrics.jsonl: [{step, accuracy, wall_seconds}]."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        for line in f:
            try:
                r = json.loads(line)
            except ValueError:
                continue
            if "accuracy" in r:
                out.append({k: r.get(k) for k in ("step", "accuracy", "wall_seconds")})
    return sorted(out, key=lambda r: r["step"])


def pool_pass_seconds(workdir: str) -> float | None:
    """Seconds of the run's first pool pass (its log line), when harness.run kept the log."""
    path = os.path.join(workdir, harness.LOG_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        found = re.findall(r"scored \d+ images in ([\d.]+)s \([^)]*teacher pass", f.read())
    return float(found[0]) if found else None


# ----- the table and the plot ---------------------------------------------------------------------


def _fmt_flops(x: float | None, unit: float, digits: int = 3) -> str:
    return "—" if x is None else f"{x / unit:.{digits}g}"


def write_table(rows: dict, costs: dict, args, argv, teacher_acc) -> str:
    budget = total_flops(costs["odsd"]) if "odsd" in costs else None
    lines = [
        "| method | steps × batch | accuracy (%) | per seed | training wall / run (s) "
        "| pool pass (s) | GFLOP / step | pool pass GFLOP (passes) | total TFLOP (× ODSD) "
        "| trainable params beside the student | accuracy at ODSD's compute (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if teacher_acc is not None:
        lines.append(
            f"| teacher ({PAIRS[args.pair][0]}) | — | {100 * teacher_acc:.1f} "
            "| — | — | — | — | — | — | — | — |"
        )
    acc_text = lambda vals: (
        f"{100 * vals[0]:.1f}" if len(vals) == 1 else harness.mean_std(vals, digits=1)
    )
    for key, runs in rows.items():
        cost = costs[key]
        accs = [r["final_accuracy"] for r in runs]
        walls = [r["wall_seconds"] for r in runs]
        passes = [r["pool_seconds"] for r in runs if r["pool_seconds"] is not None]
        at = [r["at_budget"] for r in runs]
        if budget is None:
            eq = "—"
        elif all(v is None for v, _ in at):  # where its curve starts instead
            first = [r["curve"][0] for r in runs if r["curve"]]
            x = total_flops(cost, first[0]["step"]) / budget if first else None
            eq = "—" + (
                f" (first eval {x:.2g}× B: {acc_text([p['accuracy'] for p in first])})"
                if first
                else ""
            )
        else:
            vals = [v for v, _ in at if v is not None]
            star = "*" if any(s == "finished" for _, s in at) and key != "odsd" else ""
            eq = acc_text(vals) + star
        pool = f"{cost['pool_flops'] / 1e9:.3g} ({cost['passes']})" if cost["passes"] else "0 (0)"
        seconds = "—"
        if passes:  # a pass the method does not need (KD's report) is shown, not counted
            seconds = f"{np.mean(passes):.0f}" + ("" if cost["passes"] else " (report only)")
        total = _fmt_flops(total_flops(cost), 1e12)
        if budget:
            total += f" ({total_flops(cost) / budget:.2g}×)"
        extra = f"{cost['extra_params']:,}"
        if cost["extra_modules"]:
            extra += f" ({', '.join(cost['extra_modules'])})"
        lines.append(
            f"| {METHODS[key].label} | {cost['steps']:,} × {cost['batch_size']} "
            f"| {acc_text(accs)} | {' / '.join(f'{100 * a:.1f}' for a in accs)} "
            f"| {np.mean(walls):.0f} | {seconds} "
            f"| {_fmt_flops(cost['flops'], 1e9)} | {pool} | {total} | {extra} | {eq} |"
        )
    title = PAIRS[args.pair][2]
    command = shlex.join(argv if argv is not None else sys.argv[1:])
    budget_text = (
        f"{budget / 1e12:.3g} TFLOP" if budget is not None else "— (no ODSD row)"
    )  # fmt: skip
    text = "\n".join(
        [
            f"# Offline cost table: {title}",
            "",
            f"Bundled offline benchmark (kd_jax/data/offline.py), held-out MNIST-5k test split "
            f"(1,000 digits); accuracy mean ± std over seeds {args.seeds}. Command: "
            f"`python benchmarks/offline_cost.py {command}`. How each column is counted: "
            f"benchmarks/offline_cost.py's docstring (FLOPs from XLA's cost analysis of the "
            f"compiled step × steps + the teacher's pool pass where the selection needs it; "
            f"evaluation not counted). ODSD's total compute B = {budget_text}; the last column "
            f"is each run's accuracy at B, linearly interpolated in cumulative FLOPs between its "
            f"eval records; * = a run that finished below B (its final accuracy); — = a run whose "
            f"first eval already lies beyond B (where that eval lies and its accuracy in brackets).",
            "",
            *lines,
            "",
        ]
    )
    os.makedirs(os.path.join(harness.ROOT, "benchmarks", "results"), exist_ok=True)
    suffix = "" if args.pair == "lenet" else f"_{args.pair}"
    with open(os.path.join(harness.ROOT, "benchmarks", "results", f"offline_cost{suffix}.md"), "w") as f:  # fmt: skip
        f.write(text)
    return text


def plot(rows: dict, costs: dict, args) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_f, ax_w) = plt.subplots(1, 2, figsize=(12, 5.2))
    for key, runs in rows.items():
        steps = sorted({p["step"] for r in runs for p in r["curve"]})
        # per eval step, the seeds' accuracies and wall seconds (a seed missing a step: skipped)
        acc, wall = [], []
        for s in steps:
            pts = [p for r in runs for p in r["curve"] if p["step"] == s]
            acc.append([100 * p["accuracy"] for p in pts])
            wall.append(
                np.mean(
                    [
                        (r["counted_pool_seconds"] or 0.0) + p["wall_seconds"]
                        for r in runs
                        for p in r["curve"]
                        if p["step"] == s
                    ]
                )
            )
        x = np.array([total_flops(costs[key], s) for s in steps])
        mean = np.array([np.mean(a) for a in acc])
        lo, hi = np.array([min(a) for a in acc]), np.array([max(a) for a in acc])
        for ax, xs in ((ax_f, x), (ax_w, np.array(wall))):
            (line,) = ax.plot(xs, mean, marker="o", ms=3, label=METHODS[key].label)
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
    if "odsd" in costs:
        ax_f.axvline(total_flops(costs["odsd"]), color="k", ls="--", lw=0.8, label="ODSD's total")
    ax_f.set_xscale("log")
    ax_f.set_xlabel("cumulative training FLOPs (XLA cost analysis; incl. the pool pass)")
    ax_w.set_xlabel("wall seconds (counted pool pass + training loop incl. compilation)")
    for ax in (ax_f, ax_w):
        ax.set_ylabel("student test accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = ax_f.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(
        f"Offline benchmark, {PAIRS[args.pair][2]}: seeds {args.seeds} (band: min-max)", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.1, 1, 1))  # room for the legend below the panels
    suffix = "" if args.pair == "lenet" else f"_{args.pair}"
    path = os.path.join(harness.ROOT, "benchmarks", "results", f"cost{suffix}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----- main ---------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="lenet")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--steps", type=int, default=0, help="steps of every method (0: per method)")
    p.add_argument("--generator-steps", type=int, default=0, help="steps of generator methods")
    p.add_argument("--evals", type=int, default=8, help="eval records per run (curve points)")
    p.add_argument("--out", default="", help="runs' root (default /tmp/kd/offline_cost[_wrn])")
    p.add_argument("--teacher", default="", help="finished teacher run of the pair's teacher")
    p.add_argument("--only", nargs="*", default=None, help=f"method keys of {list(METHODS)}")
    p.add_argument(
        "--flops-only", action="store_true", help="print the FLOPs accounting (compile only)"
    )
    args = p.parse_args(argv)
    keys = [k for k in METHODS if args.pair in METHODS[k].pairs]
    unknown = set(args.only or ()) - set(keys)
    if unknown:
        p.error(f"--only: unknown for --pair {args.pair}: {sorted(unknown)}; choose from {keys}")
    args.keys = [k for k in keys if args.only is None or k in args.only]
    args.out = args.out or f"/tmp/kd/offline_cost{'' if args.pair == 'lenet' else '_wrn'}"
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    steps = {k: default_steps(k, args.pair, args) for k in args.keys}
    costs = {}
    for k in args.keys:
        costs[k] = method_cost(k, args.pair, steps[k])
        c = costs[k]
        print(
            f"{k:10s} {c['flops'] / 1e9:9.3f} GFLOP/step × {c['steps']} steps "
            f"(batch {c['batch_size']}) + pool {c['pool_flops'] / 1e9:.3f} GFLOP "
            f"({c['passes']} × {c['pool_images']} images × "
            f"{c['teacher_flops_per_image'] / 1e6:.3f} MFLOP) = "
            f"{total_flops(c) / 1e12:.3f} TFLOP; params beside the student "
            f"{c['extra_params']:,} (student {c['student_params']:,})",
            flush=True,
        )
    if args.flops_only:
        return

    from kd_jax import config_utils

    teacher = args.teacher
    if not teacher:
        if args.pair == "wrn":
            teacher = config_utils.bundled_teacher("mnist5k_wrn10_1")
        else:
            teacher = os.path.join(args.out, "teacher")
            harness.run("configs/teacher_mnist.py", teacher, {"model.name": PAIRS["lenet"][0]})
    with open(os.path.join(teacher, "results.json")) as f:
        t = json.load(f)
    if t["config"]["model"]["name"] != PAIRS[args.pair][0]:
        raise SystemExit(f"--teacher {teacher} is not a {PAIRS[args.pair][0]}")

    budget = None
    rows = {}
    for k in args.keys:  # ODSD first: its total is the equal-compute budget
        config, _ = config_spec(k, args.pair)
        overrides = run_overrides(k, args.pair, steps[k], args.evals)
        results = harness.run_variants(
            {METHODS[k].dirname: (config, overrides)}, args.seeds, args.out, teacher
        )[METHODS[k].dirname]
        if k == "odsd":
            budget = total_flops(costs[k])
        runs = []
        for seed, r in zip(args.seeds, results, strict=True):
            wd = os.path.join(args.out, METHODS[k].dirname, f"seed{seed}")
            if r["steps"] != steps[k]:
                raise SystemExit(f"{wd} ran {r['steps']} steps, not {steps[k]}: another --out")
            curve = read_curve(wd)
            seconds = pool_pass_seconds(wd)
            at = (None, "no budget")
            if budget is not None:
                at = accuracy_at(
                    [total_flops(costs[k], p["step"]) for p in curve],
                    [p["accuracy"] for p in curve],
                    budget,
                )
            runs.append(
                {
                    "final_accuracy": r["final_accuracy"],
                    "wall_seconds": r["wall_seconds"],
                    "pool_seconds": seconds,
                    "counted_pool_seconds": seconds if costs[k]["passes"] else 0.0,
                    "curve": curve,
                    "at_budget": at,
                }
            )
        rows[k] = runs
        text = write_table(rows, costs, args, argv, t.get("final_accuracy"))
        plot(rows, costs, args)  # after every method, so a cut-short run leaves both
    print(text)


if __name__ == "__main__":
    main()
