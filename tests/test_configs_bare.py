"""Every config in configs/, run bare (`get_config()` with no argument, no `--config.` flag): it
either starts training -- the first stage of its plan (e.g. the teacher it trains first) gets
to its first train step -- or stops at once with `MissingPrerequisites`, naming every missing
key as the `--config.key=` flag that sets it; never any other error from inside the library.

There is no TFDS data here (the default data dir points at an empty folder), as in CI. "Starts
training" stops each run when its first batch is ready and the step is about to run (after the
state is built), so the offline MNIST configs take seconds, not their teachers' minutes.
"""

import os
import subprocess
import sys

import ml_collections
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.core import constants as tfds_constants

from kd_jax import config_utils, methods, parallel, prerequisites, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_DIR = os.path.join(ROOT, "configs")
CONFIGS = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and not f.startswith("_"))


class FirstStep(Exception):
    """Raised where a run's first train step would begin."""

    def __init__(self, method, workdir, batch):
        super().__init__(f"{method} in {workdir}")
        self.method, self.workdir, self.batch = method, workdir, batch


@pytest.fixture
def no_tfds_data(tmp_path, monkeypatch):
    """TFDS's default data dir (the one TFDS_DATA_DIR sets) is an empty folder."""
    empty = str(tmp_path / "tensorflow_datasets")
    monkeypatch.setattr(tfds_constants, "DATA_DIR", empty)  # read when a builder is made
    monkeypatch.setenv("TFDS_DATA_DIR", empty)  # for subprocesses
    return empty


@pytest.fixture
def stop_at_first_step(monkeypatch):
    """Every method the loop builds (the run's and its chained stages') stops with FirstStep
    once its first batch is ready: the train state exists and the step is next."""
    original = methods.get_method

    def get_method(name):
        cls = original(name)

        class StopAtFirstStep(cls):
            def train_batches(self, start_step):
                batch = next(iter(super().train_batches(start_step)))
                raise FirstStep(self.config.method, self.workdir, batch)

        return StopAtFirstStep

    monkeypatch.setattr(methods, "get_method", get_method)


def _lookup(config, dotted):
    node = config
    for part in dotted.split("."):
        assert part in node, f"{dotted!r} is not a key of the config"
        node = node[part]
    return node


def _tfds_names(node, found=None):
    """Names of every TFDS source anywhere in the config (chained stages included)."""
    found = set() if found is None else found
    if isinstance(node, ml_collections.ConfigDict):
        if node.get("source") == "tfds" and node.get("name"):
            found.add(node.name)
        for value in node.values():
            _tfds_names(value, found)
    return found


@pytest.mark.parametrize("name", CONFIGS)
def test_bare_config_starts_training_or_names_every_missing_key(
    name, tmp_path, no_tfds_data, stop_at_first_step
):
    config = config_utils.load_config(os.path.join(CONFIG_DIR, name))  # get_config()
    workdir = str(tmp_path / "run")
    plan, missing = prerequisites.plan(config, workdir)
    try:
        run.run(config, workdir)
    except FirstStep as started:
        assert not missing, missing
        first = plan.stages[0]  # e.g. the teacher, trained first into <workdir>/teacher
        assert (started.method, started.workdir) == (first.method, first.workdir)
        assert started.batch["image"].shape[0] == parallel.check_batch_size(
            first.config.batch_size, parallel.make_mesh()
        )
    except prerequisites.MissingPrerequisites as e:
        assert missing and e.keys() == [k for m in missing for k in m.keys]
        assert not os.path.exists(workdir), "nothing is made before the check"
        message = str(e)
        for key in e.keys():  # each key as the user sets it, and a real key of this config
            assert f"--config.{key}=" in message
            _lookup(config, key)
        for dataset in _tfds_names(config):
            assert f"tfds build {dataset} " in message
    else:
        pytest.fail(f"{name} ran to the end instead of stopping at its first step")


