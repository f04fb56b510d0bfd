"""Supervised teacher on CIFAR10 (TFDS), 200 epochs, SGD 0.1 / 0.9 / 5e-4, cosine.

    python -m kd_jax.main --config=configs/teacher_cifar10.py:resnet34_cifar --workdir=gs://.../teacher

Argument: any model name (resnet34_cifar default; vgg11, wrn40_2, resnet18_cifar, ...).
About 1.5 h on a v4-8 for ResNet-34; `,smoke` runs a few steps (tests, mock data).
"""

from kd_jax import config_utils


def get_config(arg="resnet34_cifar"):
    parts = [p for p in (arg or "resnet34_cifar").split(",") if p]
    smoke = "smoke" in parts
    names = [p for p in parts if p != "smoke"]
    c = config_utils.base_config()
    c.method = "teacher"
    c.model.name = names[0] if names else "resnet34_cifar"
    config_utils.cifar_data(c, "cifar10")
    c.batch_size = 128
    c.num_steps = 200 * 50000 // 128
    c.log_every, c.eval_every, c.checkpoint_every = 100, 2000, 2000
    if smoke:
        c.batch_size, c.eval_batch_size, c.num_steps = 16, 16, 2
        c.data.target.max_eval_examples = 32
        c.log_every = c.eval_every = c.checkpoint_every = 2
    return c
