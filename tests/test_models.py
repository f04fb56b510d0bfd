"""The model zoo: parameter counts equal to the reference PyTorch definitions, the
`(logits, features)` contract, BatchNorm behaviour, naming that a PyTorch converter relies on.

Counts and shapes come from `jax.eval_shape`, so nothing large is materialised; real forward passes
run only on small models. The counts were checked against PyTorch reference definitions (and
logits parity after weight copying) by `tools_dev/torch_param_counts.py --parity`.
"""

from __future__ import annotations

import functools
import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import as64, max_distance, record

from kd_jax.models import (
    SEGMENTATION_MODELS,
    cpu_conv,
    create_model,
    list_models,
    model_input_shape,
)
from kd_jax.models.layers import conv2d
from kd_jax.models.vit import VisionTransformer
from kd_jax.models.wrn import WideResNet

# (name, num_classes) → trainable parameters, as `sum(p.numel() for p in model.parameters())`.
PARAM_COUNTS = {
    ("lenet5", 10): 61_706,
    ("lenet5_half", 10): 15_738,
    ("resnet18_cifar", 10): 11_173_962,
    ("resnet18_cifar", 100): 11_220_132,
    ("resnet34_cifar", 10): 21_282_122,
    ("resnet34_cifar", 100): 21_328_292,
    ("wrn10_1", 10): 77_562,  # 1-channel input; hand-counted (conv1 144 + groups 4,672 /
    ("wrn10_1_half", 10): 19_714,  # 14,432 / 57,536 + bn 128 + fc 650)
    ("wrn16_1", 10): 175_066,
    ("wrn16_2", 10): 691_674,
    ("wrn40_1", 10): 563_930,
    ("wrn40_2", 10): 2_243_546,
    ("wrn40_2", 100): 2_255_156,
    ("vgg8", 10): 3_918_858,
    ("vgg11", 10): 9_231_114,
    ("vgg11", 100): 9_277_284,
    ("resnet18", 1000): 11_689_512,
    ("resnet34", 1000): 21_797_672,
    ("resnet50", 1000): 25_557_032,
    ("mobilenet_v2", 1000): 3_504_872,
    ("vit_b16", 1000): 86_567_656,
    ("vit_s16", 1000): 22_050_664,
}

# name → (num_classes, pre_logits width, expected stage taps)
CONTRACT = {
    "lenet5": (10, 84, {"stage1": (14, 14, 6), "stage2": (5, 5, 16), "stage3": (1, 1, 120)}),
    "lenet5_half": (10, 42, {"stage1": (14, 14, 3), "stage2": (5, 5, 8), "stage3": (1, 1, 60)}),
    "resnet18_cifar": (
        10,
        512,
        {
            "stage1": (32, 32, 64),
            "stage2": (16, 16, 128),
            "stage3": (8, 8, 256),
            "stage4": (4, 4, 512),
        },
    ),
    "resnet34_cifar": (100, 512, {"stage4": (4, 4, 512)}),
    "wrn10_1": (10, 64, {"stage1": (32, 32, 16), "stage2": (16, 16, 32), "stage3": (8, 8, 64)}),
    "wrn10_1_half": (10, 32, {"stage1": (32, 32, 8), "stage2": (16, 16, 16), "stage3": (8, 8, 32)}),
    "wrn16_1": (10, 64, {"stage1": (32, 32, 16), "stage2": (16, 16, 32), "stage3": (8, 8, 64)}),
    "wrn16_2": (10, 128, {"stage3": (8, 8, 128)}),
    "wrn40_1": (10, 64, {"stage3": (8, 8, 64)}),
    "wrn40_2": (10, 128, {"stage1": (32, 32, 32), "stage2": (16, 16, 64), "stage3": (8, 8, 128)}),
    "vgg8": (10, 512, {"stage0": (32, 32, 64), "stage3": (4, 4, 512), "stage4": (4, 4, 512)}),
    "vgg11": (100, 512, {"stage2": (8, 8, 256), "stage4": (4, 4, 512)}),
    "resnet18": (1000, 512, {"stage1": (56, 56, 64), "stage4": (7, 7, 512)}),
    "resnet34": (1000, 512, {"stage4": (7, 7, 512)}),
    "resnet50": (1000, 2048, {"stage1": (56, 56, 256), "stage4": (7, 7, 2048)}),
    "mobilenet_v2": (
        1000,
        1280,
        {
            "stage1": (112, 112, 16),
            "stage2": (56, 56, 24),
            "stage3": (28, 28, 32),
            "stage4": (14, 14, 96),
            "stage5": (7, 7, 1280),
        },
    ),
    "vit_b16": (1000, 768, {}),
    "vit_s16": (1000, 384, {}),
}


