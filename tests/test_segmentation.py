"""Segmentation: confusion-matrix metrics, per-pixel losses, DeepLabV3 models, mask data with
joint augmentation, SegMNIST, and the teacher / KD step (8 devices = 1 device)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import config, max_distance, record, write_fake_nyuv2

from kd_jax import losses, metrics, models, parallel
from kd_jax.data import pipeline, segmnist
from kd_jax.methods import get_method

IGNORE = 255

# ----- metrics -------------------------------------------------------------------------------


def _reference_scores(labels, preds, weights, num_classes):
    """Pixel loops in NumPy: counts, then IoU = TP / (TP + FP + FN) over classes with a
    nonzero union, pixel accuracy = correct / counted."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    for b in range(labels.shape[0]):
        if weights[b] <= 0:
            continue
        for t, p in zip(labels[b].ravel(), preds[b].ravel()):
            if t != IGNORE and 0 <= t < num_classes:
                cm[t, p] += 1
    ious = []
    for c in range(num_classes):
        tp, fp, fn = cm[c, c], cm[:, c].sum() - cm[c, c], cm[c, :].sum() - cm[c, c]
        ious.append(tp / (tp + fp + fn) if tp + fp + fn else np.nan)
    return cm, np.array(ious), np.nanmean(ious), np.trace(cm) / cm.sum()


def test_segmentation_metrics_against_numpy_on_hand_made_cases():
    # One image by hand: class 2 only predicted (IoU 0), class 3 absent from both (left out of
    # the mean), one ignore pixel (counted nowhere).
    labels = np.array([[[0, 0, 1, 1], [IGNORE, 1, 0, 0]]])
    preds = np.array([[[0, 0, 1, 2], [0, 0, 1, 0]]])
    # class 0: TP = 3, FN = 1 (a 0 read as 1), FP = 1 (a 1 read as 0): IoU 3/5
    # class 1: TP = 1, FN = 2 (read as 2 and 0), FP = 1: IoU 1/4; class 2: FP = 1 only: IoU 0
    with jax.enable_x64(True):
        cm = metrics.confusion_matrix(labels, preds, 4)
        iou = np.asarray(metrics.per_class_iou(cm))
        np.testing.assert_allclose(iou[:3], [3 / 5, 1 / 4, 0.0])
        assert np.isnan(iou[3])
        assert float(metrics.mean_iou(cm)) == pytest.approx((3 / 5 + 1 / 4 + 0) / 3, abs=1e-15)
        assert float(metrics.pixel_accuracy(cm)) == pytest.approx(4 / 7, abs=1e-15)
        scores = metrics.segmentation_scores(cm)
        assert scores["per_class_iou"][3] is None and scores["miou"] == pytest.approx(0.2833333)

        rng = np.random.default_rng(0)
        for trial in range(3):
            c = 5
            lab = rng.integers(0, c, (6, 5, 7))
            lab[rng.uniform(size=lab.shape) < 0.2] = IGNORE
            lab[lab == 3] = 1  # class 3 never labeled ...
            pred = rng.integers(0, c, lab.shape)
            if trial % 2:
                pred[pred == 3] = 0  # ... and in odd trials never predicted either
            w = np.array([1, 1, 0, 1, 1, 0.0])  # two padded images
            ref_cm, ref_iou, ref_miou, ref_acc = _reference_scores(lab, pred, w, c)
            cm = metrics.confusion_matrix(lab, pred, c, w)
            np.testing.assert_array_equal(np.asarray(cm), ref_cm)
            np.testing.assert_allclose(metrics.per_class_iou(cm), ref_iou, rtol=1e-15)
            assert float(metrics.mean_iou(cm)) == pytest.approx(ref_miou, rel=1e-14)
            assert float(metrics.pixel_accuracy(cm)) == pytest.approx(ref_acc, rel=1e-14)
            jitted = jax.jit(metrics.confusion_matrix, static_argnums=2)(lab, pred, c, w)
            np.testing.assert_array_equal(np.asarray(jitted), ref_cm)
        # summing per-batch matrices = the matrix of the whole set (what eval accumulates)
        halves = sum(
            np.asarray(metrics.confusion_matrix(lab[s], pred[s], c, w[s]))
            for s in (slice(0, 3), slice(3, 6))
        )
        np.testing.assert_array_equal(halves, ref_cm)
    empty = metrics.confusion_matrix(np.full((1, 2, 2), IGNORE), np.zeros((1, 2, 2)), 3)
    assert np.isnan(float(metrics.mean_iou(empty))) and np.isnan(
        float(metrics.pixel_accuracy(empty))
    )


