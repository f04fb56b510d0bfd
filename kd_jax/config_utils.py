"""Config helpers: load a sibling config file, check keys, and record a config as JSON."""

from __future__ import annotations

import importlib.util
import json
import os

import ml_collections


def load_config(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of a config file, the way `--config=path[:arg]` would load it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Config file {path!r} does not exist.")
    name = "kd_jax_config_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def sibling(config_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """Loads `name` from the directory of `config_file` (configs chain e.g. a teacher config)."""
    return load_config(os.path.join(os.path.dirname(os.path.abspath(config_file)), name), arg)


def parse_arg(arg: str | None, allowed: tuple[str, ...], config_file: str) -> set[str]:
    """Splits `--config=file.py:a,b` into flags and rejects unknown ones by name."""
    flags = set(filter(None, (arg or "").split(",")))
    unknown = flags - set(allowed)
    if unknown:
        raise ValueError(
            f"{os.path.basename(config_file)}: unknown argument(s) {sorted(unknown)}; "
            f"allowed: {list(allowed)}"
        )
    return flags


def require(config: ml_collections.ConfigDict, *keys: str) -> None:
    """Fails with the dotted key named when a required config value is empty."""
    for key in keys:
        node = config
        for part in key.split("."):
            if part not in node:
                raise KeyError(f"config.{key} is missing")
            node = node[part]
        if node in (None, ""):
            raise ValueError(f"config.{key} must be set")


def check_choice(value, allowed, key: str) -> None:
    """Fails naming the config key (e.g. "odsd.aps.gate") when `value` is not one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r}: use one of {list(allowed)}")


def to_json(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def base_config() -> ml_collections.ConfigDict:
    """Keys every method reads; a config file starts here and overrides what it needs."""
    c = ml_collections.ConfigDict()
    c.method = ""
    c.seed = 0
    c.num_classes = 10
    c.dtype = "float32"  # compute dtype of the models (bfloat16 on TPU)
    c.distributed = False  # jax.distributed.initialize() (launch/ sets it)
    # Measured results of this config's baselines, printed beside the run's own when it ends.
    c.reference = ""
    c.model = ml_collections.ConfigDict(
        {
            "name": "",  # the network being trained (kd_jax.models.list_models)
            "conv": "auto",  # convolution: auto | xla | im2col | winograd (models/cpu_conv.py)
        }
    )
    c.teacher = ml_collections.ConfigDict(
        {
            "model": "",  # architecture; checked against the teacher workdir
            "workdir": "",  # finished teacher run / converted checkpoint; "" = <workdir>/teacher
            "train": ml_collections.ConfigDict(),  # teacher config, trained first when workdir == ""
        }
    )
    c.data = ml_collections.ConfigDict(
        {
            # The teacher's domain: every image (target or pool) is mapped into it.
            "image_size": 32,
            "channels": 3,
            "normalization": "cifar10",
            "eval_crop": 1.0,
            "augment": "crop_flip",
            # Segmentation only: `scale_crop(_flip)`'s rescale range; eval at full resolution (0)
            # or resized to eval_size x eval_size.
            "scale_range": (0.5, 2.0),
            "eval_size": 0,
            "shuffle_buffer": 16384,
            "cache": False,
            # Labeled target set: teacher training and every reported accuracy.
            "target": ml_collections.ConfigDict(
                {
                    "source": "tfds",
                    "task": "classification",  # or "segmentation" (per-pixel masks, mIoU)
                    "name": "",
                    "data_dir": "",
                    "path": "",
                    "train_split": "train",
                    "eval_split": "test",
                    "max_eval_examples": 0,
                }
            ),  # 0 = the whole eval split
            # The student's transfer set (KD methods): original | offline_pool | shards.
            "transfer": ml_collections.ConfigDict(
                {
                    "source": "original",
                    "pattern": "",
                    "cache_dir": "",
                    "split": "train",
                    "subset": "all",
                    "subset_size": 0,
                }
            ),
        }
    )
    c.batch_size = 256  # global, over all devices and hosts
    c.eval_batch_size = 512
    c.num_steps = 1000
    c.optimizer = ml_collections.ConfigDict(
        {
            "name": "sgd",
            "lr": 0.1,
            "momentum": 0.9,
            "nesterov": False,
            "weight_decay": 5e-4,
            "schedule": "cosine",
            "warmup_steps": 0,
            "end_lr": 0.0,
            "decay_at": (0.4, 0.8),
            "decay_factor": 0.1,
            "grad_clip": 0.0,
        }
    )  # clip the global gradient norm (0 = off)
    c.kd = ml_collections.ConfigDict({"temperature": 4.0})
    c.label_smoothing = 0.0
    c.log_every = 50
    c.eval_every = 500
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2
    c.async_checkpoints = True
    return c


# Teacher -> student pairs of the CIFAR benchmark grid (the Fast / CMI tables).
CIFAR_PAIRS = {
    "r34_r18": ("resnet34_cifar", "resnet18_cifar"),
    "vgg11_r18": ("vgg11", "resnet18_cifar"),
    "wrn40_2_wrn16_1": ("wrn40_2", "wrn16_1"),
    "wrn40_2_wrn40_1": ("wrn40_2", "wrn40_1"),
    "wrn40_2_wrn16_2": ("wrn40_2", "wrn16_2"),
}


def cifar_data(c: ml_collections.ConfigDict, dataset: str) -> None:
    """CIFAR-10/100 from TFDS in the teacher's domain (32 px, crop + flip)."""
    c.num_classes = {"cifar10": 10, "cifar100": 100}[dataset]
    c.data.image_size, c.data.channels, c.data.normalization = 32, 3, dataset
    c.data.augment = "crop_flip"
    c.data.target.source, c.data.target.name = "tfds", dataset


def cifar_pair(flags: set, config_file: str) -> tuple[str, str]:
    chosen = [f for f in flags if f in CIFAR_PAIRS]
    if len(chosen) > 1:
        raise ValueError(f"{config_file}: pick one pair of {sorted(CIFAR_PAIRS)}")
    return CIFAR_PAIRS[chosen[0] if chosen else "r34_r18"]


def offline_student(config_file: str, method: str, smoke: bool) -> ml_collections.ConfigDict:
    """The offline benchmark's student setup shared by kd/odsd/eikd_mnist.py: LeNet-5 ->
    LeNet-5-half, the teacher config chained from teacher_mnist.py (trained into
    <workdir>/teacher unless teacher.workdir is given), the teacher's data domain, and the
    bundled open-world pool as transfer set."""
    c = base_config()
    c.method = method
    c.model.name = "lenet5_half"
    c.teacher.model = "lenet5"
    c.teacher.train = sibling(config_file, "teacher_mnist.py", "smoke" if smoke else None)
    c.data = c.teacher.train.data.copy_and_resolve_references()
    c.data.transfer.source = "offline_pool"
    return c


BUNDLED_TEACHERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "teachers")


