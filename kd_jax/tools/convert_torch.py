"""Bring your own teacher: a PyTorch state dict -> a kd_jax teacher checkpoint.

    python -m kd_jax.tools.convert_torch --arch=resnet34_cifar --num_classes=10 \\
        --src=cifar10_resnet34.pth --out=/tmp/kd/teachers/cifar10_resnet34

writes `OUT/checkpoints/0` (Orbax, the layout `kd_jax.checkpoint.load_variables` reads: `params` /
`batch_stats` under `'model'`) and `OUT/results.json` (`method: "converted"`, `model`,
`num_classes`, `source`, parameter count; `final_accuracy` only with `--accuracy=`, otherwise a
KD run measures the teacher itself). Any config then takes it as its teacher:
`--config.teacher.workdir=OUT` (and `--config.teacher.model=ARCH`).

Sources: `.pth`/`.pt`/`.bin` (needs torch; read with `torch.load(weights_only=True)`, which never
unpickles arbitrary objects), `.npz` and `.safetensors` (read with numpy alone). A file may hold
the state dict itself or wrap it: `{'state_dict': ...}` (DAFL / CMI / Fast-Datafree
`{dataset}_{model}.pth`), `{'model': ...}` (RepDistiller `ckpt_epoch_240.pth`),
`{'teacher': ...}` (DINO training checkpoints, with `--prefix=backbone.`); `module.`
(DataParallel) and `_orig_mod.` (torch.compile) prefixes are stripped. In an `.npz`, a key
`a/b` is entry `b` of container `a`.

The mapping is the naming rule of `kd_jax.models` (one rule, used by every model):
a Flax module path is the state_dict key with every `.<digit>` folded into the preceding name
(`layer1.0.conv1.weight` -> `layer1_0/conv1/kernel`); conv `weight` OIHW -> `kernel` HWIO
(depthwise (C,1,k,k) -> (k,k,1,C)), Linear `weight` -> `kernel` = weight.T, BN/LN `weight` ->
`scale`, `bias` -> `bias`, BN `running_mean`/`running_var` -> `batch_stats` `mean`/`var` (both
sides use epsilon 1e-5), `num_batches_tracked` dropped; other parameters (`cls_token`,
`pos_embed`) keep their layout. LeNet also accepts the CMI / Fast-Datafree naming
(`features.0/3/6`, `fc.0/2`) besides DAFL's (`conv1..3`, `fc1`, `fc2`); `deeplabv3_mobilenetv2`
also accepts VainF/DeepLabV3Plus-Pytorch's `deeplabv3_mobilenet` naming
(`backbone.low_level_features.N` = features.N, `backbone.high_level_features.N` = features.N+4,
`classifier.classifier.*` = `classifier.*`). `deeplabv3_resnet50` takes torchvision's
`deeplabv3_resnet50` state dict as it is; its COCO weights also hold the auxiliary head, to drop
with `--skip='aux_classifier\\..*'`. The models pad symmetrically like PyTorch and flatten only
1x1 maps, so no layout change beyond these is needed (logits parity per family, DeepLabV3s
included: tests/test_convert_torch.py).

Every Flax variable must come from the file and every file entry must land somewhere, with the
converted shape: otherwise `ConversionError` lists the offending keys with both shapes (and
hints at `--num_classes` or a better-matching `--arch`), and nothing is written.

Python API (notebooks): `convert_state_dict(arch, num_classes, state_dict) -> variables`,
`read_state_dict(path)`, `write_teacher(out, ...)`. This module never imports torch unless
asked to read a `.pth` file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from kd_jax import fileio

# Keys under which checkpoints wrap their state dict, in order of preference.
CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "net", "teacher", "module")
# Prefixes that wrappers add to every key: DataParallel / DDP, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")

# CMI / Fast-Datafree LeNet-5 (`features` / `fc` Sequentials) -> DAFL module names.
_LENET_ALIASES = {
    "features.0.": "conv1.",
    "features.3.": "conv2.",
    "features.6.": "conv3.",
    "fc.0.": "fc1.",
    "fc.2.": "fc2.",
}

# VainF/DeepLabV3Plus-Pytorch `deeplabv3_mobilenet` -> kd_jax's torchvision-style names: its
# `_segm_mobilenet` splits MobileNetV2's `features` into `low_level_features` = features[:4] and
# `high_level_features` = features[4:-1], and its `DeepLabHead` nests the Sequential as
# `classifier.classifier`.
_VAINF_MOBILENET_SPLIT = 4
_VAINF_DEEPLAB_RE = re.compile(r"backbone\.(low|high)_level_features\.(\d+)\.")

_MAX_LISTED = 25


class ConversionError(ValueError):
    """The file does not fit the architecture (or cannot be read); nothing was written."""


# ----------------------------------------------------------------------------------------------
# The naming rule: state_dict key <-> (collection, Flax path)
# ----------------------------------------------------------------------------------------------


def flax_path(key: str) -> tuple[str, tuple[str, ...]]:
    """state_dict key -> (collection, Flax path) by the kd_jax.models naming rule.

    A `weight` leaf comes back as `WEIGHT`: it is a `kernel` (conv / linear) or a `scale`
    (BatchNorm / LayerNorm), which only the Flax tree can tell (`resolve_weight`).
    """
    parts = key.split(".")
    leaf = parts.pop()
    mods: list[str] = []
    for p in parts:
        if p.isdigit() and mods:
            mods[-1] += f"_{p}"
        else:
            mods.append(p)
    if leaf == "running_mean":
        return "batch_stats", (*mods, "mean")
    if leaf == "running_var":
        return "batch_stats", (*mods, "var")
    if leaf == "weight":
        return "params", (*mods, "WEIGHT")
    return "params", (*mods, leaf)


def resolve_weight(col: str, path: tuple[str, ...], targets: Mapping) -> tuple:
    """The Flax key of a path from `flax_path`: `WEIGHT` -> `kernel` or `scale`, whichever
    exists in `targets` (flattened `(collection, *path)` keys); `kernel` when neither does."""
    if path[-1] != "WEIGHT":
        return (col, *path)
    for name in ("kernel", "scale"):
        if (col, *path[:-1], name) in targets:
            return (col, *path[:-1], name)
    return (col, *path[:-1], "kernel")


def torch_key(flat_key: tuple[str, ...]) -> str:
    """Inverse of the naming rule: `('params', 'layer1_0', 'conv1', 'kernel')` ->
    `layer1.0.conv1.weight` (names error messages in PyTorch's terms)."""
    col, *mods, leaf = flat_key
    mods = [re.sub(r"_(\d+)(?=_|$)", r".\1", m) for m in mods]
    if col == "batch_stats":
        leaf = {"mean": "running_mean", "var": "running_var"}.get(leaf, leaf)
    elif leaf in ("kernel", "scale"):
        leaf = "weight"
    return ".".join([*mods, leaf])


def to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    """PyTorch layout -> Flax layout of one tensor (conv OIHW -> HWIO, linear weight.T)."""
    if leaf == "kernel" and value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if leaf == "kernel" and value.ndim == 2:
        return value.T
    return value


def to_torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """Flax shape -> the PyTorch shape that converts to it (for error messages)."""
    if leaf == "kernel" and len(shape) == 4:
        return (shape[3], shape[2], shape[0], shape[1])
    if leaf == "kernel" and len(shape) == 2:
        return (shape[1], shape[0])
    return tuple(shape)


def rename_variant(arch: str, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Known alternative namings of the same architecture -> the kd_jax naming."""
    sd = dict(state_dict)
    if arch.startswith("lenet") and any(k.startswith(("features.", "fc.")) for k in sd):
        renamed = {}
        for k, v in sd.items():
            for old, new in _LENET_ALIASES.items():
                if k.startswith(old):
                    k = new + k[len(old) :]
                    break
            renamed[k] = v
        sd = renamed
    if arch.startswith("deeplabv3_mobilenetv2") and any(
        k.startswith(("backbone.high_level_features.", "classifier.classifier.")) for k in sd
    ):
        sd = {_vainf_deeplab_key(k): v for k, v in sd.items()}
    return sd


def _vainf_deeplab_key(key: str) -> str:
    """`backbone.{low,high}_level_features.N.` -> `backbone.features.M.` (M = N, or N + 4 for
    the high-level part), `classifier.classifier.` -> `classifier.`."""
    m = _VAINF_DEEPLAB_RE.match(key)
    if m:
        n = int(m.group(2)) + (_VAINF_MOBILENET_SPLIT if m.group(1) == "high" else 0)
        return f"backbone.features.{n}." + key[m.end() :]
    if key.startswith("classifier.classifier."):
        return key[len("classifier.") :]
    return key


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Conversion:
    """A successful conversion: `variables` = {'params', 'batch_stats'} of float32 numpy arrays
    in the model's tree; the rest is the report the CLI prints."""

    arch: str
    num_classes: int
    variables: dict
    num_params: int
    num_tensors: int
    ignored: list[str]  # entries dropped on purpose (num_batches_tracked, --skip, --prefix)
    cast: list[str]  # entries cast from another float dtype to float32


def abstract_variables(arch: str, num_classes: int, **model_kwargs) -> dict:
    """Shapes of `create_model(arch, ...)`'s variables, without computing anything."""
    import jax
    import jax.numpy as jnp

    from kd_jax import models

    model = models.create_model(arch, num_classes, **model_kwargs)
    h, w, c = models.model_input_shape(arch)
    if "img_size" in model_kwargs:  # ViTs: the position embedding follows the input size
        h = w = int(model_kwargs["img_size"])
    x = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
    return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _flat(tree) -> dict:
    import flax

    return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _shape(s) -> str:
    return "(" + ", ".join(str(int(d)) for d in s) + ("," if len(s) == 1 else "") + ")"


def convert(
    arch: str,
    num_classes: int,
    state_dict: Mapping[str, Any],
    *,
    skip: Iterable[str] = (),
    source: str = "state_dict",
    **model_kwargs,
) -> Conversion:
    """Converts a (flat, unwrapped) PyTorch state dict to the variables of
    `create_model(arch, num_classes, **model_kwargs)`.

    `skip`: regular expressions (`re.fullmatch` on the state_dict key) of entries to drop on
    purpose, e.g. a projection head the kd_jax model does not have. Raises `ConversionError`
    listing every missing / unexpected / mis-shaped key with both shapes.
    """
    template = abstract_variables(arch, num_classes, **model_kwargs)
    out, ignored, cast = _match(
        rename_variant(arch, state_dict),
        _flat(template),
        skip=skip,
        arch=arch,
        num_classes=num_classes,
        source=source,
    )
    num_params = sum(int(np.prod(v.shape)) for k, v in out.items() if k[0] == "params")
    return Conversion(arch, num_classes, _unflat(out), num_params, len(out), ignored, cast)


def convert_tree(
    state_dict: Mapping[str, Any],
    template: Mapping,
    *,
    skip: Iterable[str] = (),
    arch: str = "the model",
    source: str = "state_dict",
) -> dict:
    """Like `convert`, onto any variables tree `template` (arrays or ShapeDtypeStructs: only
    shapes are read) instead of a registered architecture."""
    out, _, _ = _match(
        dict(state_dict), _flat(template), skip=skip, arch=arch, num_classes=None, source=source
    )
    return _unflat(out)


def _unflat(out: dict) -> dict:
    import flax

    variables = flax.traverse_util.unflatten_dict(out)
    variables.setdefault("params", {})
    variables.setdefault("batch_stats", {})
    return variables


def _match(
    sd: Mapping[str, Any], targets: Mapping[tuple, Any], *, skip, arch, num_classes, source
) -> tuple[dict, list[str], list[str]]:
    """The mapping itself: every state_dict entry onto a Flax leaf of `targets` (flattened
    `(collection, *path)` keys), converted and shape-checked. -> (flat variables, ignored keys,
    cast keys); raises ConversionError with every problem listed."""
    skip_res = [re.compile(p) for p in skip]
    out: dict[tuple, np.ndarray] = {}
    origin: dict[tuple, str] = {}
    ignored, cast, unexpected, mismatched, bad_dtype = [], [], [], [], []
    for key, value in sd.items():
        value = np.asarray(value)
        if key.endswith("num_batches_tracked") or any(r.fullmatch(key) for r in skip_res):
            ignored.append(key)
            continue
        col, path = flax_path(key)
        fk = resolve_weight(col, path, targets)
        if fk not in targets:
            unexpected.append(f"{key} {_shape(value.shape)}: no {arch} variable {'/'.join(fk)}")
            continue
        if fk in out:  # two file keys on one variable (e.g. both LeNet namings in one file)
            unexpected.append(
                f"{key} {_shape(value.shape)}: {'/'.join(fk)} already comes from {origin[fk]}"
            )
            continue
        if not np.issubdtype(value.dtype, np.floating):
            bad_dtype.append(f"{key}: dtype {value.dtype}, a float tensor is needed")
            continue
        arr = to_flax(value, fk[-1])
        want = tuple(targets[fk].shape)
        if arr.shape != want:
            mismatched.append((key, value.shape, to_torch_shape(want, fk[-1]), fk, want))
            continue
        if value.dtype != np.float32:
            cast.append(f"{key} ({value.dtype})")
        out[fk] = np.ascontiguousarray(arr, dtype=np.float32)
        origin[fk] = key
    wrong_shape = {m[3] for m in mismatched}
    missing = [fk for fk in targets if fk not in out and fk not in wrong_shape]
    if unexpected or mismatched or missing or bad_dtype:
        raise ConversionError(
            _error_message(
                arch,
                num_classes,
                source,
                targets,
                sd,
                unexpected,
                mismatched,
                missing,
                bad_dtype,
                len(out),
            )
        )
    return out, ignored, cast


def convert_state_dict(
    arch: str, num_classes: int, state_dict: Mapping[str, Any], **kwargs
) -> dict:
    """`{'params', 'batch_stats'}` for `create_model(arch, num_classes)` from a PyTorch state
    dict (tensors or numpy arrays; wrapped or `module.`-prefixed dicts are unwrapped).

        variables = convert_state_dict("resnet34_cifar", 10, torch.load(f)["state_dict"])
        logits, feats = create_model("resnet34_cifar", 10).apply(variables, x_nhwc)
    """
    sd, _ = unwrap(state_dict)
    return convert(arch, num_classes, sd, **kwargs).variables


def _error_message(
    arch, num_classes, source, targets, sd, unexpected, mismatched, missing, bad_dtype, n_ok
) -> str:
    def listed(items):
        lines = [f"    {s}" for s in items[:_MAX_LISTED]]
        if len(items) > _MAX_LISTED:
            lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
        return lines

    lines = [
        f"cannot convert {source} to {arch} (num_classes={num_classes}): "
        f"{n_ok} of {len(targets)} variables matched."
    ]
    if mismatched:
        lines.append(
            f"  {len(mismatched)} key(s) with the wrong shape "
            f"(file shape vs the shape {arch} needs, both in PyTorch layout):"
        )
        lines += listed(
            [
                f"{k}: file {_shape(s)} vs {arch} {_shape(t)}  [Flax {'/'.join(fk)} {_shape(f)}]"
                for k, s, t, fk, f in mismatched
            ]
        )
    if unexpected:
        lines.append(f"  {len(unexpected)} file key(s) with no counterpart in {arch}:")
        lines += listed(unexpected)
    if missing:
        lines.append(
            f"  {len(missing)} {arch} variable(s) missing from the file "
            f"(key: file absent vs {arch} shape):"
        )
        lines += listed(
            [
                f"{torch_key(fk)}: file absent vs {arch} "
                f"{_shape(to_torch_shape(targets[fk].shape, fk[-1]))}  "
                f"[Flax {'/'.join(fk)}]"
                for fk in missing
            ]
        )
    if bad_dtype:
        lines.append(f"  {len(bad_dtype)} key(s) with a non-float dtype:")
        lines += listed(bad_dtype)
    lines += _hints(arch, num_classes, sd, mismatched, unexpected, missing)
    lines.append("Nothing was written.")
    return "\n".join(lines)


def _hints(arch, num_classes, sd, mismatched, unexpected, missing) -> list[str]:
    hints = []
    # Only the classifier differs: the file was trained with another number of classes.
    outs = {s[0] for k, s, t, fk, f in mismatched if t and t[0] == num_classes}
    if (
        num_classes is not None
        and mismatched
        and len(outs) == 1
        and all(t and t[0] == num_classes for k, s, t, fk, f in mismatched)
    ):
        hints.append(
            f"  hint: the file's classifier has {outs.pop()} outputs: pass "
            f"--num_classes accordingly (0 for a headless ViT backbone such as DINO's)"
        )
    if any(u.startswith("aux_classifier.") for u in unexpected):
        hints.append(
            "  hint: aux_classifier.* is torchvision's auxiliary FCN head (aux_loss=True, as in "
            "its COCO DeepLabV3 weights), which kd_jax's DeepLabV3 does not have: pass "
            "--skip='aux_classifier\\..*'"
        )
    if (
        num_classes is not None
        and (unexpected or missing)
        and len(unexpected) + len(missing) > len(sd) // 4
    ):
        better = suggest_archs(sd, exclude=arch)
        if better:
            hints.append(f"  hint: the key names fit --arch={' or --arch='.join(better)}")
        else:
            hints.append(
                "  hint: the key names fit no registered architecture; see the naming "
                "rule in kd_jax/models/__init__.py, --prefix= and --skip="
            )
    return hints


@functools.cache
def _variable_names(arch: str, num_classes: int) -> frozenset:
    return frozenset(_flat(abstract_variables(arch, num_classes)))


def suggest_archs(state_dict: Mapping[str, Any], exclude: str = "") -> list[str]:
    """Registered architectures whose variable names (shapes aside) are exactly the file's."""
    from kd_jax import models

    keys = [k for k in state_dict if not k.endswith("num_batches_tracked")]
    found = []
    for arch in models.list_models():
        if arch == exclude:
            continue
        sd = rename_variant(arch, {k: None for k in keys})
        num_classes = (
            0 if arch.startswith("vit") and not any(k.startswith("head.") for k in sd) else 10
        )
        targets = _variable_names(arch, num_classes)
        if len(targets) != len(sd):
            continue
        if {resolve_weight(*flax_path(k), targets) for k in sd} == targets:
            found.append(arch)
    return found


# ----------------------------------------------------------------------------------------------
# Reading state dicts: .pth (torch), .npz, .safetensors (numpy only)
# ----------------------------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
    "BOOL": "?",
    "BF16": "<u2",
}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """A `.safetensors` file as numpy arrays (BF16 widened to float32), without the
    `safetensors` package: an 8-byte little-endian header length, a JSON header
    `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the raw
    little-endian tensor bytes (offsets relative to the end of the header)."""
    raw = fileio.read_bytes(path)
    if len(raw) < 8:
        raise ConversionError(f"{path}: too short to be a safetensors file")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise ConversionError(f"{path}: safetensors header length {n} exceeds the file size")
    try:
        header = json.loads(raw[8 : 8 + n].decode("utf-8"))
    except ValueError as e:
        raise ConversionError(f"{path}: unreadable safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data = memoryview(raw)[8 + n :]
    out = {}
    for name, info in header.items():
        dtype = info.get("dtype")
        if dtype not in _SAFETENSORS_DTYPES:
            raise ConversionError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
        begin, end = info["data_offsets"]
        shape = tuple(info["shape"])
        np_dtype = np.dtype(_SAFETENSORS_DTYPES[dtype])
        if end - begin != math.prod(shape) * np_dtype.itemsize or end > len(data):
            raise ConversionError(
                f"{path}: tensor {name!r} {dtype}{list(shape)} has data "
                f"offsets {begin}..{end}: the file is corrupt or truncated"
            )
        arr = np.frombuffer(data[begin:end], dtype=np_dtype).reshape(shape)
        if dtype == "BF16":  # bfloat16 = the high half of a float32
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.copy()
    return out


def write_safetensors(
    path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes numpy arrays as `.safetensors` (F64/F32/F16/integer/bool dtypes), e.g. to hand a
    state dict to a machine without torch."""
    names = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items() if k != "BF16"}
    header: dict[str, Any] = {}
    chunks, offset = [], 0
    for name, value in tensors.items():
        arr = np.ascontiguousarray(value)
        arr = arr.astype(arr.dtype.newbyteorder("<"))
        if arr.dtype not in names:
            raise ValueError(f"{name}: dtype {arr.dtype} has no safetensors code here")
        b = arr.tobytes()
        header[name] = {
            "dtype": names[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(b)],
        }
        chunks.append(b)
        offset += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format pads the header to 8-byte alignment
    fileio.write_bytes_atomic(path, b"".join([struct.pack("<Q", len(blob)), blob, *chunks]))


def _nest_npz(flat: Mapping[str, np.ndarray]) -> dict:
    """npz keys `a/b` -> {'a': {'b': ...}} (a container like a .pth checkpoint's dict)."""
    out: dict = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def _torch_to_numpy(obj):
    """Tensors -> numpy (bfloat16 via float32), recursively through dicts; other values kept."""
    import torch

    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
            t = t.float()
        return t.numpy()
    if isinstance(obj, Mapping):
        return {k: _torch_to_numpy(v) for k, v in obj.items()}
    return obj


def _read_torch(path: str):
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path}: reading a PyTorch .pth file needs torch, which kd_jax does not install. "
            f"Either `pip install torch --index-url https://download.pytorch.org/whl/cpu` (the "
            f"small CPU wheel), or, where torch is available, save the state dict as .npz "
            f"(`np.savez(f, **{{k: v.numpy() for k, v in sd.items()}})`) or .safetensors and "
            f"convert that file."
        ) from None
    import pickle

    try:
        src = io.BytesIO(fileio.read_bytes(path)) if fileio.is_remote(path) else path
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"{path}: torch.load(weights_only=True) refused the file: it pickles objects other "
            f"than tensors and containers ({str(e).splitlines()[0]}). kd_jax never unpickles "
            f"arbitrary objects; where you trust the file, re-save only its state dict "
            f"(`torch.save(torch.load(f, weights_only=False)['state_dict'], 'sd.pth')`)."
        ) from None
    return _torch_to_numpy(obj)


def read_file(path: str):
    """The raw content of a checkpoint file: a (possibly nested) dict of numpy arrays."""
    if not fileio.isfile(path):
        raise ConversionError(f"--src={path!r} does not exist or is not a file")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        return read_safetensors(path)
    if lower.endswith(".npz"):
        return _nest_npz(fileio.load_npz(path))
    if lower.endswith(TORCH_SUFFIXES):
        return _read_torch(path)
    raise ConversionError(
        f"{path}: unknown file type; use .pth/.pt/.bin (torch), .npz or .safetensors"
    )


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or type(v).__name__ == "Tensor"


def unwrap(obj, prefix: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """Finds the state dict in a checkpoint's content.

    Follows `CONTAINER_KEYS` (state_dict, model, ...) until a flat {key: array} dict, strips
    `module.` / `_orig_mod.` prefixes shared by every key, then keeps only the keys under
    `prefix` (stripped; e.g. `backbone.` of DINO training checkpoints). Returns (state dict,
    info) where info holds the scalars found beside the state dict (epoch, best_acc, ...) and
    the keys dropped by `prefix`.
    """
    info: dict[str, Any] = {"container": [], "outside_prefix": []}
    while isinstance(obj, Mapping) and not all(_is_array(v) for v in obj.values()):
        for key, value in obj.items():
            if (
                isinstance(value, (int, float, np.ndarray, np.number))
                and np.ndim(value) == 0
                and np.asarray(value).dtype.kind in "biuf"
            ):
                info.setdefault("scalars", {})[key] = float(np.asarray(value))
        for key in CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                info["container"].append(key)
                obj = obj[key]
                break
        else:
            summary = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:12])
            raise ConversionError(
                f"no state dict found: the file holds {{{summary}}}; expected a flat "
                f"{{name: tensor}} dict or one wrapped under one of {list(CONTAINER_KEYS)}"
            )
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"no state dict found: the file holds a {type(obj).__name__}")
    sd = dict(obj)
    for p in WRAPPER_PREFIXES:
        if all(k.startswith(p) for k in sd):
            sd = {k[len(p) :]: v for k, v in sd.items()}
    if prefix:
        info["outside_prefix"] = sorted(k for k in sd if not k.startswith(prefix))
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
        if not sd:
            raise ConversionError(f"no key starts with --prefix={prefix!r}")
    return sd, info


