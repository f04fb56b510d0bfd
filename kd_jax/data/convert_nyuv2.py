"""DFAD-format NYUv2 (13 classes) -> kd_jax segmentation `.npz` files (`images` + `masks`).

    python -m kd_jax.data.convert_nyuv2 --root=NYU_ROOT --out=DIR [--short_side=0]

NYU_ROOT is laid out as DFAD's `dataset/nyu.py` reads it: `nyuv2-meta-data/splits.mat`
(`trainNdxs` 795 / `testNdxs` 654, 1-based), images `480_640/IMAGE/<idx - 1>.png` and labels
`nyuv2-meta-data/<split>_labels_13/new_nyu_class13_<idx:04d>.png` (0 = unlabeled, 1..13 the
classes). DFAD maps a label l to `[255, 0, 1, ..., 12][l]`: unlabeled becomes the ignore index
255 and the classes 0..12; so does this tool. It writes `DIR/nyuv2_train.npz` and
`DIR/nyuv2_test.npz` (uint8 `images` [N,H,W,3], `masks` [N,H,W]); `--short_side=S` resizes
each pair first (image bilinear, mask nearest) so the shorter side is S. A config reads them
with `data.target.source = "npz"`, `data.target.path = "DIR/nyuv2_{split}.npz"`,
`data.target.task = "segmentation"`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np

SPLITS = ("train", "test")


def _resize(image, mask, short_side):
    from PIL import Image

    h, w = mask.shape
    scale = short_side / min(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    mask = np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST))
    return image, mask


def convert_split(root: str, split: str, short_side: int = 0) -> dict:
    """{"images", "masks"} of one split of a DFAD-format NYUv2 root."""
    from PIL import Image
    from scipy.io import loadmat

    meta = os.path.join(root, "nyuv2-meta-data")
    splits_file = os.path.join(meta, "splits.mat")
    if not os.path.isfile(splits_file):
        raise FileNotFoundError(f"{splits_file!r} is missing (DFAD's nyuv2-meta-data/splits.mat)")
    idxs = loadmat(splits_file)[f"{split}Ndxs"].reshape(-1)
    lut = np.array([255] + list(range(13)) + [255] * 242, np.uint8)  # DFAD's train_idx
    images, masks = [], []
    for idx in idxs:
        image_path = os.path.join(root, "480_640", "IMAGE", f"{idx - 1}.png")
        label_path = os.path.join(meta, f"{split}_labels_13", f"new_nyu_class13_{idx:04d}.png")
        for p in (image_path, label_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"NYUv2 {split} index {idx}: {p!r} is missing")
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"), np.uint8)
        with Image.open(label_path) as im:
            label = np.asarray(im, np.uint8)
        if label.ndim != 2 or label.shape != image.shape[:2]:
            raise ValueError(f"{label_path!r}: a {label.shape} label for a {image.shape} image")
        mask = lut[label]
        if short_side:
            image, mask = _resize(image, mask, short_side)
        images.append(image)
        masks.append(mask)
    return {"images": np.stack(images), "masks": np.stack(masks)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kd_jax.data.convert_nyuv2", description=__doc__)
    p.add_argument("--root", required=True, help="DFAD-format NYUv2 folder")
    p.add_argument("--out", required=True, help="folder for nyuv2_{train,test}.npz")
    p.add_argument("--short_side", type=int, default=0, help="resize (0 = keep 480x640)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    for split in SPLITS:
        d = convert_split(args.root, split, args.short_side)
        path = os.path.join(args.out, f"nyuv2_{split}.npz")
        np.savez(path, **d)
        share = float(np.mean(d["masks"] == 255))
        print(f"{split}: {len(d['images'])} images {d['images'].shape[1:]} -> {path} "
              f"(ignore pixels {share:.3f})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
