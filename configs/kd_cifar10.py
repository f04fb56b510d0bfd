"""Hinton KD on CIFAR10: transfer set = original images (no labels), an open-world pool of
TFRecord shards (ImageNet-32 in the papers), or a random pool subset.

    python -m kd_jax.main --config=configs/kd_cifar10.py:r34_r18,pool \
        --config.teacher.workdir=gs://.../teacher_cifar10 \
        --config.data.transfer.pattern='gs://.../imagenet32/pool-*.tfrecord' --workdir=gs://.../kd

Pairs: r34_r18, vgg11_r18, wrn40_2_wrn16_1, wrn40_2_wrn40_1, wrn40_2_wrn16_2.
Transfer: original | pool | random (50k images, the CIFAR train-set size). 80k iterations of
batch 256 with steps at 40 % / 80 % (DFND's schedule): about 2 h on a v4-8 for ResNet-34 -> 18.
Without `--config.teacher.workdir` the pair's teacher is trained first into <workdir>/teacher
with configs/teacher_cifar10.py's settings (`config.teacher.train`, e.g. 200 epochs of
ResNet-34: about 1.5 h on a v4-8). TFDS `cifar10` must be prepared (`tfds build cifar10`, or
`--config.data.target.data_dir` / TFDS_DATA_DIR naming where it is); run without these keys,
the config stops at once listing every missing one with the command that makes it.
`,smoke` runs a few steps (tests, mock data / tiny shards).
"""

from kd_jax import config_utils


def get_config(arg="r34_r18,pool"):
    return build(arg, __file__, "cifar10")


def build(arg, config_file, dataset):
    flags = set(filter(None, (arg or "").split(",")))
    teacher, student = config_utils.cifar_pair(flags, config_file)
    config_utils.parse_arg(
        arg, tuple(config_utils.CIFAR_PAIRS) + ("original", "pool", "random", "smoke"), config_file
    )
    c = config_utils.base_config()
    c.method = "kd"
    c.model.name, c.teacher.model = student, teacher
    # Trained first into <workdir>/teacher unless --config.teacher.workdir names a finished one.
    c.teacher.train = config_utils.sibling(
        config_file, f"teacher_{dataset}.py", teacher + (",smoke" if "smoke" in flags else "")
    )
    config_utils.cifar_data(c, dataset)
    if "original" in flags:
        c.data.transfer.source = "original"
    else:
        c.data.transfer.source = "shards"
        c.data.transfer.subset = "random" if "random" in flags else "all"
        c.data.transfer.subset_size = 50000 if "random" in flags else 0
    c.batch_size = 256
    c.num_steps = 80000
    c.optimizer.schedule, c.optimizer.decay_at = "step", (0.4, 0.8)
    c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
    if "smoke" in flags:
        c.batch_size, c.eval_batch_size, c.num_steps = 16, 16, 2
        c.data.transfer.subset_size = min(c.data.transfer.subset_size, 16)
        c.data.target.max_eval_examples = 32
        c.log_every = c.eval_every = c.checkpoint_every = 2
    return c