def bundled_teacher(name: str) -> str:
    """The workdir of a teacher that ships inside the package (kd_jax/assets/teachers/<name>,
    made with `kd_jax.tools.export_teacher` from a run of this project's own teacher config)."""
    path = os.path.join(BUNDLED_TEACHERS, name)
    if not os.path.isfile(os.path.join(path, "results.json")):
        raise FileNotFoundError(
            f"bundled teacher {name!r} is missing from {BUNDLED_TEACHERS!r}: reinstall kd_jax, "
            f"or train it and pass --config.teacher.workdir"
        )
    return path


def offline_wrn_pair(c: ml_collections.ConfigDict, config_file: str, smoke: bool) -> None:
    """The offline benchmark's BatchNorm pair on a student config of `offline_student`:
    WRN-10-1 -> WRN-10-1-half, taught by the bundled WRN-10-1 teacher (`teacher_mnist.py:wrn`,
    seed 0, 98.1 %), so no teacher is trained; `--config.teacher.workdir=` (empty) trains
    `teacher_mnist.py:wrn` into <workdir>/teacher instead."""
    c.model.name = "wrn10_1_half"
    c.teacher.model = "wrn10_1"
    c.teacher.train = sibling(config_file, "teacher_mnist.py", "wrn,smoke" if smoke else "wrn")
    c.teacher.workdir = bundled_teacher("mnist5k_wrn10_1")


# ----- NCD configs (configs/sckd_*.py); their keys are `kd_jax.methods.sckd.default_config` ----

NCD_ARGS = ("uno", "pretrain", "smoke")


def ncd_stages(build, flags: set, config_file: str) -> ml_collections.ConfigDict:
    """The config an NCD file's argument asks for, from `build(stage)` -> the config of stage
    "pretrain" (NCD stage 1) or "discover": `pretrain` gives stage 1 alone (`ncd_pretrain`);
    otherwise discovery (`uno` with the `uno` flag, else `sckd`) with stage 1 in
    `ncd.pretrain.train` (kd_jax.run trains it first, on discovery's data and class split)."""
    if "pretrain" in flags and "uno" in flags:
        raise ValueError(f"{config_file}: `pretrain` and `uno` exclude each other")

    def stage1():
        c = build("pretrain")
        c.method = "ncd_pretrain"
        c.ncd.pretrain.enabled = False
        return c

    if "pretrain" in flags:
        return stage1()
    c = build("discover")
    c.method = "uno" if "uno" in flags else "sckd"
    c.ncd.pretrain.train = stage1()
    return c


def epochs_to_steps(images: int, batch: int, epochs: float) -> int:
    return max(1, int(round(images / batch * epochs)))