@functools.cache
def _abstract(name: str, num_classes: int, batch: int = 2):
    """(abstract variables, abstract (logits, features)) without materialising anything."""
    model = create_model(name, num_classes)
    x = jax.ShapeDtypeStruct((batch, *model_input_shape(name)), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    return variables, out


def _count(tree) -> int:
    return sum(math.prod(p.shape) for p in jax.tree.leaves(tree))


def test_registry_lists_every_model():
    # Segmentation models (logits [B, H, W, C]) are checked in tests/test_segmentation.py.
    classifiers = set(list_models()) - SEGMENTATION_MODELS
    assert classifiers == {name for name, _ in PARAM_COUNTS} == set(CONTRACT)


@pytest.mark.parametrize("name,num_classes", sorted(PARAM_COUNTS))
def test_param_count_equals_pytorch_reference(name, num_classes):
    variables, _ = _abstract(name, num_classes)
    assert _count(variables["params"]) == PARAM_COUNTS[(name, num_classes)]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_output_contract(name):
    num_classes, dim, stages = CONTRACT[name]
    variables, (logits, feats) = _abstract(name, num_classes)
    assert logits.shape == (2, num_classes) and logits.dtype == jnp.float32
    assert feats["pre_logits"].shape == (2, dim)
    for tap, shape in stages.items():
        assert feats[tap].shape == (2, *shape), tap
    has_bn = not name.startswith(("lenet", "vit"))
    assert ("batch_stats" in variables) == has_bn


def test_input_shapes():
    assert model_input_shape("lenet5") == (32, 32, 1)
    assert model_input_shape("wrn40_2") == (32, 32, 3)
    assert model_input_shape("resnet50") == (224, 224, 3)


def test_unknown_model_raises_with_name_and_known_models():
    with pytest.raises(ValueError, match="no_such_net") as err:
        create_model("no_such_net", 10)
    assert "resnet18_cifar" in str(err.value)
    with pytest.raises(ValueError, match="no_such_net"):
        model_input_shape("no_such_net")


# ---- naming and layout a PyTorch converter relies on (issue 8) ------------------------------


def _shapes(name, num_classes, collection="params"):
    variables, _ = _abstract(name, num_classes)
    flat = flax.traverse_util.flatten_dict(variables[collection], sep="/")
    return {k: tuple(v.shape) for k, v in flat.items()}


def test_pytorch_style_names_and_hwio_layout():
    p = _shapes("resnet18_cifar", 10)
    assert p["conv1/kernel"] == (3, 3, 3, 64)
    assert p["layer2_0/shortcut_0/kernel"] == (1, 1, 64, 128)
    assert p["layer2_0/shortcut_1/scale"] == (128,)
    assert p["linear/kernel"] == (512, 10)
    assert _shapes("resnet18_cifar", 10, "batch_stats")["layer1_0/bn1/mean"] == (64,)

    p = _shapes("resnet50", 1000)
    assert p["layer1_0/downsample_0/kernel"] == (1, 1, 64, 256)
    assert p["layer2_0/conv2/kernel"] == (3, 3, 128, 128)  # v1.5: the 3×3 conv has the stride
    assert p["fc/kernel"] == (2048, 1000)

    p = _shapes("wrn40_2", 10)
    assert p["block1/layer_0/convShortcut/kernel"] == (1, 1, 16, 32)
    assert p["block3/layer_5/bn2/scale"] == (128,)
    assert "block1/layer_1/convShortcut/kernel" not in p

    p = _shapes("vgg11", 10)
    assert p["block2_3/kernel"] == (3, 3, 256, 256) and p["block2_4/scale"] == (256,)
    assert p["classifier/kernel"] == (512, 10)

    p = _shapes("mobilenet_v2", 1000)
    assert p["features_0_0/kernel"] == (3, 3, 3, 32)
    assert p["features_1/conv_0_0/kernel"] == (3, 3, 1, 32)  # depthwise (kh, kw, 1, C)
    assert p["features_1/conv_1/kernel"] == (1, 1, 32, 16)
    assert p["features_2/conv_1_0/kernel"] == (3, 3, 1, 96)
    assert p["features_18_0/kernel"] == (1, 1, 320, 1280)
    assert p["classifier_1/kernel"] == (1280, 1000)

    p = _shapes("vit_b16", 1000)
    assert p["patch_embed/proj/kernel"] == (16, 16, 3, 768)
    assert p["cls_token"] == (1, 1, 768) and p["pos_embed"] == (1, 197, 768)
    assert p["blocks_11/attn/qkv/kernel"] == (768, 2304)
    assert p["blocks_0/mlp/fc2/kernel"] == (3072, 768)
    assert p["norm/scale"] == (768,) and p["head/kernel"] == (768, 1000)

    p = _shapes("lenet5", 10)
    assert p["conv3/kernel"] == (5, 5, 16, 120) and p["fc1/kernel"] == (120, 84)


def test_strided_conv_padding_is_symmetric_like_pytorch():
    # A 3×3 stride-2 conv with padding 1 on an even input: PyTorch pads 1 on both sides, Flax
    # "SAME" would pad (0, 1). With an all-ones kernel on all-ones input each output counts the
    # in-bounds taps of its window: symmetric padding gives [[4, 6], [6, 9]].
    c = conv2d(1, 3, in_features=1, stride=2, padding=1)
    y = c.apply({"params": {"kernel": jnp.ones((3, 3, 1, 1))}}, jnp.ones((1, 4, 4, 1)))
    np.testing.assert_allclose(np.asarray(y[0, :, :, 0]), [[4.0, 6.0], [6.0, 9.0]])


# ---- real forward passes on small models ---------------------------------------------------


def _numpy_variables(abstract, seed=0):
    """Concrete variables for an abstract tree, filled with NumPy (He-scaled normal kernels,
    BN scale 1 / bias 0, running mean 0 / var 1). `model.init` would compile one threefry
    program per parameter shape, which costs seconds per model on 2 CPU cores; the forward-pass
    tests only need sensible weights. `test_init_matches_pytorch_default_ranges` runs a real
    init."""
    rng = np.random.RandomState(seed)
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract))
    out = {}
    for path, leaf in flat.items():
        shape, leaf_name = tuple(leaf.shape), path[-1]
        if leaf_name == "kernel":
            fan_in = math.prod(shape[:-1])
            value = rng.normal(0.0, math.sqrt(2.0 / fan_in), shape)
        elif leaf_name in ("scale", "var"):
            value = np.ones(shape)
        elif leaf_name in ("bias", "mean"):
            value = np.zeros(shape)
        else:  # cls_token, pos_embed
            value = rng.normal(0.0, 0.02, shape)
        out[path] = jnp.asarray(value, leaf.dtype)
    return flax.traverse_util.unflatten_dict(out)


