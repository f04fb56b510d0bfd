"""Writes the PyTorch parity fixtures of `tests/test_convert_torch.py` (needs torch; CI does not).

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    python -m kd_jax.tools.make_torch_fixtures [--out=tests/fixtures/torch] [--only=fam1,fam2]

For each architecture family it builds a reduced-width variant of the reference PyTorch model
(`kd_jax.tools.torch_reference`) that still contains every layer type of the family, gives every
BatchNorm non-trivial running statistics and affine parameters (and the ViT non-trivial
LayerNorms and tokens), and saves `<family>.npz` with

    state_dict/<key>   the eval-mode state dict, PyTorch layout (num_batches_tracked included)
    input              a fixed random input, NHWC float32
    logits, pre_logits the PyTorch eval-mode outputs on it (DeepLabV3 logits NHWC [B, H, W, C],
                       pre_logits its head's map averaged over space)
    meta               JSON: arch, num_classes, model_kwargs (the kd_jax create_model arguments)

plus, for the file-format paths, `lenet5_half_cmi.pth` (a real torch.save file in the
CMI / Fast-Datafree naming, wrapped as `{'state_dict': ..., 'best_acc': ...}` like the DFKD
repositories' `{dataset}_{model}.pth`) and `lenet5_half.safetensors` (DAFL naming), both holding
the weights of `lenet.npz`. Inputs use odd sizes where a stride-2 layer follows, so PyTorch's
symmetric padding is exercised (and, for the DeepLabV3s, bilinear upsampling to an odd,
non-square size). The script checks its own output with the converter before it writes anything
and keeps all fixtures together under 2 MB. `--only` rewrites just the named families (each is
seeded by its position in FAMILIES, so the files come out the same as in a full run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn as tnn

from kd_jax.tools import convert_torch
from kd_jax.tools import torch_reference as ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(ROOT, "tests", "fixtures", "torch")

# Reduced DeepLabV3s (create_model kwargs; the references take the same numbers). ASPP rates
# small enough that the dilated taps reach beyond the centre of the 4x5 / 5x5 maps.
DEEPLAB_RESNET = {
    "output_stride": 8,
    "layers": (1, 1, 2, 1),
    "widths": (4, 4, 8, 4),
    "aspp_channels": 8,
    "rates": (2, 3, 4),
}
DEEPLAB_MOBILENET = {
    "output_stride": 8,
    "inverted_residual_setting": (
        (1, 8, 1, 1),
        (2, 8, 2, 2),
        (2, 8, 1, 2),
        (2, 8, 2, 2),
        (2, 8, 2, 2),
    ),
    "aspp_channels": 8,
    "rates": (1, 2, 3),
}

# family -> (kd_jax arch, num_classes, create_model kwargs, reference builder, input size
# (side, or (H, W)), C)
FAMILIES = {
    # conv with bias, max-pool, 1x1 flatten, two linears (the full-size DAFL student).
    "lenet": ("lenet5_half", 10, {}, lambda: ref.LeNet5((3, 8, 60, 42), 10), 32, 1),
    # CIFAR BasicBlock: identity shortcut (layer1) and 1x1 conv + BN shortcut (layers 2-4).
    "resnet_cifar": (
        "resnet18_cifar",
        10,
        {"num_blocks": (1, 1, 1, 1), "widths": (4, 8, 16, 32)},
        lambda: ref.CifarResNet((1, 1, 1, 1), 10, widths=(4, 8, 16, 32)),
        17,
        3,
    ),
    # torchvision Bottleneck with downsample, 7x7 stride-2 stem and 3x3 stride-2 max-pool.
    "resnet_imagenet": (
        "resnet50",
        10,
        {"layers": (1, 2, 1, 1), "widths": (4, 8, 8, 16)},
        lambda: ref.TVResNet(ref.TVBottleneck, (1, 2, 1, 1), 10, widths=(4, 8, 8, 16)),
        37,
        3,
    ),
    # torchvision BasicBlock (downsample naming) on the same stem.
    "resnet_imagenet_basic": (
        "resnet18",
        10,
        {"layers": (1, 1, 1, 1), "widths": (4, 8, 16, 16)},
        lambda: ref.TVResNet(ref.TVBasicBlock, (1, 1, 1, 1), 10, widths=(4, 8, 16, 16)),
        35,
        3,
    ),
    # Pre-activation WRN: equal-in-out blocks and convShortcut blocks, final BN-ReLU.
    "wrn": (
        "wrn16_1",
        10,
        {"depth": 16, "widen_factor": 1, "base_width": 4},
        lambda: ref.WideResNet(16, 1, 10, base=4),
        17,
        3,
    ),
    # VGG with BN: conv bias, BN, max-pools, two-conv blocks.
    "vgg": (
        "vgg11",
        10,
        {"cfg": ((4,), (8,), (8, 8), (16, 16), (16, 16))},
        lambda: ref.VGG([[4], [8], [8, 8], [16, 16], [16, 16]], 10),
        32,
        3,
    ),
    # MobileNetV2: t=1 block, expanding blocks with and without residual, depthwise stride 2.
    "mobilenet_v2": (
        "mobilenet_v2",
        10,
        {
            "inverted_residual_setting": ((1, 8, 1, 1), (6, 8, 2, 2), (6, 16, 2, 2)),
            "last_channel": 32,
        },
        lambda: ref.TVMobileNetV2(10, [(1, 8, 1, 1), (6, 8, 2, 2), (6, 16, 2, 2)], last_channel=32),
        33,
        3,
    ),
    # ViT: patch conv, cls token, position embedding, fused qkv, LayerNorms, GELU MLP, head.
    "vit": (
        "vit_b16",
        10,
        {"embed_dim": 16, "depth": 2, "num_heads": 2, "patch_size": 4, "img_size": 16},
        lambda: ref.ViT(16, 2, 2, 10, img=16, p=4),
        16,
        3,
    ),
    # torchvision DeepLabV3-ResNet50 at output stride 8: dilated layer3 (with a stride-1
    # downsample, a second block at the new dilation) and layer4, ASPP (1x1, dilated 3x3s whose
    # taps reach the padding of the 5x5 map, image pooling), 3x3 + BN head, 1x1 classifier with
    # bias, bilinear upsampling to an odd, non-square input.
    "deeplabv3_resnet": (
        "deeplabv3_resnet50",
        3,
        DEEPLAB_RESNET,
        lambda: ref.TVDeepLabV3(
            3,
            DEEPLAB_RESNET["layers"],
            DEEPLAB_RESNET["widths"],
            8,
            DEEPLAB_RESNET["rates"],
            DEEPLAB_RESNET["aspp_channels"],
        ),
        (33, 35),
        3,
    ),
    # VainF DeepLabV3-MobileNetV2 (its naming: low/high_level_features, classifier.classifier) at
    # output stride 8: unpadded stem, blocks padding their input before the expansion, a t=1
    # block, residual blocks, two dilated stages whose first block keeps the previous dilation.
    "deeplabv3_mobilenetv2": (
        "deeplabv3_mobilenetv2",
        3,
        DEEPLAB_MOBILENET,
        lambda: ref.VainFDeepLabV3(
            3,
            8,
            DEEPLAB_MOBILENET["rates"],
            DEEPLAB_MOBILENET["aspp_channels"],
            setting=DEEPLAB_MOBILENET["inverted_residual_setting"],
        ),
        (33, 35),
        3,
    ),
}

BATCH = 3
BATCH_OF = {"deeplabv3_resnet": 2, "deeplabv3_mobilenetv2": 2}  # [B, H, W, C] logits take room
SIZE_LIMIT = 2 * 1024 * 1024


def randomize(model: tnn.Module, gen: torch.Generator) -> None:
    """Non-trivial normalisation statistics and affine parameters, so parity exercises them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, tnn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
                m.num_batches_tracked.fill_(123)
            elif isinstance(m, tnn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=gen) * 0.4 - 0.2)
        if isinstance(model, ref.ViT):
            model.cls_token.copy_(torch.randn(model.cls_token.shape, generator=gen) * 0.5)
            model.pos_embed.copy_(torch.randn(model.pos_embed.shape, generator=gen) * 0.5)


