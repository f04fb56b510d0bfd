"""Every dataset config the users run on real data (TFDS / image folders / pool shards) builds
its whole pipeline and trains a step or two on mock data: tfds.testing.mock_data, tiny TFRecord
shards and image folders written in a temp dir."""

import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds
from helpers import config

from kd_jax import methods, parallel, run, train
from kd_jax.data import shards


def test_one_teacher_step_on_tfds_mock_data(tmp_path):
    c = config("teacher_cifar10.py", "wrn16_1,smoke")
    with tfds.testing.mock_data(num_examples=40):
        results = train.train_and_evaluate(c, str(tmp_path))
    assert results["steps"] == 2 and 0.0 <= results["final_accuracy"] <= 1.0
    saved = json.loads((tmp_path / "results.json").read_text())
    for key in (
        "method",
        "config",
        "final_accuracy",
        "best_accuracy",
        "steps",
        "wall_seconds",
        "images_per_second",
    ):
        assert key in saved, key
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 2 and "accuracy" in lines[-1]
    assert os.listdir(tmp_path / "tensorboard")
    # A finished run is not trained again.
    again = train.train_and_evaluate(c, str(tmp_path))
    assert again["final_accuracy"] == results["final_accuracy"]


def test_odsd_imagenet_config_runs_on_mock_data(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 40, 48, 3)).astype(np.uint8)
    pattern = _write_pool(tmp_path / "places", images)
    c = config("odsd_imagenet.py", "smoke")
    c.data.transfer.pattern = pattern
    with tfds.testing.mock_data(num_examples=32):
        results = run.run(c, str(tmp_path / "run"))  # its 2-step teacher first
    report = results["selection"]
    assert results["steps"] == 2 and report["selection_size"] == 32
    assert report["selection_bn_distance"] is not None and report["random_bn_distance"] > 0


def _write_pool(path, images):
    shards.write_shards(path, images, ids=np.arange(len(images)), num_shards=3)
    return shards.shard_pattern(path)


# ----- every dataset config: pipeline on mock data, one step ----------------------------------


def _folder(root, num_classes=100, per_class=1):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("trainval", "test"):
        for k in range(num_classes):
            d = root / split / f"variant_{k:03d}"
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (20, 24, 3), np.uint8)).save(d / f"{i}.jpg")
    return str(root)


def _ncd_config(tmp_path, name, arg):
    c = config(name, arg, num_steps=1, eval_every=1, checkpoint_every=1)
    # Discovery only (stage chaining is covered end to end on MNIST).
    c.ncd.pretrain.enabled = False
    if name == "sckd_aircraft.py":
        c.data.target.path = _folder(tmp_path / "aircraft", per_class=1)
    return c


# A step through the smoke model compiles the same way for every config (LeNet-5 at 32 px);
# what differs per dataset is its data. Two configs train a step (a TFDS one with UNO's full
# recipe, the image-folder one); the others build their whole input side without compiling.
@pytest.mark.parametrize(
    "name,arg,examples",
    [("sckd_cifar100.py", "50_50,uno,smoke", 64), ("sckd_aircraft.py", "smoke", 0)],
)
def test_dataset_config_runs_one_step_on_mock_data(tmp_path, name, arg, examples):
    c = _ncd_config(tmp_path, name, arg)
    with tfds.testing.mock_data(num_examples=max(examples, 1)):
        results = train.train_and_evaluate(c, str(tmp_path / "run"))
    assert results["steps"] == 1
    assert 0.0 <= results["novel_train_accuracy"] <= 1.0
    assert len(results["known_classes"]) == c.ncd.num_known


@pytest.mark.parametrize(
    "name,arg,examples",
    [
        ("sckd_cifar10.py", "smoke", 64),
        ("sckd_imagenet100.py", "smoke", 400),
        ("sckd_cub.py", "smoke", 64),
        ("sckd_scars.py", "uno,smoke", 64),
    ],
)
def test_dataset_config_builds_its_batches_on_mock_data(tmp_path, name, arg, examples):
    c = _ncd_config(tmp_path, name, arg)
    with tfds.testing.mock_data(num_examples=examples):
        method = methods.get_method(c.method)(c, str(tmp_path / "run"), parallel.make_mesh())
        method.prepare()
        batch = next(method.train_batches(0))
        evals = [
            next(ds.as_numpy_iterator())
            for ds in (
                method._eval_stream(c.data.target.train_split, method.novel, 16),
                method._eval_stream(c.data.target.eval_split, method.known + method.novel),
            )
        ]
    size = c.data.image_size
    for key in method.view_augments:
        assert batch[key].shape == (c.batch_size, size, size, 3), key
        assert np.isfinite(batch[key]).all(), key
    labels = batch["label"]
    assert labels.shape == (c.batch_size,)
    # labeled rows carry known-class ids 0..num_known-1, unlabeled rows none (-1)
    assert (labels >= 0).any() and (labels == -1).any()
    assert labels.max() < c.ncd.num_known
    novel_train, test = evals
    real = novel_train["mask"] > 0
    assert real.any() and (novel_train["label"][real] >= c.ncd.num_known).all()
    for e in evals:
        assert e["image"].shape[1:] == (size, size, 3)
        assert e["label"].max() < c.ncd.num_known + c.ncd.num_novel
