"""Class splits of novel class discovery: which labels are known and which novel, relabeled.

`class_split(config)` reads the split from `config.ncd` (the keys in `SPLIT_KEYS`);
`remap_labels` maps the original labels to 0..C_l-1 (known) and C_l..C_l+C_u-1 (novel);
`hide_labels` makes a stream unlabeled (label -1).
"""

from __future__ import annotations

import numpy as np

from kd_jax import fileio
from kd_jax.data.pipeline import tf  # imported at first use

# The `config.ncd` keys that define the split (a stage-1 run must share them with stage 2).
SPLIT_KEYS = (
    "known_classes",
    "novel_classes",
    "classes",
    "classes_file",
    "subset_seed",
    "total_classes",
    "num_known",
    "num_novel",
)


def read_classes_file(path: str, spec) -> list[int]:
    """One class per line: an integer label, or a class name resolved through the TFDS label
    feature of `spec` (e.g. ImageNet WordNet ids `n01558993`)."""
    if not fileio.isfile(path):
        raise FileNotFoundError(f"config.ncd.classes_file={path!r} does not exist")
    names = [
        line.strip()
        for line in fileio.read_text(path).splitlines()
        if line.strip() and not line.startswith("#")
    ]
    if all(n.lstrip("-").isdigit() for n in names):
        return [int(n) for n in names]
    if spec.source != "tfds":
        raise ValueError(
            f"config.ncd.classes_file={path!r} holds class names; names are only "
            f"resolved for TFDS sources (use integer labels for {spec.source!r})"
        )
    import tensorflow_datasets as tfds

    feature = tfds.builder(spec.name, data_dir=spec.get("data_dir") or None).info.features[
        spec.get("label_key", "label")
    ]
    out = []
    for n in names:
        try:
            out.append(int(feature.str2int(n)))
        except Exception as e:
            raise ValueError(
                f"config.ncd.classes_file={path!r}: {n!r} is not a class of {spec.name!r}"
            ) from e
    return out


def class_split(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(known, novel) original label ids from `config.ncd`.

    Precedence: explicit `known_classes` + `novel_classes`; else an ordered class list
    (`classes` or `classes_file`; empty = a `subset_seed`-ed choice from `total_classes`
    labels when `subset_seed >= 0`, else 0..num_known+num_novel-1) whose first `num_known`
    entries are known and the next `num_novel` novel.
    """
    n = config.ncd
    if n.known_classes or n.novel_classes:
        known, novel = (
            tuple(int(c) for c in n.known_classes),
            tuple(int(c) for c in n.novel_classes),
        )
        if not known or not novel:
            raise ValueError(
                "config.ncd.known_classes and config.ncd.novel_classes must be given together"
            )
    else:
        total = n.num_known + n.num_novel
        if n.get("classes_file"):
            order = read_classes_file(n.classes_file, config.data.target)
        elif n.classes:
            order = [int(c) for c in n.classes]
        elif n.get("subset_seed", -1) >= 0:
            order = (
                np.random.RandomState(n.subset_seed)
                .choice(n.total_classes, total, replace=False)
                .tolist()
            )
        else:
            order = list(range(total))
        if len(order) < total:
            raise ValueError(
                f"config.ncd: {len(order)} classes listed but num_known + num_novel = {total}"
            )
        known, novel = tuple(order[: n.num_known]), tuple(order[n.num_known : total])
    if set(known) & set(novel):
        raise ValueError(
            f"config.ncd: classes {sorted(set(known) & set(novel))} are both known and novel"
        )
    if len(set(known)) != len(known) or len(set(novel)) != len(novel):
        raise ValueError("config.ncd: repeated class in the known or novel list")
    return known, novel


def remap_labels(ds, known, novel):
    """Original labels -> 0..C_l-1 (known, in list order) and C_l.. (novel)."""
    table = np.full(max(known + novel) + 1, -1, np.int64)
    table[list(known)] = np.arange(len(known))
    table[list(novel)] = len(known) + np.arange(len(novel))
    table = tf.constant(table)

    @tf.autograph.experimental.do_not_convert  # plain graph code; no source re-parsing
    def remap(e):
        return {**e, "label": tf.gather(table, e["label"])}

    return ds.map(remap)


def _unlabeled(e):
    return {**e, "label": tf.constant(-1, tf.int64)}


def hide_labels(ds):
    """Every label set to -1 (the unlabeled stream of discovery)."""
    return ds.map(tf.autograph.experimental.do_not_convert(_unlabeled))
