"""What a SegMNIST teacher says about each transfer set: how much per-pixel signal beyond
"background" a KD student receives from the original canvases, the pool, its sources and the
selections of finished runs (README "Segmentation": why the pool students stay background-only).

    python benchmarks/segmentation_transfer_sets.py --teacher /tmp/seg/teacher_noflip \
        --runs ODSD=/tmp/kd/offline_segmentation_noflip_s1500/ODSD/seed0 ...

Per set, over its canvases (teacher in eval mode, the teacher run's normalisation): the share of
pixels whose teacher argmax is a digit (not background), the share of canvases with any, the
mean non-background probability mass per pixel at τ = 1 and at τ = 4 (kd_segmnist.py's KD
temperature), the teacher's mean max-probability on its digit pixels, and, for the labelled
train canvases, the share of true digit pixels. `--runs NAME=WORKDIR`: a finished pool-selection
run (its selection.npz). Writes benchmarks/results/segmentation_transfer_sets.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BACKGROUND = 10  # SegMNIST's background class (kd_jax.data.segmnist)
BATCH = 250


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="finished teacher_segmnist.py workdir")
    parser.add_argument("--runs", nargs="*", default=[], help="NAME=WORKDIR of selection runs")
    args = parser.parse_args(argv)

    import jax

    from kd_jax import inference, models, parallel
    from kd_jax.data import pipeline, segmnist
    from kd_jax.teacher import model_variables

    with open(os.path.join(args.teacher, "results.json")) as f:
        info = json.load(f)
    norm = info["config"]["data"]["normalization"]
    mean, std = (np.asarray(v, np.float32) for v in pipeline.NORMALIZATION[norm])
    model = models.create_model(info["model"], info["num_classes"])
    mesh = parallel.make_mesh(jax.devices()[:1])
    variables = parallel.replicate(model_variables(args.teacher), mesh)

    def per_batch(v, batch):
        logits, _ = model.apply(v, batch["image"], train=False)
        m = batch["mask"][:, None, None]
        p1, p4 = jax.nn.softmax(logits, -1), jax.nn.softmax(logits / 4.0, -1)
        digit = (p1.argmax(-1) != BACKGROUND) * m
        return {
            "pixels": m.sum() * logits.shape[1] * logits.shape[2],
            "canvases": m.sum(),
            "digit_pixels": digit.sum(),
            "canvases_with_digits": (digit.max(axis=(1, 2)) * batch["mask"]).sum(),
            "mass_tau1": ((1 - p1[..., BACKGROUND]) * m).sum(),
            "mass_tau4": ((1 - p4[..., BACKGROUND]) * m).sum(),
            "digit_confidence": (p1.max(-1) * digit).sum(),
            "true_digit_pixels": ((batch["label"] != BACKGROUND) * m).sum(),
        }

    apply = inference.BatchedApply(per_batch, mesh)

    def row(images, masks=None):
        x = (images.astype(np.float32) / 255.0 - mean) / std
        labels = masks if masks is not None else np.full(images.shape[:3], BACKGROUND, np.uint8)
        pad = -len(x) % BATCH  # zero canvases with mask 0: one compilation
        x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
        labels = np.concatenate([labels, np.zeros((pad,) + labels.shape[1:], labels.dtype)])
        real = np.arange(len(x)) < len(images)
        batches = (
            {
                "image": x[i : i + BATCH],
                "label": labels[i : i + BATCH].astype(np.int32),
                "mask": real[i : i + BATCH].astype(np.float32),
            }
            for i in range(0, len(x), BATCH)
        )
        s = apply.sums(variables, batches=batches)
        cells = [
            f"{len(images):,}",
            f"{100 * s['digit_pixels'] / s['pixels']:.2f}",
            f"{100 * s['canvases_with_digits'] / s['canvases']:.1f}",
            f"{100 * s['mass_tau1'] / s['pixels']:.2f}",
            f"{100 * s['mass_tau4'] / s['pixels']:.2f}",
            f"{s['digit_confidence'] / max(s['digit_pixels'], 1):.3f}",
            f"{100 * s['true_digit_pixels'] / s['pixels']:.2f}" if masks is not None else "—",
        ]
        return cells

    rows = []
    train = segmnist.canvases("train")
    rows.append(("SegMNIST train canvases (KD original)", row(train["images"], train["masks"])))
    pool = segmnist.build_pool()
    rows.append(("pool, all canvases (KD whole pool)", row(pool["images"])))
    for source in np.unique(pool["sources"]):
        rows.append((f"pool source `{source}`", row(pool["images"][pool["sources"] == source])))
    for spec in args.runs:
        name, _, workdir = spec.partition("=")
        with np.load(os.path.join(workdir, "selection.npz")) as z:
            ids = z["ids"]
        rows.append((f"selection of {name}", row(pool["images"][ids])))

    header = (
        "| transfer set | canvases | teacher-digit pixels (%) | canvases with any (%) | "
        "non-background mass τ = 1 (%) | τ = 4 (%) | teacher confidence on its digit pixels | "
        "true digit pixels (%) |\n|---|---|---|---|---|---|---|---|"
    )
    table = "\n".join([header] + [f"| {n} | " + " | ".join(c) + " |" for n, c in rows])
    text = (
        "# SegMNIST transfer sets seen by the teacher\n\n"
        f"Teacher: {args.teacher} ({info['model']}, mIoU {100 * info.get('miou', float('nan')):.2f}"
        " %). Command: `python benchmarks/segmentation_transfer_sets.py "
        f"{shlex.join(argv if argv is not None else sys.argv[1:])}`.\n\n{table}\n"
    )
    path = os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", "segmentation_transfer_sets.md"
    )
    with open(path, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
