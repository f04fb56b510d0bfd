"""A finished run -> a teacher-only workdir: its network's parameters and BatchNorm statistics
(no optimizer state, one checkpoint) and a results.json that `kd_jax.teacher.load_teacher` and
the stage runner read as a finished teacher.

    python -m kd_jax.tools.export_teacher RUN_WORKDIR OUT [--overwrite]

This is how the README demo's bundled teacher (kd_jax/assets/teachers/) was made from a
`configs/teacher_mnist.py` run; the export is written beside OUT and renamed into place, so an
interrupted export leaves OUT as it was.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import uuid

import numpy as np

from kd_jax import fileio


def export(run_workdir: str, out: str, overwrite: bool = False) -> str:
    from kd_jax import checkpoint, prerequisites

    if not prerequisites.finished(run_workdir):
        raise SystemExit(f"{run_workdir!r} holds no finished run (no results.json)")
    out = os.path.abspath(out)
    if os.path.exists(out) and os.listdir(out) and not overwrite:
        raise SystemExit(f"OUT={out!r} exists and is not empty; pass --overwrite to replace it")
    info = fileio.read_json(fileio.join(run_workdir, "results.json"))
    variables = checkpoint.load_variables(run_workdir)
    state = {
        "step": np.asarray(0, np.int32),
        "params": {"model": variables["params"]["model"]},
        "batch_stats": {"model": variables["batch_stats"].get("model", {})},
        "opt_state": {},
    }
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.export-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    try:
        ckpt = checkpoint.Checkpointer(tmp, keep=1, async_save=False)
        ckpt.save(0, state, force=True)
        ckpt.close()
        keys = ("method", "model", "num_classes", "final_accuracy", "best_accuracy", "steps")
        results = {k: info[k] for k in keys if k in info}
        results["exported_from"] = os.path.abspath(run_workdir)
        results["config"] = info.get("config", {})
        fileio.write_json_atomic(os.path.join(tmp, "results.json"), results)
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_workdir")
    p.add_argument("out")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    print(export(args.run_workdir, args.out, args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