def build(family: str, seed: int) -> dict:
    arch, num_classes, kwargs, make, size, channels = FAMILIES[family]
    torch.manual_seed(seed)
    model = make().eval()
    randomize(model, torch.Generator().manual_seed(seed))
    h, w = size if isinstance(size, tuple) else (size, size)
    batch = BATCH_OF.get(family, BATCH)
    x = np.random.RandomState(seed).randn(batch, h, w, channels).astype(np.float32)
    with torch.no_grad():
        logits, pre = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
    if logits.ndim == 4:  # segmentation: NCHW -> kd_jax's NHWC
        logits = logits.permute(0, 2, 3, 1).contiguous()
    sd = {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}
    return {
        "arch": arch,
        "num_classes": num_classes,
        "kwargs": kwargs,
        "state_dict": sd,
        "input": x,
        "logits": logits.numpy(),
        "pre_logits": pre.numpy(),
        "module": model,
    }


def check(fx: dict) -> float:
    """Max |logits difference| of the converted kd_jax model vs PyTorch (fails loudly)."""
    import jax.numpy as jnp

    from kd_jax import models

    variables = convert_torch.convert_state_dict(
        fx["arch"], fx["num_classes"], fx["state_dict"], **fx["kwargs"]
    )
    model = models.create_model(fx["arch"], fx["num_classes"], **fx["kwargs"])
    logits, feats = model.apply(variables, jnp.asarray(fx["input"]), train=False)
    diff = float(np.max(np.abs(np.asarray(logits) - fx["logits"])))
    diff_pre = float(np.max(np.abs(np.asarray(feats["pre_logits"]) - fx["pre_logits"])))
    return max(diff, diff_pre)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--only",
        default="",
        help="comma-separated families to (re)write, leaving the other files as they are "
        f"(known: {', '.join(FAMILIES)})",
    )
    args = ap.parse_args(argv)
    only = [f for f in args.only.split(",") if f]
    unknown = sorted(set(only) - set(FAMILIES))
    if unknown:
        ap.error(f"--only: unknown families {unknown}; known: {', '.join(FAMILIES)}")

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    fixtures = {}
    for i, family in enumerate(FAMILIES):
        if only and family not in only:
            continue
        fx = build(family, args.seed + i)  # seeded by position, so --only rewrites identically
        diff = check(fx)
        n = sum(v.size for k, v in fx["state_dict"].items())
        print(f"{family:22s} {fx['arch']:14s} {n:>7,d} values  max|Δ| = {diff:.2e}", flush=True)
        if not diff <= 1e-5:
            raise SystemExit(f"{family}: converted logits differ from PyTorch by {diff}")
        fixtures[family] = fx

    os.makedirs(args.out, exist_ok=True)
    for family, fx in fixtures.items():
        meta = {
            "arch": fx["arch"],
            "num_classes": fx["num_classes"],
            "model_kwargs": _jsonable(fx["kwargs"]),
            "torch": torch.__version__,
            "reference": f"kd_jax.tools.torch_reference.{type(fx['module']).__name__}",
        }
        arrays = {f"state_dict/{k}": v for k, v in fx["state_dict"].items()}
        arrays.update(
            input=fx["input"],
            logits=fx["logits"],
            pre_logits=fx["pre_logits"],
            meta=np.asarray(json.dumps(meta)),
        )
        np.savez_compressed(os.path.join(args.out, f"{family}.npz"), **arrays)

    # The file-format paths: a real .pth (CMI naming, DFKD wrapper) and a .safetensors file.
    if "lenet" in fixtures:
        write_lenet_formats(fixtures["lenet"], args.out)

    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {len(fixtures)} families to {args.out}: {total / 1024:.0f} KiB in all")
    if total > SIZE_LIMIT:
        raise SystemExit(f"fixtures take {total} bytes > {SIZE_LIMIT}: reduce the widths")
    return 0


def write_lenet_formats(lenet: dict, out: str) -> None:
    aliases = {v: k for k, v in convert_torch._LENET_ALIASES.items()}
    cmi = {}
    for k, v in lenet["module"].state_dict().items():
        for dafl, cmi_name in aliases.items():
            if k.startswith(dafl):
                k = cmi_name + k[len(dafl) :]
        cmi[k] = v.clone()
    torch.save(
        {"state_dict": cmi, "best_acc": 0.9876, "epoch": 200},
        os.path.join(out, "lenet5_half_cmi.pth"),
    )
    convert_torch.write_safetensors(
        os.path.join(out, "lenet5_half.safetensors"),
        lenet["state_dict"],
        metadata={"format": "pt"},
    )


if __name__ == "__main__":
    sys.exit(main())
