"""Writes the PyTorch parity fixtures of `tests/test_convert_torch.py` (needs torch; CI does not).

    pip install torch --index-url https://download.pytorch.org/whl/cpu
    python -m kd_jax.tools.make_torch_fixtures [--out=tests/fixtures/torch]

For each architecture family it builds a reduced-width variant of the reference PyTorch model
(`kd_jax.tools.torch_reference`) that still contains every layer type of the family, gives every
BatchNorm non-trivial running statistics and affine parameters (and the ViT non-trivial
LayerNorms and tokens), and saves `<family>.npz` with

    state_dict/<key>   the eval-mode state dict, PyTorch layout (num_batches_tracked included)
    input              a fixed random input, NHWC float32
    logits, pre_logits the PyTorch eval-mode outputs on it
    meta               JSON: arch, num_classes, model_kwargs (the kd_jax create_model arguments)

plus, for the file-format paths, `lenet5_half_cmi.pth` (a real torch.save file in the
CMI / Fast-Datafree naming, wrapped as `{'state_dict': ..., 'best_acc': ...}` like the DFKD
repositories' `{dataset}_{model}.pth`) and `lenet5_half.safetensors` (DAFL naming), both holding
the weights of `lenet.npz`. Inputs use odd sizes where a stride-2 layer follows, so PyTorch's
symmetric padding is exercised. The script checks its own output with the converter before it
writes anything and keeps all fixtures together under 2 MB.
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

# family -> (kd_jax arch, num_classes, create_model kwargs, reference builder, input HxW, C)
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
}

BATCH = 3
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
    x = np.random.RandomState(seed).randn(BATCH, size, size, channels).astype(np.float32)
    with torch.no_grad():
        logits, pre = model(torch.from_numpy(x.transpose(0, 3, 1, 2)))
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
    args = ap.parse_args(argv)

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    fixtures = {}
    for i, family in enumerate(FAMILIES):
        fx = build(family, args.seed + i)
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
    lenet = fixtures["lenet"]
    aliases = {v: k for k, v in convert_torch._LENET_ALIASES.items()}
    cmi = {}
    for k, v in lenet["module"].state_dict().items():
        for dafl, cmi_name in aliases.items():
            if k.startswith(dafl):
                k = cmi_name + k[len(dafl) :]
        cmi[k] = v.clone()
    torch.save(
        {"state_dict": cmi, "best_acc": 0.9876, "epoch": 200},
        os.path.join(args.out, "lenet5_half_cmi.pth"),
    )
    convert_torch.write_safetensors(
        os.path.join(args.out, "lenet5_half.safetensors"),
        lenet["state_dict"],
        metadata={"format": "pt"},
    )

    total = sum(os.path.getsize(os.path.join(args.out, f)) for f in os.listdir(args.out))
    print(f"wrote {len(os.listdir(args.out))} files, {total / 1024:.0f} KiB, to {args.out}")
    if total > SIZE_LIMIT:
        raise SystemExit(f"fixtures take {total} bytes > {SIZE_LIMIT}: reduce the widths")
    return 0


if __name__ == "__main__":
    sys.exit(main())