def _init(model, input_shape, batch=4, seed=0):
    x = jnp.asarray(np.random.RandomState(seed + 1).randn(batch, *input_shape), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    return _numpy_variables(abstract, seed), x


def _tiny_wrn(**kwargs):
    """WRN-10-1: one block per group, every layer type of the WRN family, cheap to compile."""
    return WideResNet(depth=10, widen_factor=1, num_classes=10, **kwargs)


def test_init_matches_pytorch_default_ranges():
    # rbg keys: the default threefry init compiles for ~10 s even for LeNet on 2 CPU cores.
    model = create_model("lenet5_half", 10)
    variables = jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 32, 32, 1)))
    p = variables["params"]
    # PyTorch default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    for layer, fan_in in (("conv1", 25), ("conv2", 75), ("conv3", 200), ("fc1", 60), ("fc2", 42)):
        bound = 1 / math.sqrt(fan_in)
        for leaf in ("kernel", "bias"):
            w = np.asarray(p[layer][leaf])
            assert np.abs(w).max() <= bound + 1e-6, (layer, leaf)
            if w.size >= 50:  # not all tiny: the scale is the PyTorch one, not smaller
                assert np.abs(w).max() > 0.5 * bound, (layer, leaf)


@pytest.mark.parametrize("name", ["lenet5", "lenet5_half"])
def test_lenet_forward_and_jit_equals_eager(name):
    """Jit equals eager, in float64 (a float64 model: compute dtype and variables)."""
    model = create_model(name, 10)
    variables, x = _init(model, (32, 32, 1))
    logits, feats = model.apply(variables, x)
    assert logits.shape == (4, 10) and np.all(np.isfinite(np.asarray(logits)))
    assert feats["pre_logits"].shape == (4, 84 if name == "lenet5" else 42)
    with jax.enable_x64(True):
        model64, variables, x = create_model(name, 10, dtype=jnp.float64), *as64((variables, x))
        logits, feats = model64.apply(variables, x)
        jitted, jfeats = jax.jit(model64.apply)(variables, x)
    assert jitted.dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(logits), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(
        np.asarray(jfeats["stage2"]), np.asarray(feats["stage2"]), rtol=1e-12, atol=1e-14
    )
    with pytest.raises(ValueError, match="32x32"):
        model.apply(variables, jnp.zeros((1, 28, 28, 1)))


