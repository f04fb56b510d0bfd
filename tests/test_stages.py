"""A run is a chain of stages: `kd_jax.run` trains the unfinished ones, `train.train_and_evaluate`
trains exactly one, and a method only reads finished workdirs (or is handed its teacher)."""

import json

import jax
import numpy as np
import pytest
from helpers import config

from kd_jax import methods, models, parallel, prerequisites, train
from kd_jax.methods import sckd
from kd_jax.teacher import FrozenTeacher


def test_finished_means_results_json_with_the_configs_steps(tmp_path):
    c = config("teacher_mnist.py", "smoke")
    assert not prerequisites.finished(str(tmp_path), c)
    (tmp_path / "results.json").write_text(json.dumps({"steps": c.num_steps - 1}))
    assert not prerequisites.finished(str(tmp_path), c)  # e.g. num_steps raised since
    assert prerequisites.finished(str(tmp_path))  # a user's teacher workdir: results.json
    (tmp_path / "results.json").write_text(json.dumps({"steps": c.num_steps}))
    assert prerequisites.finished(str(tmp_path), c)


def test_train_and_evaluate_trains_one_stage_and_points_at_the_runner(tmp_path):
    c = config("kd_mnist.py", "smoke")  # its teacher is trained first, by kd_jax.run
    with pytest.raises(prerequisites.UnfinishedPrerequisites, match=r"kd_jax\.run\.run") as e:
        train.train_and_evaluate(c, str(tmp_path / "kd"))
    assert [s.method for s in e.value.plan.stages] == ["teacher", "kd"]
    assert not (tmp_path / "kd").exists()


def test_a_method_reads_its_teacher_and_never_trains_it(tmp_path):
    c = config("kd_mnist.py", "smoke")  # teacher.train set, nothing in <workdir>/teacher
    with pytest.raises(prerequisites.MissingPrerequisites) as e:
        methods.get_method("kd")(c, str(tmp_path), parallel.make_mesh())
    assert e.value.keys() == ["teacher.workdir"]
    assert "kd_jax.run.run" in " ".join(str(e.value).split())
    assert not (tmp_path / "teacher").exists()


def test_discovery_reads_stage_one_and_never_trains_it(tmp_path):
    c = config("sckd_mnist.py", "smoke")
    method = methods.get_method("sckd")(c, str(tmp_path), parallel.make_mesh())
    with pytest.raises(FileNotFoundError, match="holds no finished ncd_pretrain run"):
        method.prepare()
    assert not (tmp_path / "pretrain").exists()


def test_stage_one_config_is_built_from_the_discovery_config():
    c = config(
        "sckd_mnist.py",
        "smoke",
        **{
            "ncd.known_classes": (0, 2, 4, 6, 8),
            "ncd.novel_classes": (1, 3, 5, 7, 9),
            "data.target.max_eval_examples": 32,
        },
    )
    stage1 = sckd.stage1_config(c)
    assert stage1.method == "ncd_pretrain" and not stage1.ncd.pretrain.enabled
    assert tuple(stage1.ncd.known_classes) == (0, 2, 4, 6, 8)
    assert stage1.data.target.max_eval_examples == 32
    assert stage1.num_steps == c.ncd.pretrain.train.num_steps != c.num_steps
    plan = prerequisites.check(c, "/tmp/kd_jax_unused_sckd")
    assert plan.stages[0].config.to_json() == stage1.to_json()


def test_build_with_a_handed_in_teacher_needs_no_teacher_workdir(tmp_path):
    c = config("kd_mnist.py", "smoke", batch_size=8)
    mesh = parallel.make_mesh()
    model = models.create_model("lenet5", 10)
    v = model.init(jax.random.PRNGKey(1), np.zeros((1, 32, 32, 1), np.float32), train=False)
    teacher = FrozenTeacher(model, parallel.replicate(dict(v), mesh))
    assert [s.method for s in prerequisites.check(c, str(tmp_path), teacher_given=True).stages] == [
        "kd"
    ]
    built = train.build(c, str(tmp_path), mesh, teacher=teacher, prepare=False)
    assert built.method.teacher is teacher and built.method.teacher_vars is teacher.variables
    batch = {
        "image": np.zeros((8, 32, 32, 1), np.float32),
        "label": np.zeros(8, np.int64),
        "id": np.arange(8),
    }
    state, metrics = built.train_step(
        built.state,
        teacher.variables,
        parallel.global_batch(batch, mesh),
        parallel.replicate(jax.random.PRNGKey(0), mesh),
    )
    assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    assert not (tmp_path / "teacher").exists()