def test_pixel_losses_against_numpy():
    rng = np.random.default_rng(1)
    with jax.enable_x64(True):
        z = rng.normal(size=(3, 4, 5, 6)) * 2
        t = rng.normal(size=(3, 4, 5, 6)) * 2
        lab = rng.integers(0, 6, (3, 4, 5))
        lab[0, 0] = IGNORE
        w = np.array([1.0, 0.0, 1.0])
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logp, np.where(lab == IGNORE, 0, lab)[..., None], -1)[..., 0]
        keep = (lab != IGNORE) & (w[:, None, None] > 0)
        ce = losses.pixel_cross_entropy(z, lab, weights=w)
        assert float(ce) == pytest.approx(nll[keep].mean(), rel=1e-13)
        tau = 3.0
        pt = np.exp(t / tau) / np.exp(t / tau).sum(-1, keepdims=True)
        lq = z / tau - np.log(np.exp(z / tau).sum(-1, keepdims=True))
        kl = (pt * (np.log(pt) - lq)).sum(-1)
        kd = losses.pixel_kd_loss(z, t, temperature=tau, weights=w)
        assert float(kd) == pytest.approx(tau**2 * kl[w > 0].mean(), rel=1e-12)
        # a padded image (weight 0) changes nothing, whatever it holds
        z2 = z.copy()
        z2[1] = 1e3
        assert float(losses.pixel_kd_loss(z2, t, tau, w)) == pytest.approx(float(kd), rel=1e-14)


# ----- models --------------------------------------------------------------------------------


def _conv(cin, cout, k, bias=False):
    return cin * cout * k * k + (cout if bias else 0)


def _aspp_head(cin, classes):
    """torchvision DeepLabHead(cin, classes): ASPP (1x1, three 3x3, pooling 1x1, 1x1 project
    of 5*256, each + BN), 3x3 conv + BN, 1x1 conv with bias."""
    bn = 2 * 256
    aspp = 2 * (_conv(cin, 256, 1) + bn) + 3 * (_conv(cin, 256, 3) + bn)
    aspp += _conv(5 * 256, 256, 1) + bn
    return aspp + _conv(256, 256, 3) + bn + _conv(256, classes, 1, bias=True)


def _torchvision_deeplabv3_resnet50(classes):
    """Parameters of torchvision's deeplabv3_resnet50(num_classes, aux_loss=False): ResNet-50
    without avgpool / fc, then DeepLabHead(2048)."""
    n, c = _conv(3, 64, 7) + 2 * 64, 64
    for planes, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for i in range(blocks):
            n += _conv(c, planes, 1) + _conv(planes, planes, 3) + _conv(planes, 4 * planes, 1)
            n += 2 * (planes + planes + 4 * planes)
            if i == 0:
                n += _conv(c, 4 * planes, 1) + 2 * 4 * planes
            c = 4 * planes
    return n + _aspp_head(2048, classes)


def _vainf_deeplabv3_mobilenetv2(classes):
    """Parameters of DFAD's DeepLabV3-MobileNetV2 (VainF): torchvision MobileNetV2 features
    0..17 (stem + 17 inverted residuals, no 1x1 conv to 1280), then DeepLabHead(320)."""
    n, c = _conv(3, 32, 3) + 2 * 32, 32
    for t, out, blocks, _ in ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                              (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)):  # fmt: skip
        for _ in range(blocks):
            hidden = c * t
            if t != 1:
                n += _conv(c, hidden, 1) + 2 * hidden
            n += hidden * 9 + 2 * hidden + _conv(hidden, out, 1) + 2 * out
            c = out
    return n + _aspp_head(320, classes)