def test_train_mode_updates_batch_stats_and_eval_is_deterministic():
    model = _tiny_wrn()
    variables, x = _init(model, (32, 32, 3), batch=8)
    train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))
    (logits, _), updates = train(variables, x)
    assert logits.shape == (8, 10)
    old = flax.traverse_util.flatten_dict(variables["batch_stats"], sep="/")
    new = flax.traverse_util.flatten_dict(updates["batch_stats"], sep="/")
    assert old.keys() == new.keys()
    changed = [k for k in old if not np.array_equal(np.asarray(old[k]), np.asarray(new[k]))]
    assert len(changed) == len(old)

    # PyTorch's momentum 0.1: the stem conv output feeds block1/layer_0/bn1 directly, so its
    # running mean after one step is 0.9 * 0 + 0.1 * (batch mean of the stem output).
    _, state = jax.jit(
        lambda v, x: model.apply(
            v, x, train=False, capture_intermediates=True, mutable=["intermediates"]
        )
    )(variables, x)
    stem_out = np.asarray(state["intermediates"]["conv1"]["__call__"][0])
    np.testing.assert_allclose(
        np.asarray(new["block1/layer_0/bn1/mean"]),
        0.1 * stem_out.mean(axis=(0, 1, 2)),
        rtol=1e-4,
        atol=1e-6,
    )

    v2 = {"params": variables["params"], "batch_stats": updates["batch_stats"]}
    a, fa = evaluate(v2, x)
    b, fb = evaluate(v2, x)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(fa["pre_logits"]), np.asarray(fb["pre_logits"]))
    # Eval normalises with the running statistics, not the batch's.
    assert not np.allclose(np.asarray(a), np.asarray(logits))


def test_dropout_needs_rng_only_in_training():
    model = _tiny_wrn(dropout_rate=0.3)
    variables, x = _init(model, (32, 32, 3), batch=2)
    train = jax.jit(
        lambda v, x, k: model.apply(v, x, train=True, mutable=["batch_stats"], rngs={"dropout": k})[
            0
        ][0]
    )
    a = train(variables, x, jax.random.key(1, impl="rbg"))
    b = train(variables, x, jax.random.key(2, impl="rbg"))
    assert not np.allclose(np.asarray(a), np.asarray(b))
    out, _ = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    assert out.shape == (2, 10)  # eval needs no rng
    # MobileNetV2 keeps torchvision's dropout 0.2: training without a "dropout" rng fails early,
    # naming the layer, instead of silently skipping it.
    mnv2 = create_model("mobilenet_v2", 10)
    x = jnp.zeros((2, 32, 32, 3))
    v = jax.eval_shape(lambda x: mnv2.init(jax.random.key(0), x), x)
    with pytest.raises(Exception, match="classifier_0"):
        jax.eval_shape(lambda v, x: mnv2.apply(v, x, train=True, mutable=["batch_stats"]), v, x)


def test_bfloat16_compute_keeps_float32_params():
    model = create_model("lenet5", 10, dtype=jnp.bfloat16)
    variables, x = _init(model, (32, 32, 1))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables["params"]))
    logits, feats = jax.jit(model.apply)(variables, x)
    assert logits.dtype == jnp.float32
    assert feats["pre_logits"].dtype == jnp.bfloat16
    ref, _ = jax.jit(create_model("lenet5", 10).apply)(variables, x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.1, rtol=0.05)


