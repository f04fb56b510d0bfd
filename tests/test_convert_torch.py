"""PyTorch -> kd_jax teacher conversion: logits parity per architecture family, the file formats,
the CLI's teacher workdir as a KD teacher, and bad input named key by key with nothing written.

Fixtures (tests/fixtures/torch) come from `python -m kd_jax.tools.make_torch_fixtures` (torch);
these tests need torch only for the `.pth` case.
"""

import json
import os
import struct
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpoint, config_utils, models, parallel
from kd_jax.methods import get_method
from kd_jax.methods.base import evaluate_variables
from kd_jax.tools import convert_torch as ct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "torch")
FAMILIES = (
    "lenet",
    "resnet_cifar",
    "resnet_imagenet",
    "resnet_imagenet_basic",
    "wrn",
    "vgg",
    "mobilenet_v2",
    "vit",
    "deeplabv3_resnet",  # torchvision deeplabv3_resnet50, output stride 8
    "deeplabv3_mobilenetv2",  # VainF deeplabv3_mobilenet (its naming), output stride 8
)


def fixture(family):
    with np.load(os.path.join(FIXTURES, f"{family}.npz")) as f:
        data = {k: f[k] for k in f.files}
    meta = json.loads(str(data.pop("meta")))
    kwargs = {k: _tuples(v) for k, v in meta["model_kwargs"].items()}
    sd = {k[len("state_dict/") :]: v for k, v in data.items() if k.startswith("state_dict/")}
    return meta["arch"], meta["num_classes"], kwargs, sd, data


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def apply(arch, num_classes, kwargs, variables, x):
    model = models.create_model(arch, num_classes, **kwargs)
    logits, feats = model.apply(variables, jnp.asarray(x), train=False)
    return np.asarray(logits), np.asarray(feats["pre_logits"])


# ----- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_logits_equal_pytorch(family):
    arch, num_classes, kwargs, _, data = fixture(family)
    # Through the file reader: the npz wraps the state dict like a DFKD .pth ({'state_dict'}).
    sd, info = ct.read_state_dict(os.path.join(FIXTURES, f"{family}.npz"))
    assert info["container"] == ["state_dict"]
    conv = ct.convert(arch, num_classes, sd, **kwargs)
    has_bn = any(k.endswith("running_var") for k in sd)
    assert bool(conv.variables["batch_stats"]) == has_bn
    assert all(k.endswith("num_batches_tracked") for k in conv.ignored)
    logits, pre = apply(arch, num_classes, kwargs, conv.variables, data["input"])
    assert np.abs(data["logits"]).max() > 0.1  # a non-degenerate reference
    np.testing.assert_allclose(logits, data["logits"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(pre, data["pre_logits"], rtol=0, atol=1e-4)


def test_bn_statistics_are_used_in_eval_mode():
    # Parity must not hold by accident: with default BN statistics the logits differ.
    arch, num_classes, kwargs, sd, data = fixture("resnet_cifar")
    reset = ct.convert_state_dict(
        arch,
        num_classes,
        {
            k: (
                np.zeros_like(v)
                if k.endswith("running_mean")
                else np.ones_like(v)
                if k.endswith("running_var")
                else v
            )
            for k, v in sd.items()
        },
        **kwargs,
    )
    logits, _ = apply(arch, num_classes, kwargs, reset, data["input"])
    assert np.abs(logits - data["logits"]).max() > 1e-2


def test_vainf_deeplab_naming_and_padding():
    # The file holds VainF's names, which the converter renames; and parity needs VainF's
    # MobileNetV2 (unpadded stem, blocks padding their input before the expansion): the same
    # variables in torchvision's padding give other logits.
    arch, num_classes, kwargs, sd, data = fixture("deeplabv3_mobilenetv2")
    assert any(k.startswith("backbone.low_level_features.") for k in sd)
    assert any(k.startswith("backbone.high_level_features.") for k in sd)
    assert any(k.startswith("classifier.classifier.0.convs.4.1.") for k in sd)
    variables = ct.convert_state_dict(arch, num_classes, sd, **kwargs)
    tv_padding = {**kwargs, "vainf_padding": False}
    logits, _ = apply(arch, num_classes, tv_padding, variables, data["input"])
    assert np.abs(logits - data["logits"]).max() > 1e-3


def test_dino_style_headless_vit_backbone():
    # DINO checkpoints: no classifier (head = Identity), keys under 'teacher' / 'backbone.'.
    arch, _, kwargs, sd, data = fixture("vit")
    wrapped = {
        "teacher": {"backbone." + k: v for k, v in sd.items() if not k.startswith("head.")}
        | {"head.mlp.0.weight": np.ones((4, 16), np.float32)},
        "epoch": 99,
    }
    backbone, info = ct.unwrap(wrapped, prefix="backbone.")
    assert info["outside_prefix"] == ["head.mlp.0.weight"]
    variables = ct.convert_state_dict(arch, 0, backbone, **kwargs)
    logits, _ = apply(arch, 0, kwargs, variables, data["input"])
    np.testing.assert_allclose(logits, data["pre_logits"], rtol=0, atol=1e-4)


# ----- file formats and wrappers --------------------------------------------------------------


def test_safetensors_file_equals_the_state_dict():
    _, _, _, sd, _ = fixture("lenet")
    st, info = ct.read_state_dict(os.path.join(FIXTURES, "lenet5_half.safetensors"))
    assert info["container"] == [] and set(st) == set(sd)
    for k in sd:
        assert st[k].dtype == sd[k].dtype and np.array_equal(st[k], sd[k]), k


def test_safetensors_reader_decodes_bf16_and_f16(tmp_path):
    # Bytes written by hand from the format spec (independent of ct.write_safetensors).
    header = {
        "a": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]},
        "b": {"dtype": "F16", "shape": [1, 2], "data_offsets": [4, 8]},
        "__metadata__": {"format": "pt"},
    }
    blob = json.dumps(header).encode()
    data = struct.pack("<HH", 0x3F80, 0xC020) + np.array([[0.5, -3.0]], "<f2").tobytes()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)
    out = ct.read_safetensors(str(path))
    np.testing.assert_array_equal(out["a"], np.array([1.0, -2.5], np.float32))
    assert out["a"].dtype == np.float32
    np.testing.assert_array_equal(out["b"], np.array([[0.5, -3.0]], np.float16))
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[:6])  # truncated
    with pytest.raises(ct.ConversionError, match="'b'.*corrupt or truncated"):
        ct.read_safetensors(str(path))