def read_state_dict(path: str, prefix: str = "") -> tuple[dict[str, np.ndarray], dict]:
    """`unwrap(read_file(path), prefix)`: the flat state dict of a checkpoint file, and info."""
    return unwrap(read_file(path), prefix)


# ----------------------------------------------------------------------------------------------
# Writing the teacher workdir (atomic)
# ----------------------------------------------------------------------------------------------


def _sha256(path: str) -> str:
    if fileio.is_remote(path):
        return hashlib.sha256(fileio.read_bytes(path)).hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _teacher_state(conversion: Conversion) -> dict:
    # The trainer's state layout (TrainState fields); a teacher has no optimizer state.
    return {
        "step": np.asarray(0, np.int32),
        "params": {"model": conversion.variables["params"]},
        "batch_stats": {"model": conversion.variables["batch_stats"]},
        "opt_state": {},
    }


def _teacher_results(conversion: Conversion, source: str, accuracy, extra) -> dict:
    results = {
        "method": "converted",
        "model": conversion.arch,
        "num_classes": conversion.num_classes,
        "num_params": conversion.num_params,
        "source": fileio.absolute(source) if source else "",
    }
    if source and fileio.isfile(source):
        results["source_sha256"] = _sha256(source)
    if accuracy is not None:
        results["final_accuracy"] = float(accuracy)
    results.update(extra or {})
    return results