def _abstract(name, classes, output_stride, size, channels=3):
    model = models.create_model(name, classes, output_stride=output_stride)
    x = jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
    out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables, x)
    return variables, out


def test_deeplabv3_parameter_counts_and_shapes_at_both_output_strides():
    # 39,638,869 = torchvision's 42,004,074 (aux_loss=True, 21 classes) - its FCNHead(1024)
    assert _torchvision_deeplabv3_resnet50(21) == 39_638_869
    assert _vainf_deeplabv3_mobilenetv2(21) == 5_113_877
    refs = {"deeplabv3_resnet50": _torchvision_deeplabv3_resnet50,
            "deeplabv3_mobilenetv2": _vainf_deeplabv3_mobilenetv2}  # fmt: skip
    size = 128
    for name, ref in refs.items():
        for stride in (8, 16):
            variables, (logits, feats) = _abstract(name, 13, stride, size)
            n = sum(math.prod(p.shape) for p in jax.tree.leaves(variables["params"]))
            assert n == ref(13), (name, stride, n)
            assert logits.shape == (2, size, size, 13) and logits.dtype == jnp.float32
            assert feats["aspp"].shape == (2, size // stride, size // stride, 256)
            assert feats["head"].shape == (2, size // stride, size // stride, 256)
            assert feats["pre_logits"].shape == (2, 256)
    with pytest.raises(ValueError, match="output_stride=4"):
        _abstract("deeplabv3_resnet50", 13, 4, size)


def test_small_deeplabv3_forward_at_both_output_strides():
    """Real (jitted) forward passes of the SegMNIST models: logits at input resolution, finite,
    train mode updating BatchNorm; the head's map at 1/output_stride."""
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 1)).astype(np.float32)
    for name, stride in (("deeplabv3_resnet_small", 16), ("deeplabv3_mobilenetv2_small", 8)):
        model = models.create_model(name, 11, output_stride=stride)
        v = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(x)
        (logits, feats), upd = jax.jit(
            lambda v, x: model.apply(
                v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
            )
        )(v, x)
        assert logits.shape == (2, 32, 32, 11) and np.isfinite(np.asarray(logits)).all()
        assert feats["head"].shape[1:3] == (32 // stride, 32 // stride)
        assert max_distance(upd["batch_stats"], v["batch_stats"]) > 0
        other = 24 - stride  # the other stride, shapes only
        _, (_, feats) = _abstract(name, 11, other, 32, channels=1)
        assert feats["head"].shape[1:3] == (32 // other, 32 // other)


# ----- data ----------------------------------------------------------------------------------


def _block_image(rng, size=64, block=8, classes=8):
    """An image of constant blocks whose mask is a function of its pixels: class c has
    intensity 30 c + 15."""
    cls = rng.integers(0, classes, (size // block, size // block))
    mask = np.kron(cls, np.ones((block, block), np.int64))
    return (30 * mask + 15).astype(np.uint8)[..., None], mask


def _agreement(image, mask):
    """Fraction of the mask's interior pixels (labeled, with the same label at the 8 pixels
    around: away from the edges, where bilinear image values blend) whose decoded intensity
    is their mask class; and the interior's share of the image."""
    v = np.asarray(image)[..., 0] * 255.0  # normalisation "none" maps to [0, 1]
    m = np.asarray(mask)
    p = np.pad(m, 1, constant_values=IGNORE)
    h, w = m.shape
    same = [
        p[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == m for dy in (-1, 0, 1) for dx in (-1, 0, 1)
    ]
    interior = np.all(same, axis=0) & (m != IGNORE)
    decoded = np.round((v - 15) / 30)
    return np.mean(decoded[interior] == m[interior]), interior.mean()


def test_joint_augmentation_keeps_image_and_mask_aligned():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    image, mask = _block_image(rng)
    element = {"image": tf.constant(image), "label": tf.constant(mask, tf.int32)}
    domain = pipeline.Domain(48, 1, "none", task="segmentation", scale_range=(0.5, 2.0))
    flipped_image_only = []
    for k in range(12):
        seed = tf.constant([7, k], tf.int64)
        out, m = pipeline.preprocess_segmentation(element, domain, "scale_crop_flip", seed)
        assert out.shape == (48, 48, 1) and m.shape == (48, 48) and m.dtype == tf.int32
        agree, share = _agreement(out, m)
        assert agree > 0.999 and share > 0.1, (k, agree, share)
        flipped_image_only.append(_agreement(out[:, ::-1], m)[0])
        assert set(np.unique(m)) <= set(range(8)) | {IGNORE}
    # the check sees a misalignment: the image flipped alone agrees far less
    assert np.mean(flipped_image_only) < 0.6, flipped_image_only
    # the zoom-out draws pad the crop: padded pixels are ignore, image 0 there
    small = pipeline.Domain(96, 1, "none", task="segmentation", scale_range=(1.0, 1.0))
    out, m = pipeline.preprocess_segmentation(element, small, "crop_flip", tf.constant([1, 2]))
    m = np.asarray(m)
    assert (m == IGNORE).mean() == pytest.approx(1 - 64 * 64 / 96**2)
    assert np.all(np.asarray(out)[m == IGNORE] == 0)
    # eval: full resolution, or a fixed size (mask nearest)
    out, m = pipeline.preprocess_segmentation(element, domain, "none")
    assert out.shape == (64, 64, 1) and np.array_equal(np.asarray(m), mask)
    fixed = pipeline.Domain(48, 1, "none", task="segmentation", eval_size=32)
    out, m = pipeline.preprocess_segmentation(element, fixed, "none")
    assert out.shape == (32, 32, 1) and _agreement(out, m)[0] > 0.999
    # an unlabeled (pool) image takes the same geometry and gets no mask
    pool = {"image": tf.constant(image), "label": tf.constant(-1, tf.int64)}
    out, m = pipeline.preprocess_segmentation(pool, domain, "scale_crop_flip", tf.constant([7, 0]))
    assert m is None and out.shape == (48, 48, 1)


def test_scale_crop_never_flips_and_the_flip_variant_does():
    """Digits are not mirror-symmetric: `scale_crop` (SegMNIST) must keep the orientation."""
    import tensorflow as tf

    image, mask = _block_image(np.random.default_rng(0))
    element = {"image": tf.constant(image), "label": tf.constant(mask, tf.int32)}
    # canvas-sized crop, no rescale: any geometry left is a flip
    domain = pipeline.Domain(64, 1, "none", task="segmentation", scale_range=(1.0, 1.0))
    mirrored = []
    for k in range(8):
        seed = tf.constant([3, k], tf.int64)
        out, m = pipeline.preprocess_segmentation(element, domain, "scale_crop", seed)
        assert np.array_equal(np.asarray(m), mask), k
        assert np.allclose(np.asarray(out)[..., 0] * 255.0, image[..., 0], atol=1e-3), k
        _, m = pipeline.preprocess_segmentation(element, domain, "scale_crop_flip", seed)
        mirrored.append(np.array_equal(np.asarray(m), mask[:, ::-1]))
    assert 0 < sum(mirrored) < 8, mirrored  # the flip variant flips about half of the draws


def _spec(**kw):
    import ml_collections

    return ml_collections.ConfigDict({"task": "segmentation", **kw})


def test_mask_sources_npz_and_folder_and_padded_eval_batches(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    pairs = [_block_image(rng, size=32) for _ in range(5)]
    images = np.stack([p[0] for p in pairs]).repeat(3, -1)
    masks = np.stack([p[1] for p in pairs]).astype(np.uint8)
    masks[0, :2] = IGNORE
    np.savez(tmp_path / "seg.npz", images=images, masks=masks)
    for split in ("train", "test"):
        for d in ("images", "masks"):
            os.makedirs(tmp_path / "f" / split / d)
        for i in range(5):
            Image.fromarray(images[i]).save(tmp_path / "f" / split / "images" / f"{i:03d}.png")
            Image.fromarray(masks[i]).save(tmp_path / "f" / split / "masks" / f"{i:03d}.png")
    native = pipeline.Domain(32, 3, "none", task="segmentation")
    sized = pipeline.Domain(32, 3, "none", task="segmentation", eval_size=32)
    for spec, domain in (
        (_spec(source="npz", path=str(tmp_path / "seg.npz")), native),
        (_spec(source="folder", path=str(tmp_path / "f")), sized),  # decoded: size unknown
    ):
        ds, n = pipeline.open_source(spec, "test")
        assert n == 5
        got = list(ds.as_numpy_iterator())
        assert all(g["label"].shape == (32, 32) for g in got)
        np.testing.assert_array_equal(np.stack([g["label"] for g in got]), masks)
        batches = list(
            pipeline.eval_batches(
                ds, host_count=5, max_host_count=5, local_batch=4, domain=domain
            ).as_numpy_iterator()
        )
        assert len(batches) == 2 and batches[1]["mask"].tolist() == [1, 0, 0, 0]
        assert np.all(batches[1]["label"][1:] == IGNORE)
        np.testing.assert_allclose(batches[0]["image"][..., 0] * 255, images[:4, ..., 0], atol=1e-4)
    with pytest.raises(ValueError, match="set config.data.eval_size"):
        pipeline.eval_batches(ds, host_count=5, max_host_count=5, local_batch=4, domain=native)
    np.savez(tmp_path / "bad.npz", images=images, masks=masks[:, :16])
    with pytest.raises(ValueError, match="masks must be integer"):
        pipeline.open_source(_spec(source="npz", path=str(tmp_path / "bad.npz")), "test")
    os.remove(tmp_path / "f" / "test" / "masks" / "004.png")
    with pytest.raises(ValueError, match="unmatched: \\['004'\\]"):
        pipeline.open_source(_spec(source="folder", path=str(tmp_path / "f")), "test")


def test_segmnist_canvases_use_only_their_split_digits():
    from kd_jax.data import offline

    d = offline.mnist5k()
    for split, count in (("train", segmnist.TRAIN_CANVASES), ("test", segmnist.TEST_CANVASES)):
        c = segmnist.canvases(split)
        assert c["images"].shape == (count, 64, 64, 1) and c["masks"].shape == (count, 64, 64)
        used = c["digits"]
        assert used.max() < len(d[f"{split}_labels"]) and (used[:, 0] >= 0).all()
        labels = d[f"{split}_labels"]
        for k in range(0, count, 97):  # mask classes = the classes of the digits pasted there
            classes = set(np.unique(c["masks"][k])) - {segmnist.BACKGROUND}
            assert classes <= {int(labels[i]) for i in used[k] if i >= 0}
            stroke = c["masks"][k] != segmnist.BACKGROUND
            assert np.all(c["images"][k, ..., 0][stroke] >= segmnist.STROKE)
    np.testing.assert_array_equal(segmnist.canvases("train")["masks"][:3], c_train_again())


def c_train_again():
    """The train canvases rebuilt from scratch (fixed seed: identical)."""
    segmnist._canvases.cache_clear()
    return segmnist.canvases("train")["masks"][:3]


# ----- the step on 8 devices = 1 device --------------------------------------------------------


@pytest.mark.slow
def test_segmentation_teacher_and_kd_steps_equal_on_8_and_1_devices():
    """A teacher (per-pixel CE) and a KD (per-pixel KL) step of the small DeepLabV3-MBv2 in
    float64 (BatchNorm over the global batch): the 8-device state equals the 1-device one; one
    shard's images x1.01 moves it far more. XLA's own convolutions and 16 px images keep the
    four compilations short."""
    from kd_jax.teacher import FrozenTeacher

    assert jax.device_count() == 8
    with jax.enable_x64(True):
        overrides = {
            "batch_size": 16,
            "eval_batch_size": 16,
            "dtype": "float64",
            "model.conv": "xla",
        }
        cfgs = {
            "teacher": config("teacher_segmnist.py", "smoke,student", **overrides),
            "kd": config("kd_segmnist.py", "original,smoke", **overrides),
        }
        tmodel = models.create_model("deeplabv3_resnet_small", 11, jnp.float64, conv="xla")
        tvars = jax.jit(lambda x: tmodel.init(jax.random.key(3), x, train=False))(
            np.zeros((1, 16, 16, 1))
        )
        teacher = FrozenTeacher(tmodel, jax.device_get(tvars))
        rng = np.random.default_rng(0)
        lab = rng.integers(0, 11, (16, 16, 16))
        lab[rng.uniform(size=lab.shape) < 0.1] = IGNORE
        batch = {"image": rng.normal(size=(16, 16, 16, 1)), "label": lab}
        broken = {**batch, "image": batch["image"].copy()}
        broken["image"][2:4] *= 1.01  # the second device's shard
        for name, cfg in cfgs.items():
            states = []
            # the broken batch reuses the 8-device step: 2 compilations per method, not 3
            for devices, batches in (
                (jax.devices()[:1], (batch,)),
                (jax.devices(), (batch, broken)),
            ):
                mesh = parallel.make_mesh(devices)
                method = get_method(name)(cfg, "/tmp/unused", mesh, teacher=teacher)
                method.build_optimizer(10)
                rep = parallel.replicated(mesh)
                state = jax.jit(method.init_state, out_shardings=rep)(jax.random.PRNGKey(0))
                tv = jax.device_put(method.teacher_vars, rep) if name == "kd" else None
                step = jax.jit(method.train_step)
                for b in batches:
                    args = (tv, parallel.global_batch(b, mesh), jax.random.PRNGKey(1))
                    states.append(jax.device_get(step(state, *args)[0]))
            one, eight, wrong = states
            assert jax.tree.leaves(one.params)[0].dtype == np.float64
            same = record(f"8 vs 1 devices, segmentation {name} step", max_distance(one, eight))
            off = record(
                f"8 vs 1 devices, segmentation {name} step, one shard x1.01 (broken)",
                max_distance(wrong, eight),
            )
            assert same < 1e-10, (name, same)
            assert off > 1e-6, (name, off)


def test_task_and_model_must_match():
    c = config("teacher_segmnist.py", "smoke")
    c.model.name = "lenet5"
    with pytest.raises(ValueError, match="config.data.target.task='segmentation'"):
        get_method("teacher")(c, "/tmp/unused", parallel.make_mesh())


def test_convert_nyuv2_maps_dfad_labels(tmp_path):
    """A fake DFAD-format NYUv2 root (2 train, 1 test image): label 0 -> 255 (ignore), l -> l-1,
    images kept; `--short_side` resizes image (bilinear) and mask (nearest) together."""
    from kd_jax.data import convert_nyuv2

    root = tmp_path / "nyu"
    labels = write_fake_nyuv2(root, train=(3, 1), test=(2,), shape=(12, 16))
    assert convert_nyuv2.main([f"--root={root}", f"--out={tmp_path / 'out'}"]) == 0
    with np.load(tmp_path / "out" / "nyuv2_train.npz") as z:
        assert z["images"].shape == (2, 12, 16, 3) and z["masks"].dtype == np.uint8
        expect = np.where(labels[3] == 0, 255, labels[3] - 1)  # splits.mat order: 3, then 1
        np.testing.assert_array_equal(z["masks"][0], expect)
    small = convert_nyuv2.convert_split(str(root), "test", short_side=6)
    assert small["images"].shape == (1, 6, 8, 3) and small["masks"].shape == (1, 6, 8)
    assert set(np.unique(small["masks"])) <= set(range(13)) | {255}