def test_pth_with_cmi_lenet_naming_and_dfkd_wrapper():
    pytest.importorskip("torch")
    arch, num_classes, kwargs, _, data = fixture("lenet")
    sd, info = ct.read_state_dict(os.path.join(FIXTURES, "lenet5_half_cmi.pth"))
    assert info["container"] == ["state_dict"] and info["scalars"]["best_acc"] == 0.9876
    assert any(k.startswith("features.") for k in sd)  # CMI / Fast-Datafree naming
    logits, _ = apply(
        arch, num_classes, kwargs, ct.convert_state_dict(arch, num_classes, sd), data["input"]
    )
    np.testing.assert_allclose(logits, data["logits"], rtol=0, atol=1e-4)


def test_pth_without_torch_says_how_to_proceed(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    with pytest.raises(ct.ConversionError, match=r"pip install torch.*\.npz.*\.safetensors"):
        ct.read_state_dict(os.path.join(FIXTURES, "lenet5_half_cmi.pth"))


def test_wrappers_are_unwrapped():
    sd = {"conv1.weight": np.zeros((3, 1, 5, 5), np.float32)}
    # RepDistiller ckpt_epoch_240.pth: {'model': sd, ...}; DataParallel 'module.' prefix.
    got, info = ct.unwrap(
        {
            "epoch": 240,
            "model": {"module." + k: v for k, v in sd.items()},
            "optimizer": {"state": {}},
        }
    )
    assert list(got) == ["conv1.weight"] and info["container"] == ["model"]
    with pytest.raises(ct.ConversionError, match="no state dict found.*'optimizer'"):
        ct.unwrap({"epoch": 1, "optimizer": {"lr": 0.1}})


def test_reading_npz_and_safetensors_never_imports_torch():
    code = (
        "import sys; from kd_jax.tools import convert_torch as ct; "
        f"ct.read_state_dict({os.path.join(FIXTURES, 'lenet.npz')!r}); "
        f"ct.read_state_dict({os.path.join(FIXTURES, 'lenet5_half.safetensors')!r}); "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# ----- bad input ------------------------------------------------------------------------------


def _error(arch, num_classes, sd, **kwargs):
    with pytest.raises(ct.ConversionError) as e:
        ct.convert(arch, num_classes, sd, **kwargs)
    return str(e.value)


def test_missing_extra_and_misshaped_keys_are_listed_with_both_shapes():
    arch, _, kwargs, sd, _ = fixture("resnet_cifar")
    bad = dict(sd)
    del bad["layer1.0.bn1.running_var"]
    bad["extra.weight"] = np.zeros((7, 3), np.float32)
    bad["layer2.0.conv1.weight"] = np.zeros((8, 5, 3, 3), np.float32)
    msg = _error(arch, 10, bad, **kwargs)
    assert "layer1.0.bn1.running_var: file absent vs resnet18_cifar (4,)" in msg
    assert "extra.weight (7, 3): no resnet18_cifar variable params/extra/kernel" in msg
    assert "layer2.0.conv1.weight: file (8, 5, 3, 3) vs resnet18_cifar (8, 4, 3, 3)" in msg
    assert msg.endswith("Nothing was written.")
    # An extra key dropped on purpose is fine once the rest fits.
    bad.update({k: sd[k] for k in ("layer2.0.conv1.weight", "layer1.0.bn1.running_var")})
    assert "extra.weight" in ct.convert(arch, 10, bad, skip=[r"extra\..*"], **kwargs).ignored


def test_wrong_num_classes_hints_at_the_file_classifier():
    arch, _, kwargs, sd, _ = fixture("resnet_cifar")
    msg = _error(arch, 100, sd, **kwargs)
    assert "linear.weight: file (10, 32) vs resnet18_cifar (100, 32)" in msg
    assert "linear.bias: file (10,) vs resnet18_cifar (100,)" in msg
    assert "classifier has 10 outputs" in msg


def test_torchvision_deeplab_aux_head_hints_at_skip():
    # torchvision's COCO deeplabv3_resnet50 weights come with aux_loss=True's FCNHead.
    arch, num_classes, kwargs, sd, _ = fixture("deeplabv3_resnet")
    aux = {
        "aux_classifier.0.weight": np.zeros((4, 32, 3, 3), np.float32),
        "aux_classifier.4.bias": np.zeros((num_classes,), np.float32),
    }
    msg = _error(arch, num_classes, sd | aux, **kwargs)
    assert "aux_classifier.0.weight (4, 32, 3, 3): no deeplabv3_resnet50 variable" in msg
    assert "--skip='aux_classifier\\..*'" in msg
    conv = ct.convert(arch, num_classes, sd | aux, skip=[r"aux_classifier\..*"], **kwargs)
    assert sorted(k for k in conv.ignored if k.startswith("aux")) == sorted(aux)


def test_wrong_architecture_names_keys_and_the_matching_arch():
    _, _, _, sd, _ = fixture("lenet")
    msg = _error("vgg8", 10, sd)
    assert "conv1.weight (3, 1, 5, 5): no vgg8 variable params/conv1/kernel" in msg
    assert "block0.0.weight: file absent vs vgg8 (64, 3, 3, 3)" in msg
    assert "--arch=lenet5" in msg  # key names (shapes aside) fit both LeNets


# ----- the CLI: a teacher workdir the trainer uses --------------------------------------------


def test_cli_bad_input_writes_nothing(tmp_path, capsys):
    out = tmp_path / "teacher"
    rc = ct.main(
        [
            "--arch=resnet18_cifar",
            "--num_classes=10",
            f"--out={out}",
            f"--src={os.path.join(FIXTURES, 'lenet5_half.safetensors')}",
        ]
    )
    assert rc == 1 and not out.exists() and os.listdir(tmp_path) == []
    assert "conv3.weight (60, 8, 5, 5)" in capsys.readouterr().err
    rc = ct.main(
        [
            "--arch=no_such_net",
            "--num_classes=10",
            f"--out={out}",
            f"--src={os.path.join(FIXTURES, 'lenet.npz')}",
        ]
    )
    assert rc == 2 and "known models" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_cli_teacher_is_loaded_and_used_by_a_kd_run(tmp_path, capsys):
    arch, num_classes, kwargs, _, data = fixture("lenet")
    out = tmp_path / "teacher"
    src = os.path.join(FIXTURES, "lenet5_half.safetensors")
    assert (
        ct.main([f"--arch={arch}", f"--num_classes={num_classes}", f"--src={src}", f"--out={out}"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "parameters: 15,738;" in printed and "unmapped keys: none" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["method"] == "converted" and results["model"] == arch
    assert results["num_classes"] == 10 and results["num_params"] == 15738
    assert results["source"] == src and "final_accuracy" not in results
    variables = checkpoint.load_variables(str(out))
    teacher = {
        "params": variables["params"]["model"],
        "batch_stats": variables["batch_stats"].get("model", {}),
    }
    logits, _ = apply(arch, num_classes, kwargs, teacher, data["input"])
    np.testing.assert_allclose(logits, data["logits"], rtol=0, atol=1e-4)

    # An existing teacher is replaced only with --overwrite; --accuracy is a fraction.
    flags = [f"--arch={arch}", "--num_classes=10", f"--src={src}", f"--out={out}"]
    assert ct.main(flags + ["--accuracy=0.98"]) == 1
    assert "final_accuracy" not in json.loads((out / "results.json").read_text())
    assert ct.main(flags + ["--accuracy=98", "--overwrite"]) == 1
    assert "fraction" in capsys.readouterr().err
    assert ct.main(flags + ["--accuracy=0.98", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["final_accuracy"] == 0.98

    # The KD method loads it as its teacher (results.json -> model, checkpoint -> variables),
    # runs it under jit on the mesh and measures its accuracy, as train_and_evaluate does.
    c = config_utils.load_config(os.path.join(ROOT, "configs", "kd_mnist.py"), "original,smoke")
    c.teacher.workdir, c.teacher.model = str(out), arch
    c.data.target.max_eval_examples = 64
    mesh = parallel.make_mesh()
    method = get_method("kd")(c, str(tmp_path / "student"), mesh)
    assert method.teacher_info["method"] == "converted"
    x = np.concatenate([data["input"]] * 8)[:8]  # a batch the 8 devices divide
    logits, _ = jax.jit(method.teacher_apply)(
        method.teacher_vars, parallel.global_batch({"x": x}, mesh)["x"]
    )
    np.testing.assert_allclose(np.asarray(logits)[:3], data["logits"], rtol=0, atol=1e-4)
    acc = evaluate_variables(
        method.teacher_model.apply, method.teacher_vars, method.eval_dataset(), mesh
    )
    assert 0.0 <= acc <= 1.0
    assert sorted(os.listdir(tmp_path)) == ["teacher"]  # no temporary directories left behind