def write_teacher(
    out: str,
    conversion: Conversion,
    source: str = "",
    accuracy: float | None = None,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """Writes `out/checkpoints/0` + `out/results.json`. Returns `out`.

    Local: through a temporary sibling directory renamed into place, so `out` either is
    complete or does not change. Remote (`gs://`, where a directory rename is a non-atomic copy
    of every object): in place, with `results.json` (the marker a KD run looks for) written
    last as one object; `--overwrite` deletes that marker first, so a conversion killed midway
    leaves a workdir a KD run refuses ("no finished teacher run"), never a mix.
    """
    from kd_jax import checkpoint

    out = fileio.absolute(out)
    if fileio.exists(out) and not (fileio.isdir(out) and not fileio.listdir(out)) and not overwrite:
        raise ConversionError(
            f"--out={out!r} exists and is not empty; pass --overwrite to replace it"
        )
    if accuracy is not None and not 0.0 <= accuracy <= 1.0:
        raise ConversionError(f"--accuracy={accuracy} must be a fraction in [0, 1]")
    if fileio.is_remote(out):
        marker = fileio.join(out, "results.json")
        if fileio.exists(marker):
            fileio.remove(marker)
        if fileio.exists(out):
            fileio.rmtree(out)
        ckpt = checkpoint.Checkpointer(out, keep=1, async_save=False)
        ckpt.save(0, _teacher_state(conversion), force=True)
        ckpt.close()
        fileio.write_json_atomic(marker, _teacher_results(conversion, source, accuracy, extra))
        return out
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    # A sibling of `out` (same filesystem, so the final rename is atomic); os.mkdir rather
    # than mkdtemp so the teacher directory gets the usual umask permissions, not 0700.
    tmp = os.path.join(parent, f".{os.path.basename(out)}.converting-{uuid.uuid4().hex[:12]}")
    os.mkdir(tmp)
    try:
        ckpt = checkpoint.Checkpointer(tmp, keep=1, async_save=False)
        ckpt.save(0, _teacher_state(conversion), force=True)
        ckpt.close()
        fileio.write_json_atomic(
            fileio.join(tmp, "results.json"), _teacher_results(conversion, source, accuracy, extra)
        )
        if os.path.exists(out):  # --overwrite (or an empty directory): swap, then delete
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.old-", dir=parent)
            os.rename(out, os.path.join(old, "previous"))
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(os.path.join(old, "previous"), out)
                raise
            finally:
                if os.path.exists(out):
                    shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m kd_jax.tools.convert_torch",
        description="Convert a PyTorch teacher (.pth / .npz / .safetensors state dict) into a "
        "kd_jax teacher workdir (--config.teacher.workdir=OUT).",
    )
    ap.add_argument("--arch", required=True, help="kd_jax model name (kd_jax.models.list_models)")
    ap.add_argument(
        "--num_classes",
        required=True,
        type=int,
        help="outputs of the classifier (0: headless ViT backbone, e.g. DINO)",
    )
    ap.add_argument("--src", required=True, help="checkpoint file")
    ap.add_argument("--out", required=True, help="teacher workdir to create")
    ap.add_argument(
        "--accuracy",
        type=float,
        default=None,
        help="known test accuracy of the teacher, recorded as final_accuracy "
        "(otherwise a KD run measures it)",
    )
    ap.add_argument(
        "--prefix", default="", help="keep only keys under this prefix, stripped (e.g. backbone.)"
    )
    ap.add_argument(
        "--skip",
        action="append",
        default=[],
        help="regex (full match) of state_dict keys to drop on purpose; repeatable",
    )
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = ap.parse_args(argv)

    from kd_jax import models

    try:
        models.model_description(args.arch)
        sd, info = read_state_dict(args.src, args.prefix)
        conv = convert(args.arch, args.num_classes, sd, skip=args.skip, source=args.src)
        print(f"[convert_torch] {args.src}")
        if info["container"]:
            print(f"  state dict under: {' -> '.join(info['container'])}")
        for k, v in info.get("scalars", {}).items():
            print(
                f"  file also holds {k} = {v:g}"
                + ("  (pass --accuracy to record it)" if "acc" in k.lower() else "")
            )
        print(
            f"  architecture: {args.arch} ({models.model_description(args.arch)}), "
            f"num_classes={args.num_classes}"
        )
        n_stats = sum(int(np.prod(v.shape)) for v in _flat(conv.variables["batch_stats"]).values())
        print(
            f"  parameters: {conv.num_params:,d}"
            + (f" (+ {n_stats:,d} BatchNorm statistics)" if n_stats else "")
            + f"; {conv.num_tensors} tensors converted"
        )
        dropped = [k for k in conv.ignored if not k.endswith("num_batches_tracked")]
        n_nbt = len(conv.ignored) - len(dropped)
        if n_nbt:
            print(f"  dropped {n_nbt} num_batches_tracked counters (no Flax counterpart)")
        for k in info["outside_prefix"] + dropped:
            print(f"  unmapped (dropped on purpose): {k}")
        if not info["outside_prefix"] and not dropped:
            print("  unmapped keys: none")
        for k in conv.cast:
            print(f"  cast to float32: {k}")
        out = write_teacher(
            args.out,
            conv,
            source=args.src,
            accuracy=args.accuracy,
            overwrite=args.overwrite,
            extra={"prefix": args.prefix, "skipped": dropped} if (args.prefix or dropped) else None,
        )
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # e.g. an unknown --arch, named with the known ones
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"  wrote {out} (use --config.teacher.workdir={out} --config.teacher.model={args.arch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
