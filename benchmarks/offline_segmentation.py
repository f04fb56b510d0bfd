"""The offline segmentation table (README "Segmentation"): small DeepLabV3-ResNet teacher ->
small DeepLabV3-MobileNetV2 student on SegMNIST, every student from one finished teacher.

    python benchmarks/offline_segmentation.py --teacher DIR [--seeds 0 1 2] [--steps 1500] \
        [--only ODSD ...] [--out /tmp/kd/offline_segmentation]

Rows: the teacher · KD on the SegMNIST train canvases (upper bound) · KD on the whole 5,000-canvas
pool · KD on a random pool subset of N = 2,000 · ODSD (configs/odsd_segmnist.py) and its
ablations. Columns: mIoU and pixel accuracy on the 1,000 held-out test canvases (mean ± std over
seeds), the share of digit canvases in the transfer set, wall time per run. The teacher is
trained once into <out>/teacher unless --teacher names a finished configs/teacher_segmnist.py
run. Finished runs are reused, and rows that earlier `--only` invocations finished in the same
--out (every seed, the same --steps) stay in the table. Writes
benchmarks/results/offline_segmentation.md (offline_segmentation_s<steps>.md with --steps) and
prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

VARIANTS = {
    "KD, original canvases (upper bound)": "configs/kd_segmnist.py:original",
    "KD, whole pool": "configs/kd_segmnist.py:pool",
    "KD, random pool subset (N)": "configs/kd_segmnist.py:random",
    "ODSD": "configs/odsd_segmnist.py",
    "ODSD w/o APS (random N)": "configs/odsd_segmnist.py:no_aps",
    "ODSD w/o LNR": "configs/odsd_segmnist.py:no_lnr",
    "ODSD losses on the whole pool": "configs/odsd_segmnist.py:all",
}
# most informative rows first, so a partial table is already the comparison the issue asks for
RUN_ORDER = [
    "ODSD",
    "KD, random pool subset (N)",
    "KD, whole pool",
    "ODSD w/o APS (random N)",
    "ODSD w/o LNR",
    "ODSD losses on the whole pool",
    "KD, original canvases (upper bound)",
]


def _key(name: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in name).strip("_")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=0, help="override num_steps (0: config)")
    parser.add_argument("--out", default="/tmp/kd/offline_segmentation")
    parser.add_argument("--teacher", default="", help="finished teacher_segmnist.py workdir")
    parser.add_argument("--only", nargs="*", default=None, help="run only these row names")
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--only: unknown rows {sorted(unknown)}; rows: {list(VARIANTS)}")

    teacher = args.teacher or os.path.join(args.out, "teacher")
    if not args.teacher:
        harness.run("configs/teacher_segmnist.py", teacher)
    with open(os.path.join(teacher, "results.json")) as f:
        t = json.load(f)
    if t["config"]["model"]["name"] != "deeplabv3_resnet_small":
        raise SystemExit(f"--teacher {teacher} is not a configs/teacher_segmnist.py run")

    names = [n for n in RUN_ORDER if args.only is None or n in args.only]
    extra = {"num_steps": args.steps} if args.steps else {}
    # rows an earlier --only invocation finished in the same --out stay in the table
    done = {n: rs for n in VARIANTS if n not in names and (rs := _finished(args, n))}
    table = {"teacher (deeplabv3_resnet_small)": [t], **done}
    if done:
        _write(table, args, argv)
    for name in names:
        key = _key(name)
        done[name] = harness.run_variants(
            {key: (VARIANTS[name], extra)}, args.seeds, args.out, teacher
        )[key]
        table = {
            "teacher (deeplabv3_resnet_small)": [t],
            **{k: done[k] for k in VARIANTS if k in done},
        }
        _write(table, args, argv)  # after every row, so a partial table survives


def _finished(args, name):
    """The results of row `name` in --out when every seed finished it at --steps, else None."""
    results = []
    for seed in args.seeds:
        path = os.path.join(args.out, _key(name), f"seed{seed}", "results.json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            r = json.load(f)
        if args.steps and r.get("steps") != args.steps:
            return None
        results.append(r)
    return results


def _share(r):
    """Digit-canvas share of the transfer set: a pool selection reports it; KD on the whole pool
    has the pool's share (reported by any selection of the same pool); the originals are 1."""
    if r.get("method") == "teacher":  # trained on the labelled canvases, no transfer set
        return None
    sel = r.get("selection") or {}
    if "selection_related_share" in sel:
        return sel["selection_related_share"]
    transfer = r.get("config", {}).get("data", {}).get("transfer", {})
    if transfer.get("source") == "original":
        return 1.0
    return None


def _write(table, args, argv):
    pool_share = next(
        (
            r["selection"]["pool_related_share"]
            for rs in table.values()
            for r in rs
            if "pool_related_share" in (r.get("selection") or {})
        ),
        None,
    )

    def share(rs):
        values = []
        for r in rs:
            s = _share(r)
            transfer = r.get("config", {}).get("data", {}).get("transfer", {})
            if s is None and r.get("method") != "teacher" and transfer.get("subset") == "all":
                s = pool_share
            values.append(s)
        return harness.mean_std(values, digits=1) if None not in values else "—"

    columns = {
        "mIoU (%)": lambda rs: harness.mean_std([r.get("miou") for r in rs]),
        "pixel acc. (%)": lambda rs: harness.mean_std([r.get("pixel_accuracy") for r in rs]),
        "digit-canvas share of transfer set (%)": share,
        "wall time / run (s)": lambda rs: (
            f"{np.mean([r['wall_seconds'] for r in rs]):.0f}" if "wall_seconds" in rs[0] else "—"
        ),
    }
    steps = args.steps or "config default (1,500)"
    text = "\n".join(
        [
            "# Offline segmentation benchmark: SegMNIST, DeepLabV3-ResNet-small -> "
            "DeepLabV3-MobileNetV2-small",
            "",
            "mIoU / pixel accuracy over the 11 classes (10 digits + background) on the 1,000 "
            "SegMNIST test canvases (held-out digits), mean ± std over seeds "
            f"{args.seeds}; N = 2,000 of the 5,000-canvas pool; steps: {steps}, batch 32. "
            "Command: `python benchmarks/offline_segmentation.py "
            f"{shlex.join(argv if argv is not None else sys.argv[1:])}`.",
            "",
            *harness.markdown(table, columns).splitlines(),
            "",
        ]
    )
    name = f"offline_segmentation_s{args.steps}.md" if args.steps else "offline_segmentation.md"
    path = os.path.join(harness.ROOT, "benchmarks", "results", name)
    with open(path, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