def test_small_vit_forward():
    model = VisionTransformer(
        num_classes=5, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4
    )
    variables, x = _init(model, (32, 32, 3), batch=2)
    logits, feats = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 5) and np.all(np.isfinite(np.asarray(logits)))
    assert feats["tokens"].shape == (2, 17, 32) and feats["pre_logits"].shape == (2, 32)
    np.testing.assert_array_equal(
        np.asarray(feats["pre_logits"]), np.asarray(feats["tokens"][:, 0])
    )
    with pytest.raises(ValueError, match="img_size"):
        jax.eval_shape(model.apply, variables, jnp.zeros((1, 64, 64, 3)))
    headless = VisionTransformer(
        num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4
    )
    v = jax.eval_shape(lambda x: headless.init(jax.random.key(0), x), x)
    out, _ = jax.eval_shape(headless.apply, v, x)
    assert out.shape == (2, 32) and "head" not in v["params"]


@pytest.mark.parametrize(
    "shape,kernel,stride,pad,auto",
    [
        ((3, 9, 9, 5), (3, 3, 5, 7), 1, 1, "im2col-backward"),  # odd size: no Winograd; chunks of 1
        ((2, 9, 7, 4), (3, 3, 4, 6), 2, 1, "im2col-backward"),  # strided, last column not reached
        ((2, 8, 8, 6), (1, 1, 6, 3), 2, 0, "im2col-backward"),  # 1x1 strided shortcut
        ((2, 12, 12, 1), (5, 5, 1, 4), 1, 0, "im2col-backward"),  # LeNet-style 5x5 valid
        ((16, 6, 6, 32), (3, 3, 32, 8), 1, 1, "im2col"),  # deep: the im2col forward
        ((3, 8, 6, 5), (3, 3, 5, 7), 1, 1, "im2col-backward"),  # Winograd fits, too thin for auto
        ((2, 8, 8, 64), (3, 3, 64, 72), 1, 1, "winograd"),  # Winograd under the automatic rule
    ],
)
def test_chunked_convolutions_equal_xla_convolution(shape, kernel, stride, pad, auto):
    """The chunked im2col and Winograd convolutions (XLA:CPU speed-ups) are the same convolution:
    in float64, forward and input/kernel gradients equal XLA's own to ~1e-15 of their scale,
    jitted and eager, with each method forced and with the automatic per-layer choice (which
    takes `auto`). Their float32 accuracy is checked against float64 references below."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=shape), jnp.float64)
        w = jnp.asarray(rng.normal(size=kernel) / np.sqrt(np.prod(kernel[:3])), jnp.float64)
        probe = jnp.asarray(rng.normal(size=(1,)), jnp.float64)
        dn = jax.lax.conv_dimension_numbers(shape, kernel, ("NHWC", "HWIO", "NHWC"))

        def loss(x, w, conv):  # a non-trivial output gradient
            y = cpu_conv.conv_general_dilated(
                x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=dn, conv=conv
            )
            return jnp.sum(jnp.sin(y) * probe), y

        fits = cpu_conv.winograd_fits(shape, kernel, (stride, stride), ((pad, pad),) * 2)
        results = {}
        for mode in ("xla", "im2col", "winograd", "auto"):
            method = cpu_conv.conv_method(
                shape, kernel, (stride, stride), ((pad, pad),) * 2, conv=mode
            )
            assert method == cpu_conv.conv_method(
                shape, kernel, (stride, stride), ((pad, pad),) * 2, jnp.float64, mode
            )
            assert (
                method
                == {
                    "xla": "xla",
                    "im2col": "im2col",
                    "auto": auto,
                    "winograd": "winograd" if fits else "im2col",
                }[mode]
            )
            grad = jax.grad(functools.partial(loss, conv=mode), argnums=(0, 1), has_aux=True)
            (gx, gw), y = grad(x, w)
            (jx, jw), _ = jax.jit(grad)(x, w)
            # the chunked loop is in the program exactly when a chunked convolution is taken
            assert ("while" in jax.jit(grad).lower(x, w).as_text()) == (mode != "xla")
            for got, want in ((jx, gx), (jw, gw)):  # jit vs eager
                assert got.dtype == jnp.float64
                scale = float(jnp.max(jnp.abs(want)))
                np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13 * scale)
            results[mode] = (y, gx, gw)
        for mode in ("im2col", "winograd", "auto"):
            for a, b in zip(results["xla"], results[mode]):
                scale = float(jnp.max(jnp.abs(a)))
                np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-13 * scale)
    assert float(jnp.max(jnp.abs(results["im2col"][2]))) > 1e-2  # the test has teeth


def test_chunked_convolutions_on_a_sharded_batch():
    """With the batch sharded over the 8 test devices and `groups=8` (chunks cut per device
    block, the weight gradient summed across blocks) the im2col and Winograd convolutions'
    gradients equal XLA's on one device, in float64; one device's block scaled by 1.01 does
    not."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(32, 6, 6, 16)), jnp.float64)
        w = jnp.asarray(rng.normal(size=(3, 3, 16, 8)) / 12.0, jnp.float64)
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        mesh = Mesh(np.array(jax.devices()), ("data",))
        xs = jax.device_put(x, NamedSharding(mesh, P("data")))

        def grads(conv):
            return jax.jit(
                jax.grad(
                    lambda x, w: jnp.sum(
                        jnp.cos(
                            cpu_conv.conv_general_dilated(
                                x,
                                w,
                                (1, 1),
                                ((1, 1), (1, 1)),
                                dimension_numbers=dn,
                                conv=conv,
                                groups=8,
                            )
                        )
                    ),
                    (0, 1),
                )
            )

        want = grads("xla")(x, w)
        # the weight gradient's running sum has one block per device
        blocks = {"im2col": "tensor<8x144x8xf64>", "winograd": "tensor<8x16x16x8xf64>"}
        for mode in ("im2col", "winograd"):
            assert (
                cpu_conv.conv_method(x.shape, w.shape, (1, 1), ((1, 1), (1, 1)), jnp.float64, mode)
                == mode
            )
            chunked = grads(mode)
            program = str(chunked.lower(xs, w).as_text())
            assert "while" in program and blocks[mode] in program  # the chunked loop runs
            got = chunked(xs, w)
            broken = chunked(jax.device_put(x.at[4:8].multiply(1.01), xs.sharding), w)
            scale = max(float(jnp.max(jnp.abs(g))) for g in want)
            same = record(
                f"{mode} convolution gradients, batch on 8 devices vs XLA on 1 (relative)",
                max_distance(got, want) / scale,
            )
            off = record(
                f"{mode} convolution gradients, one block x1.01 (broken, relative)",
                max_distance(broken[1], want[1]) / scale,
            )
            assert same < 1e-12, (mode, same)
            assert off > 1e-6, (mode, off)
            assert got[0].sharding.spec == P("data")


