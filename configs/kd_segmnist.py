"""Per-pixel Hinton KD, small DeepLabV3-ResNet → small DeepLabV3-MobileNetV2, on SegMNIST.

    python -m kd_jax.main --config=configs/kd_segmnist.py:pool --workdir=/tmp/kd/kd_segmnist_pool

Argument picks the transfer set: `original` (the SegMNIST train canvases without masks: the
upper bound), `pool` (the 5,000 canvases composed from the bundled open-world pool), `random` (a
random pool subset of `data.transfer.subset_size` = 2,000 canvases). Add `,smoke` for a
seconds-long run. The teacher (configs/teacher_segmnist.py) is trained first into
<workdir>/teacher unless `--config.teacher.workdir` names a finished teacher run. See README
"Segmentation" for the measured runtimes and mIoU on 2 CPU cores.
"""

from kd_jax import config_utils


def get_config(arg="pool"):
    flags = config_utils.parse_arg(arg, ("original", "pool", "random", "smoke"), __file__)
    smoke = "smoke" in flags
    c = config_utils.base_config()
    c.method = "kd"
    c.teacher.train = config_utils.sibling(
        __file__, "teacher_segmnist.py", "smoke" if smoke else None
    )
    c.num_classes = c.teacher.train.num_classes
    c.teacher.model = c.teacher.train.model.name
    c.model.name = "deeplabv3_mobilenetv2_small"
    c.data = c.teacher.train.data.copy_and_resolve_references()
    c.eval_batch_size = c.teacher.train.eval_batch_size
    if "original" in flags:
        c.data.transfer.source = "original"
    else:
        c.data.transfer.source = "segmnist_pool"
        c.data.transfer.subset = "random" if "random" in flags else "all"
        c.data.transfer.subset_size = 2000 if "random" in flags else 0
    c.kd.temperature = 4.0
    c.batch_size = 32
    c.num_steps = 1500
    # AdamW: SGD (lr 0.05) kept predicting background only for the first ~500 steps (93 % of
    # the pixels) in a first try; AdamW leaves it sooner (README "Segmentation").
    c.optimizer.update(name="adamw", lr=2e-3, weight_decay=1e-4, warmup_steps=50)
    c.log_every, c.eval_every, c.checkpoint_every = 100, 500, 500
    if smoke:
        c.batch_size, c.num_steps = 16, 30
        c.optimizer.warmup_steps = 5
        c.data.transfer.subset_size = min(c.data.transfer.subset_size, 200)
        c.log_every, c.eval_every, c.checkpoint_every = 10, 30, 30
    return c