def ncd_schedule(
    c: ml_collections.ConfigDict,
    *,
    images: int,
    batch: int,
    epochs: float,
    lr: float,
    weight_decay: float,
    warmup_epochs: float = 0.0,
    end_lr: float = 0.0,
    ramp_epochs: float = 0.0,
) -> None:
    """SGD with warm-up + cosine, sized in epochs of `images` training images (UNO style)."""
    c.batch_size = batch
    c.num_steps = epochs_to_steps(images, batch, epochs)
    c.optimizer.update(
        name="sgd",
        lr=lr,
        momentum=0.9,
        weight_decay=weight_decay,
        schedule="cosine",
        end_lr=end_lr,
        warmup_steps=epochs_to_steps(images, batch, warmup_epochs) if warmup_epochs else 0,
    )
    c.sckd.ramp_steps = epochs_to_steps(images, batch, ramp_epochs) if ramp_epochs else 0
    c.log_every = min(100, max(1, c.num_steps // 20))
    c.eval_every = max(1, c.num_steps // 10)
    c.checkpoint_every = min(1000, c.num_steps)


def ncd_uno_recipe(c: ml_collections.ConfigDict, *, augment: str, overcluster_factor: int) -> None:
    """UNO's published discovery recipe (the README commands of DonkeyShot21/UNO, with
    `--multicrop`, and the defaults of its main_discover.py): both large views strongly
    augmented with `augment` (`uno_cifar` | `uno_imagenet`, its utils/transforms.py), 2 small
    crops of that recipe, 4 heads, projector 2048 -> 256 and `overcluster_factor`."""
    c.ncd.strong_views, c.ncd.strong_augment, c.ncd.num_small_crops = "both", augment, 2
    c.ncd.num_heads, c.ncd.hidden_dim, c.ncd.proj_dim = 4, 2048, 256
    c.ncd.overcluster_factor = overcluster_factor


def ncd_smoke(c: ml_collections.ConfigDict) -> None:
    """A seconds-long run of any NCD config (tests): LeNet-5 at 32 px, tiny heads, 2 steps."""
    c.model.name = "lenet5"
    c.data.image_size, c.data.eval_crop = 32, 1.0
    c.data.augment = "crop_flip" if c.data.augment == "inception" else c.data.augment
    c.data.shuffle_buffer = 64
    c.ncd.hidden_dim, c.ncd.proj_dim, c.ncd.num_heads = 16, 8, 2
    c.ncd.trainable, c.ncd.backbone_workdir = (), ""
    c.ncd.max_train_eval_examples = 16
    if c.ncd.num_small_crops:  # LeNet-5 takes 32 px only: the multi-crop path at full size
        c.ncd.small_crop_size = c.data.image_size
    c.data.target.max_eval_examples = 16
    c.batch_size, c.eval_batch_size, c.num_steps = 16, 16, 2
    c.optimizer.warmup_steps = 0
    c.sckd.ramp_steps = 1
    c.log_every, c.eval_every, c.checkpoint_every = 1, 2, 2


def ncd_fine_grained(
    c: ml_collections.ConfigDict, stage: str, smoke: bool, *, train_images: int
) -> None:
    """The fine-grained protocol (CUB, Stanford Cars, FGVC-Aircraft) on DINO ViT-B/16, for
    `stage` "pretrain" or "discover" of a config holding the NCD keys.

    Following Cr-KD's discovery configs: 224 px, only the last block (and the final norm)
    fine-tuned, 2 heads, projector 768 → 2048 → 256, SGD 1e-3 → 1e-4, 100 epochs, batch 512
    (stage 1 the same on the known classes). DINO weights enter through stage 1's
    `ncd.backbone_workdir` (a workdir written by `python -m kd_jax.tools.convert_torch`).
    """
    num_known, num_novel = c.ncd.num_known, c.ncd.num_novel
    c.num_classes = num_known + num_novel
    c.data.image_size, c.data.channels, c.data.normalization = 224, 3, "imagenet"
    c.data.augment, c.data.eval_crop = "inception", 0.875
    c.model.name = "vit_b16"
    c.ncd.trainable = ("blocks_11", "norm")
    c.ncd.num_heads, c.ncd.proj_dim = 2, 256
    c.data.target.train_split, c.data.target.eval_split = "train", "test"
    images = (
        train_images
        * (num_known if stage == "pretrain" else num_known + num_novel)
        // (num_known + num_novel)
    )
    ncd_schedule(
        c,
        images=images,
        batch=512 if stage == "discover" else 256,
        epochs=100,
        lr=1e-3,
        weight_decay=1.5e-4,
        warmup_epochs=0,
        end_lr=1e-4,
        ramp_epochs=10 if stage == "discover" else 0,
    )
    if smoke:
        ncd_smoke(c)
