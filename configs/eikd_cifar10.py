"""EIKD on CIFAR10 with an ImageNet-32 open-world pool (TFRecord shards).

    python -m kd_jax.main --config=configs/eikd_cifar10.py:r34_r18 \
        --config.teacher.workdir=gs://.../teacher_cifar10 \
        --config.data.transfer.pattern='gs://.../imagenet32/pool-*.tfrecord' --workdir=gs://.../eikd

Pairs: r34_r18 (default), vgg11_r18, wrn40_2_wrn16_1, wrn40_2_wrn40_1, wrn40_2_wrn16_2.
The teacher scores the whole pool once (about 10 minutes for 1.28M images on a v4-8) and keeps
N = 600k images balanced over its classes; pool images get the *teacher's* (CIFAR)
normalisation. DFND's schedule: batch 256, 80k iterations, SGD 0.1 / 0.9 / 5e-4, lr ×0.1 at
40 % and 80 %, RandomCrop(32, pad 4) + flip: about 2.5 h on a v4-8 for ResNet-34 -> 18.
Accuracy is evaluated every 2k steps (10k / 20k / 40k for the convergence claim).
Without `--config.teacher.workdir` the pair's teacher is trained first into <workdir>/teacher
with configs/teacher_cifar10.py's settings (`config.teacher.train`). TFDS `cifar10` must be
prepared (`tfds build cifar10`); run without the pool or the data, the config stops at once
listing every missing key with the command that makes it.
`global` (DFND's top-N), `no_drop`, `no_feat`, `no_rel` switch parts off; `,smoke` runs a few
steps (tests, tiny shards).
"""

from kd_jax import config_utils
from kd_jax.methods import eikd

DATASET = "cifar10"


def build(arg, config_file, dataset):
    flags = set(filter(None, (arg or "").split(",")))
    config_utils.parse_arg(
        arg,
        tuple(config_utils.CIFAR_PAIRS) + ("global", "no_drop", "no_feat", "no_rel", "smoke"),
        config_file,
    )
    teacher, student = config_utils.cifar_pair(flags, config_file)
    c = config_utils.base_config()
    c.method = "eikd"
    c.model.name, c.teacher.model = student, teacher
    # Trained first into <workdir>/teacher unless --config.teacher.workdir names a finished one.
    c.teacher.train = config_utils.sibling(
        config_file, f"teacher_{dataset}.py", teacher + (",smoke" if "smoke" in flags else "")
    )
    config_utils.cifar_data(c, dataset)
    c.data.transfer.source = "shards"
    c.eikd = eikd.default_config()  # N = 600k, balanced, confidence, top-⌈C/2⌉ dropping, ...
    if "global" in flags:
        c.eikd.selection.mode = "global"
    if "no_drop" in flags:
        c.eikd.class_drop.rule = "none"
    if "no_feat" in flags:
        c.eikd.weights.feature = 0.0
    if "no_rel" in flags:
        c.eikd.weights.rkd_distance = c.eikd.weights.rkd_angle = 0.0
    c.batch_size = 256
    c.num_steps = 80000
    c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay = 0.1, 0.9, 5e-4
    c.optimizer.schedule, c.optimizer.decay_at = "step", (0.4, 0.8)
    c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
    if "smoke" in flags:
        c.eikd.selection.size = 32
        c.eikd.selection.score_batch_size = 16
        c.batch_size, c.eval_batch_size, c.num_steps = 16, 16, 2
        c.data.target.max_eval_examples = 32
        c.log_every = c.eval_every = c.checkpoint_every = 2
    return c


def get_config(arg="r34_r18"):
    return build(arg, __file__, DATASET)