# The open-world configs need a teacher, a pool and target data the user brings: all three
# are named at once, each with the command that makes it, and nothing is created.
OPEN_WORLD_INPUTS = {
    "odsd_imagenet.py": (
        ["teacher.workdir", "data.target.data_dir", "data.transfer.pattern"],
        (
            "python -m kd_jax.tools.convert_torch --arch=resnet50 --num_classes=1000 "
            "--src=resnet50.pth --out=DIR",
            "torchvision.models.resnet50(",
            "python -m kd_jax.data.make_shards --src=IMAGES --out=DIR",
            "--config.data.target.data_dir=DIR",
            "tfds build imagenet2012",
            "--manual_dir=",
            "ILSVRC2012_img_train.tar",
        ),
    ),
    "odsd_nyuv2.py": (
        ["teacher.workdir", "data.target.path", "data.transfer.pattern"],
        (
            "--arch=deeplabv3_resnet50 --num_classes=13",
            "--config.data.target.path=FILE.npz",
            "python -m kd_jax.data.make_shards",
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(OPEN_WORLD_INPUTS))
def test_open_world_config_names_teacher_pool_and_data_at_once(tmp_path, no_tfds_data, name):
    keys, commands = OPEN_WORLD_INPUTS[name]
    c = config_utils.load_config(os.path.join(CONFIG_DIR, name))
    with pytest.raises(prerequisites.MissingPrerequisites) as err:
        prerequisites.check(c, str(tmp_path / "run"))
    assert err.value.keys() == keys
    message = str(err.value)
    for expected in (
        "3 prerequisites",
        "--config.teacher.workdir=DIR",
        "--config.data.transfer.pattern='DIR/pool-*-of-*.tfrecord'",
        *commands,
    ):
        assert expected in message, expected
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileNotFoundError)
    assert not (tmp_path / "run").exists()


def test_design_card_command_fails_in_one_block(tmp_path, no_tfds_data):
    """`python -m kd_jax.main --config=configs/odsd_imagenet.py --workdir=DIR`, nothing else."""
    workdir = tmp_path / "x"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kd_jax.main",
            "--config=configs/odsd_imagenet.py",
            f"--workdir={workdir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    block = proc.stderr[proc.stderr.index("configs/odsd_imagenet.py: 3 prerequisites") :]
    assert block.rstrip().endswith("--num_shards=256")  # the whole message, and nothing after
    for flag in (
        "--config.teacher.workdir=",
        "--config.data.transfer.pattern=",
        "--config.data.target.data_dir=",
    ):
        assert flag in block
    assert not workdir.exists()


def test_cifar_student_trains_its_teacher_config_first(tmp_path):
    """teacher.train is configs/teacher_<dataset>.py's config for the pair's teacher."""
    for student, dataset in (("kd", "cifar10"), ("odsd", "cifar100"), ("eikd", "cifar100")):
        c = config_utils.load_config(
            os.path.join(CONFIG_DIR, f"{student}_{dataset}.py"), "wrn40_2_wrn16_1"
        )
        expected = config_utils.load_config(
            os.path.join(CONFIG_DIR, f"teacher_{dataset}.py"), "wrn40_2"
        )
        assert config_utils.to_json(c.teacher.train) == config_utils.to_json(expected)
        assert c.teacher.train.num_classes == c.num_classes
    with tfds.testing.mock_data(num_examples=8):  # as the mock-data tests see TFDS
        c.data.transfer.pattern = str(tmp_path / "pool-*.tfrecord")
        (tmp_path / "pool-00000-of-00001.tfrecord").write_bytes(b"")
        plan = prerequisites.check(c, str(tmp_path / "run"))
    assert [(s.method, s.key, s.workdir) for s in plan.stages] == [
        ("teacher", "teacher.train", str(tmp_path / "run" / "teacher")),
        ("eikd", "", str(tmp_path / "run")),
    ]


def test_a_finished_teacher_or_stage_one_is_not_planned_again(tmp_path):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "results.json").write_text("{}")
    c = config_utils.load_config(os.path.join(CONFIG_DIR, "kd_mnist.py"))
    c.teacher.workdir = str(teacher)
    assert [s.method for s in prerequisites.check(c, str(tmp_path / "kd")).stages] == ["kd"]
    c = config_utils.load_config(os.path.join(CONFIG_DIR, "sckd_mnist.py"))
    assert [(s.method, s.key) for s in prerequisites.check(c, str(tmp_path / "s")).stages] == [
        ("ncd_pretrain", "ncd.pretrain.train"),
        ("sckd", ""),
    ]
    c.ncd.pretrain.workdir = str(tmp_path / "nope")
    with pytest.raises(prerequisites.MissingPrerequisites, match="ncd.pretrain.workdir"):
        prerequisites.check(c, str(tmp_path / "s"))


def test_remote_paths_are_left_to_the_pipeline(tmp_path):
    c = config_utils.load_config(os.path.join(CONFIG_DIR, "odsd_imagenet.py"))
    c.teacher.workdir = "gs://bucket/resnet50"
    c.data.transfer.pattern = "gs://bucket/places365/pool-*.tfrecord"
    c.data.target.data_dir = "gs://bucket/tensorflow_datasets"
    assert [s.method for s in prerequisites.check(c, str(tmp_path)).stages] == ["odsd"]


def test_load_teacher_without_workdir_or_train_config_names_both_keys(tmp_path):
    """A method built directly (a notebook, no preflight) with teacher.train empty."""
    c = config_utils.load_config(os.path.join(CONFIG_DIR, "kd_mnist.py"))
    c.teacher.train = ml_collections.ConfigDict()
    with pytest.raises(prerequisites.MissingPrerequisites) as err:
        methods.get_method("kd")(c, str(tmp_path), parallel.make_mesh())
    assert err.value.keys() == ["teacher.workdir"]
    assert "config.teacher.workdir is empty and config.teacher.train holds no teacher" in " ".join(
        str(err.value).split()
    )