def test_im2col_weight_gradient_against_float64():
    """The weight gradient is a reduction over B*H*W = 32,768 rows: against a float64 NumPy
    reference the chunked im2col one is within 2x XLA's own float32 error (or 1e-6 of the
    gradient's scale, whichever is larger: ~8 float32 ulps, for a CPU where XLA's is tiny) and
    below 1e-5 of the scale (measured: ~1e-7 for both)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 32, 32, 1)).astype(np.float32)
    w = (0.3 * rng.normal(size=(3, 3, 1, 16))).astype(np.float32)
    g = rng.normal(size=(32, 32, 32, 16)).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = np.stack(
        [
            np.einsum("bhwc,bhwo->co", xp[:, i : i + 32, j : j + 32], g.astype(np.float64))
            for i in range(3)
            for j in range(3)
        ]
    ).reshape(w.shape)
    err = {}
    for mode in ("xla", "im2col"):
        dw = jax.jit(
            jax.grad(
                lambda w: jnp.sum(
                    cpu_conv.conv_general_dilated(
                        jnp.asarray(x), w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, conv=mode
                    )
                    * g
                )
            )
        )(w)
        err[mode] = float(np.max(np.abs(np.asarray(dw, np.float64) - want)) / np.abs(want).max())
    record("im2col weight gradient, float32 error / XLA's", err["im2col"] / err["xla"])
    assert err["xla"] < 1e-5, err  # the reference is right
    assert err["im2col"] <= max(2 * err["xla"], 1e-6), err
    assert err["im2col"] < 1e-5, err


def test_winograd_convolution_against_float64():
    """Forward, input and weight gradient of the Winograd convolution against a float64 NumPy
    reference: within 3x XLA's own float32 error (or 2e-6 of the output scale, whichever is
    larger) and below 1e-5 of the scale. The transforms add up to 16 terms, but the matmuls
    are 9x shorter and the weight gradient is summed per chunk. Measured (of the output
    scale): 3.1e-7 / 2.5e-7 / 4.6e-7 vs XLA's 6.7e-7 / 7.7e-7 / 1.7e-6 on one CPU, and a dW
    of 4.57e-7 vs XLA's 4.53e-7 on another (where "<= XLA's" failed), and a dW of 1.10e-6 vs
    XLA's 4.53e-7 on a 2-core Intel Xeon with AMX (where "<= max(2x, 1e-6)" failed)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 16, 16, 32)).astype(np.float32)
    w = (rng.normal(size=(3, 3, 32, 48)) / np.sqrt(9 * 32)).astype(np.float32)
    g = rng.normal(size=(16, 16, 16, 48)).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    xp = np.pad(x64, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifts = [(i, j) for i in range(3) for j in range(3)]
    want_y = sum(
        np.einsum("bhwc,co->bhwo", xp[:, i : i + 16, j : j + 16], w64[i, j]) for i, j in shifts
    )
    want_dw = np.stack(
        [np.einsum("bhwc,bhwo->co", xp[:, i : i + 16, j : j + 16], g64) for i, j in shifts]
    ).reshape(w.shape)
    gp = np.pad(g64, ((0, 0), (1, 1), (1, 1), (0, 0)))  # dx: g correlated with the flipped kernel
    want_dx = sum(
        np.einsum("bhwo,co->bhwc", gp[:, 2 - i : 18 - i, 2 - j : 18 - j], w64[i, j])
        for i, j in shifts
    )
    err = {}
    for mode in ("xla", "winograd"):
        y, vjp = jax.vjp(
            lambda x, w: cpu_conv.conv_general_dilated(
                x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, conv=mode
            ),
            jnp.asarray(x),
            jnp.asarray(w),
        )
        dx, dw = vjp(jnp.asarray(g))
        err[mode] = [
            float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.abs(want).max())
            for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw))
        ]
    for name, xla, winograd in zip(("forward", "dx", "dW"), err["xla"], err["winograd"]):
        record(f"Winograd {name}, float32 error / XLA's", winograd / xla)
        assert xla < 1e-5, (name, err)  # the reference is right
        assert winograd <= max(3 * xla, 2e-6), (name, err)
        assert winograd < 1e-5, (name, err)


