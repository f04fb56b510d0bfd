"""Runs config variants × seeds through `python -m kd_jax.main` and tabulates results.json.

Each run lives in `<out>/<variant>/seed<k>`; a finished run (results.json present) is not run
again, so a table can be rebuilt or extended cheaply. Used by benchmarks/offline_*.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_FILE = "run.log"  # a run's stdout + stderr, written by `run` beside results.json


def run(config: str, workdir: str, overrides: dict | None = None, quiet: bool = True) -> dict:
    """Trains one config (path relative to the repo, with optional `:arg`) into `workdir`."""
    results = os.path.join(workdir, "results.json")
    if not os.path.exists(results):
        cmd = [
            sys.executable,
            "-m",
            "kd_jax.main",
            f"--config={os.path.join(ROOT, config)}",
            f"--workdir={workdir}",
        ]
        cmd += [f"--config.{k}={v}" for k, v in (overrides or {}).items()]
        print("$", " ".join(cmd), flush=True)
        t = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True)
        if quiet and os.path.isdir(workdir):  # kept: e.g. the pool pass's time is only logged
            with open(os.path.join(workdir, LOG_FILE), "w") as f:
                f.write(f"$ {' '.join(cmd)}\n{proc.stdout or ''}{proc.stderr or ''}")
                f.write(f"# process wall {time.time() - t:.1f} s\n")
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{(proc.stderr or '')[-3000:]}")
        print(f"  done in {time.time() - t:.0f}s", flush=True)
    with open(results) as f:
        return json.load(f)


def run_variants(variants: dict, seeds, out: str, teacher_workdir: str) -> dict:
    """variants: name -> (config, overrides). Returns name -> list of results (one per seed)."""
    table = {}
    for name, (config, overrides) in variants.items():
        table[name] = [
            run(
                config,
                os.path.join(out, name, f"seed{seed}"),
                {"seed": seed, "teacher.workdir": teacher_workdir, **(overrides or {})},
            )
            for seed in seeds
        ]
    return table


def mean_std(values, scale: float = 100.0, digits: int = 2) -> str:
    values = np.asarray([v for v in values if v is not None], float) * scale
    if not len(values):
        return "—"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def markdown(table: dict, columns: dict) -> str:
    """columns: header -> function(list of results) -> str."""
    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, results in table.items():
        lines.append(f"| {name} | " + " | ".join(f(results) for f in columns.values()) + " |")
    return "\n".join(lines)
