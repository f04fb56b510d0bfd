"""configs/odsd_nyuv2.py (ODSD on NYUv2, DFAD's protocol): the full config names its three
required inputs at once, and `:smoke` builds the whole pipeline -- DFAD-format folder ->
convert_nyuv2 -> npz target, an ImageNet-like pool of varying image sizes in shards, a teacher
workdir -- and takes two steps."""

import json
import os

import jax
import numpy as np
from helpers import ROOT, config, write_fake_nyuv2, write_teacher

from kd_jax import config_utils, models

CLASSES = 13


def test_full_config_is_dfads_protocol():
    """(Its missing inputs: tests/test_configs_bare.py, with odsd_imagenet.py's.)"""
    c = config_utils.load_config(os.path.join(ROOT, "configs", "odsd_nyuv2.py"))
    assert (c.teacher.model, c.model.name) == ("deeplabv3_resnet50", "deeplabv3_mobilenetv2")
    assert c.num_classes == CLASSES and c.odsd.segmentation.background == -1
    assert (c.data.image_size, c.data.augment, c.data.eval_size) == (128, "crop_flip", 0)
    assert (c.batch_size, c.num_steps) == (64, 75000)


def test_odsd_nyuv2_smoke_builds_the_pipeline_and_takes_two_steps(tmp_path):
    """What it guards: every part of the NYUv2 path runs and reports (a random teacher, so not
    that the student learns)."""
    from kd_jax import train
    from kd_jax.data import convert_nyuv2, shards

    nyu = tmp_path / "nyu"
    write_fake_nyuv2(nyu, train=(1, 4), test=(2, 3, 5), shape=(30, 40))
    data = tmp_path / "data"
    assert convert_nyuv2.main([f"--root={nyu}", f"--out={data}", "--short_side=32"]) == 0

    rng = np.random.default_rng(0)  # ImageNet-like: every pool image of its own size
    sizes = rng.integers(24, 64, (24, 2))
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]
    shards.write_shards(tmp_path / "pool", images, num_shards=2)

    c = config(
        "odsd_nyuv2.py",
        "smoke",
        **{
            "teacher.workdir": str(tmp_path / "teacher"),
            "data.target.path": str(data / "nyuv2_{split}.npz"),
            "data.transfer.pattern": str(tmp_path / "pool"),
            "async_checkpoints": False,
        },
    )
    teacher = models.create_model(c.teacher.model, c.num_classes)
    x = np.zeros((1, c.data.image_size, c.data.image_size, 3), np.float32)
    write_teacher(
        tmp_path / "teacher",
        c.teacher.model,
        c.num_classes,
        jax.device_get(teacher.init(jax.random.PRNGKey(0), x)),
    )
    run = tmp_path / "run"
    res = train.train_and_evaluate(c, str(run))
    saved = json.loads((run / "results.json").read_text())
    assert saved["steps"] == c.num_steps == 2
    for r in (res, saved):
        assert 0 <= r["miou"] <= 1 and 0 <= r["pixel_accuracy"] <= 1
        assert len(r["per_class_iou"]) == CLASSES
    rep = saved["selection"]
    assert rep["selection_size"] == c.odsd.aps.size == 16 and rep["pool_size"] == len(images)
    assert len(rep["selection_per_class"]) == CLASSES
    assert sum(rep["selection_per_class"]) == c.odsd.aps.size
    # the BN-statistics distance read the varying-size pool images
    assert np.isfinite(rep["selection_bn_distance"]) and np.isfinite(rep["random_bn_distance"])