def test_chunked_convolutions_in_float64():
    """Float64 inputs stay float64 through the chunked convolutions: forward and both gradients
    equal XLA's float64 convolution to ~1e-13 (the weight gradient's sum over chunks once ran in
    float32 and was off by ~1e-7)."""
    rng = np.random.default_rng(3)
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(8, 8, 8, 64)), jnp.float64)
        w = jnp.asarray(rng.normal(size=(3, 3, 64, 64)) / 24.0, jnp.float64)
        g = jnp.asarray(rng.normal(size=(8, 8, 8, 64)), jnp.float64)
        dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        results = {}
        for mode in ("xla", "im2col", "winograd"):
            assert (
                cpu_conv.conv_method(x.shape, w.shape, (1, 1), ((1, 1), (1, 1)), jnp.float64, mode)
                == mode
            )
            y, vjp = jax.vjp(
                jax.jit(
                    lambda x, w: cpu_conv.conv_general_dilated(
                        x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, conv=mode
                    )
                ),
                x,
                w,
            )
            results[mode] = (y, *vjp(g))
        for mode in ("im2col", "winograd"):
            for name, got, want in zip(("forward", "dx", "dW"), results[mode], results["xla"]):
                assert got.dtype == jnp.float64, (mode, name)
                err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
                assert err < 1e-12, (mode, name, err)


