"""Config defaults shared by the NCD configs (`configs/sckd_*.py`): the `ncd` and `sckd` keys
read by `kd_jax.methods.sckd` (NCDPretrain, UNO, SCKD). Only ml_collections is imported, so a
config file stays cheap to load.
"""
from __future__ import annotations

import ml_collections

from kd_jax import config_utils

ARGS = ("uno", "pretrain", "smoke")


def add_ncd_keys(c: ml_collections.ConfigDict, num_known: int, num_novel: int) -> None:
    """Adds `c.ncd` (class split, UNO heads, stage chaining) and `c.sckd` (the SCKD terms)."""
    c.ncd = ml_collections.ConfigDict({
        # Class split (original label ids). Explicit lists win; else the first `num_known`
        # classes of `classes` / `classes_file` / a `subset_seed`-ed choice from
        # `total_classes` / 0..num_known+num_novel-1 are known and the next `num_novel` novel.
        "known_classes": (), "novel_classes": (), "classes": (), "classes_file": "",
        "subset_seed": -1, "total_classes": 0,
        "num_known": num_known, "num_novel": num_novel,
        # Share of each batch from the labeled stream; 0 = proportional to the set sizes (UNO).
        "labeled_fraction": 0.0,
        # UNO heads: cosine logits / temperature, H novel heads + H over-clustering heads.
        "temperature": 0.1, "num_heads": 4, "overcluster_factor": 3,
        "hidden_dim": 2048, "proj_dim": 128,
        "sk_iters": 3, "sk_epsilon": 0.05,
        "head_loss_decay": 0.99,    # running per-head cluster loss -> the best head
        "max_train_eval_examples": 0,  # 0 = the whole unlabeled train set in each eval
        # Top-level backbone modules that train (empty = all), e.g. ("blocks_11", "norm").
        "trainable": (),
        # Stage 1 may start from converted weights (e.g. DINO via kd_jax.tools.convert_torch).
        "backbone_workdir": "",
        # Stage 2 starts from stage 1: a finished run in `workdir`, or `train` is trained into
        # <workdir>/pretrain first.
        "pretrain": ml_collections.ConfigDict({
            "enabled": True, "workdir": "", "train": ml_collections.ConfigDict()}),
    })
    c.sckd = ml_collections.ConfigDict({
        "smi": "infonce",           # infonce | none
        "sc": "rel_kl",             # rel_kl | none
        # reliable (default): known -> novel among the labeled rows, novel -> known among the
        # unlabeled rows, i.e. each space teaches where it has a training signal. The spec's
        # `both` (every row, both ways) makes the known space teach the novel one its
        # structure of the *novel* images, a far worse clustering (MNIST, k-means on r^K: 46 %
        # vs 73-81 % for the trained novel heads): 70.8 ± 11.9 vs 80.6 ± 3.1 task-aware novel
        # accuracy over 3 seeds (benchmarks/results/offline_sckd.md).
        "direction": "reliable",    # reliable | both | known_to_novel | novel_to_known
        "space": "probs",           # probs | embeddings
        # all (the spec: the whole global batch) | unlabeled (outside the spec: the relations
        # only among the unlabeled samples). Applies to L_SMI, and to L_SC unless
        # direction=reliable, which picks its own rows.
        "samples": "all",
        "lambda_smi": 1.0, "lambda_sc": 1.0,
        "ramp_steps": 0,            # linear 0 -> 1 ramp of both weights (0 = no ramp)
        "space_temperature": 0.1,   # τ of r = softmax(logits / τ)
        "smi_temperature": 0.1,     # τ_m
        "sc_temperature": 0.1,      # τ_r
    })


def stage(c: ml_collections.ConfigDict, flags: set, config_file: str) -> str:
    """Sets `c.method` from the flags and, for stage 2, chains the stage-1 config of the same
    file (`pretrain` argument, with `smoke` carried over). Returns "pretrain" or "discover"."""
    if "pretrain" in flags:
        if "uno" in flags:
            raise ValueError(f"{config_file}: `pretrain` and `uno` exclude each other")
        c.method = "ncd_pretrain"
        c.ncd.pretrain.enabled = False
        return "pretrain"
    c.method = "uno" if "uno" in flags else "sckd"
    c.ncd.pretrain.train = config_utils.sibling(
        config_file, config_file.rsplit("/", 1)[-1],
        "pretrain,smoke" if "smoke" in flags else "pretrain")
    return "discover"


