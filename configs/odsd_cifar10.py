"""ODSD on CIFAR-10 with an ImageNet-32 open-world pool (TFRecord shards), the paper's setting.

    python -m kd_jax.main --config=configs/odsd_cifar10.py:r34_r18 \
        --config.teacher.workdir=gs://.../teacher_cifar10_resnet34 \
        --config.data.transfer.pattern='gs://.../imagenet32/pool-*.tfrecord' \
        --workdir=gs://.../odsd_cifar10_r34_r18

Pairs (argument): r34_r18 (default), vgg11_r18, wrn40_2_wrn16_1, wrn40_2_wrn40_1,
wrn40_2_wrn16_2 (kd_jax.config_utils.CIFAR_PAIRS). The teacher is a
finished run or a converted PyTorch checkpoint in `--config.teacher.workdir`; without it the
pair's teacher is trained first into <workdir>/teacher with configs/teacher_cifar10.py's
settings (`config.teacher.train`). Write the pool with `python -m kd_jax.data.make_shards`
(ImageNet-1k train at 32 px, 1.28M images). TFDS `cifar10` must be prepared (`tfds build
cifar10`); run without the pool or the data, the config stops at once listing every missing key
with the command that makes it.
APS samples N = 50,000 images (the CIFAR train-set size); the student trains 200 epochs over
them (78,125 steps of batch 128, SGD 0.1 / 0.9 / 5e-4, ×0.1 at epochs 120 / 150 / 180), view 2
with colour jitter for L_SR. The teacher pass over 1.28M 32-px images takes a few minutes on a
v4-8; training about 3 h for ResNet-34 -> ResNet-18. `,smoke` runs a few steps (tests).
"""

from kd_jax import config_utils
from kd_jax.methods import odsd


def get_config(arg="r34_r18"):
    return cifar_config(arg, "cifar10", __file__)


def cifar_config(arg, dataset, config_file):
    flags = set(filter(None, (arg or "").split(",")))
    teacher, student = config_utils.cifar_pair(flags, config_file)
    config_utils.parse_arg(arg, tuple(config_utils.CIFAR_PAIRS) + ("smoke",), config_file)
    c = config_utils.base_config()
    c.method = "odsd"
    c.model.name, c.teacher.model = student, teacher
    # Trained first into <workdir>/teacher unless --config.teacher.workdir names a finished one.
    c.teacher.train = config_utils.sibling(
        config_file, f"teacher_{dataset}.py", teacher + (",smoke" if "smoke" in flags else "")
    )
    config_utils.cifar_data(c, dataset)
    c.data.transfer.source = "shards"
    c.odsd = odsd.default_config()
    c.odsd.aps.size = 50000
    c.odsd.aps.score_batch_size = 1024
    c.batch_size = 128
    epochs, size = 200, c.odsd.aps.size
    c.num_steps = epochs * size // c.batch_size
    c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay = 0.1, 0.9, 5e-4
    c.optimizer.schedule = "step"
    c.optimizer.decay_at = (120 / epochs, 150 / epochs, 180 / epochs)
    c.optimizer.decay_factor = 0.1
    c.kd.temperature = 4.0
    c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
    if "smoke" in flags:
        c.batch_size, c.eval_batch_size, c.num_steps = 16, 16, 2
        c.odsd.aps.size = 32
        c.odsd.aps.score_batch_size = 32
        c.odsd.diagnostics.bn_images = 32
        c.data.target.max_eval_examples = 32
        c.log_every = c.eval_every = c.checkpoint_every = 2
    return c