def test_winograd_transforms_are_transposes():
    """The backward pass's hand-written tile transforms are the exact transposes of the forward
    ones (overlapping input tiles added back in place; output tiles spread to 4x4)."""
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):  # exact linear maps: float64 leaves only ~1e-16
        x = jnp.asarray(rng.normal(size=(2, 6, 8, 3)), jnp.float64)
        v = cpu_conv.winograd_tiles(x)
        assert v.shape == (16, 2 * 3 * 4, 3)
        dv = jnp.asarray(rng.normal(size=v.shape), jnp.float64)
        (want,) = jax.linear_transpose(cpu_conv.winograd_tiles, x)(dv)
        np.testing.assert_allclose(cpu_conv.winograd_tiles_transpose(dv, x.shape), want, atol=1e-13)
        g = jnp.asarray(rng.normal(size=(2, 6, 8, 5)), jnp.float64)
        out = functools.partial(cpu_conv.winograd_output, shape=g.shape)
        (want,) = jax.linear_transpose(out, jnp.zeros((16, 2 * 3 * 4, 5)))(g)
        np.testing.assert_allclose(cpu_conv.winograd_grad_tiles(g), want, atol=1e-13)


def test_conv_method_rule_on_resnet_layers():
    """The automatic rule on a CIFAR ResNet at 32 px: Winograd for the 3x3 stride-1 layers from
    64 channels and 8x8 maps, im2col (deep) or XLA's forward (shallow) elsewhere."""
    same = ((1, 1), (1, 1))
    assert cpu_conv.conv_method((64, 32, 32, 3), (3, 3, 3, 64), (1, 1), same) == "im2col-backward"
    assert cpu_conv.conv_method((64, 32, 32, 64), (3, 3, 64, 64), (1, 1), same) == "winograd"
    assert cpu_conv.conv_method((64, 32, 32, 64), (3, 3, 64, 128), (2, 2), same) == "im2col"
    assert cpu_conv.conv_method((64, 8, 8, 256), (3, 3, 256, 256), (1, 1), same) == "winograd"
    assert cpu_conv.conv_method((64, 4, 4, 512), (3, 3, 512, 512), (1, 1), same) == "im2col"
    assert cpu_conv.conv_method((64, 32, 32, 16), (3, 3, 16, 16), (1, 1), same) == "im2col-backward"
    assert cpu_conv.conv_method((64, 16, 16, 32), (3, 3, 32, 32), (1, 1), same) == "im2col"
    assert cpu_conv.conv_method((0, 8, 8, 64), (3, 3, 64, 64), (1, 1), same) == "xla"
    assert (
        cpu_conv.conv_method((64, 32, 32, 64), (3, 3, 64, 64), (1, 1), same, jnp.bfloat16)
        == "im2col"
    )  # no Winograd transforms in bfloat16


def test_conv_choice_is_checked():
    """A bad `config.model.conv` fails by name, in `create_model` and in the convolution itself."""
    x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2))
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    with pytest.raises(ValueError, match="config.model.conv='fast'"):
        create_model("lenet5", 10, conv="fast")
    with pytest.raises(ValueError, match="config.model.conv"):
        cpu_conv.conv_general_dilated(
            x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn, conv="fast"
        )


def test_models_pass_the_conv_choice_to_their_layers(monkeypatch):
    """`create_model(conv=...)` reaches every conv layer: "xla" leaves XLA's convolution (no
    chunk loop in the training program), "auto" on the CPU and "im2col" take the chunked one,
    and "auto" on another backend does not trace `cpu_conv` at all."""
    x = jnp.zeros((8, 32, 32, 1))

    def program(conv):
        model = create_model("wrn10_1_half", 10, conv=conv, conv_groups=8)
        variables = model.init(jax.random.key(0), x[:1])

        def loss(params):
            (logits, _), _ = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(logits)

        return jax.jit(jax.grad(loss)).lower(variables["params"]).as_text()

    traced, real = [], cpu_conv.conv_general_dilated

    def spy(*args, conv, groups, **kwargs):
        traced.append((conv, groups))
        return real(*args, conv=conv, groups=groups, **kwargs)

    monkeypatch.setattr(cpu_conv, "conv_general_dilated", spy)
    assert "while" not in program("xla") and not traced
    assert "while" in program("auto") and traced[-1] == ("auto", 8)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    traced.clear()
    assert "while" not in program("auto") and not traced
    program("im2col")  # a forced algorithm applies on any backend
    assert traced[-1] == ("im2col", 8)