def epochs_to_steps(images: int, batch: int, epochs: float) -> int:
    return max(1, int(round(images / batch * epochs)))


def schedule(c: ml_collections.ConfigDict, *, images: int, batch: int, epochs: float, lr: float,
             weight_decay: float, warmup_epochs: float = 0.0, end_lr: float = 0.0,
             ramp_epochs: float = 0.0) -> None:
    """SGD with warm-up + cosine, sized in epochs of `images` training images (UNO style)."""
    c.batch_size = batch
    c.num_steps = epochs_to_steps(images, batch, epochs)
    c.optimizer.update(name="sgd", lr=lr, momentum=0.9, weight_decay=weight_decay,
                       schedule="cosine", end_lr=end_lr,
                       warmup_steps=epochs_to_steps(images, batch, warmup_epochs)
                       if warmup_epochs else 0)
    c.sckd.ramp_steps = epochs_to_steps(images, batch, ramp_epochs) if ramp_epochs else 0
    c.log_every = min(100, max(1, c.num_steps // 20))
    c.eval_every = max(1, c.num_steps // 10)
    c.checkpoint_every = min(1000, c.num_steps)


def smoke(c: ml_collections.ConfigDict) -> None:
    """A seconds-long run of any NCD config (tests): LeNet-5 at 32 px, tiny heads, 2 steps."""
    c.model.name = "lenet5"
    c.data.image_size, c.data.eval_crop = 32, 1.0
    c.data.augment = "crop_flip" if c.data.augment == "inception" else c.data.augment
    c.data.shuffle_buffer = 64
    c.ncd.hidden_dim, c.ncd.proj_dim, c.ncd.num_heads = 16, 8, 2
    c.ncd.trainable, c.ncd.backbone_workdir = (), ""
    c.ncd.max_train_eval_examples = 16
    c.data.target.max_eval_examples = 16
    c.batch_size, c.eval_batch_size, c.num_steps = 16, 16, 2
    c.optimizer.warmup_steps = 0
    c.sckd.ramp_steps = 1
    c.log_every, c.eval_every, c.checkpoint_every = 1, 2, 2


def fine_grained(c: ml_collections.ConfigDict, flags: set, config_file: str, *,
                 num_known: int, num_novel: int, train_images: int) -> str:
    """The fine-grained protocol (CUB, Stanford Cars, FGVC-Aircraft) on DINO ViT-B/16.

    Following Cr-KD's discovery configs: 224 px, only the last block (and the final norm)
    fine-tuned, 2 heads, projector 768 → 2048 → 256, SGD 1e-3 → 1e-4, 100 epochs, batch 512
    (stage 1 the same on the known classes). DINO weights enter through stage 1's
    `ncd.backbone_workdir` (a workdir written by `python -m kd_jax.tools.convert_torch`).
    """
    c.num_classes = num_known + num_novel
    c.data.image_size, c.data.channels, c.data.normalization = 224, 3, "imagenet"
    c.data.augment, c.data.eval_crop = "inception", 0.875
    add_ncd_keys(c, num_known=num_known, num_novel=num_novel)
    c.model.name = "vit_b16"
    c.ncd.trainable = ("blocks_11", "norm")
    c.ncd.num_heads, c.ncd.proj_dim = 2, 256
    c.data.target.train_split, c.data.target.eval_split = "train", "test"
    which = stage(c, flags, config_file)
    images = train_images * (num_known if which == "pretrain" else num_known + num_novel) \
        // (num_known + num_novel)
    schedule(c, images=images, batch=512 if which == "discover" else 256, epochs=100, lr=1e-3,
             weight_decay=1.5e-4, warmup_epochs=0, end_lr=1e-4,
             ramp_epochs=10 if which == "discover" else 0)
    if "smoke" in flags:
        smoke(c)
    return which
