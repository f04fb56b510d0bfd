"""configs/kd_cifar10.py on CIFAR-100: same arguments, schedule and runtime.

    python -m kd_jax.main --config=configs/kd_cifar100.py:r34_r18,pool --config.teacher.workdir=gs://.../teacher_cifar100 --config.data.transfer.pattern='gs://.../imagenet32/pool-*.tfrecord' --workdir=gs://.../kd
"""
from kd_jax import config_utils


def get_config(arg="r34_r18,pool"):
    c = config_utils.sibling(__file__, "kd_cifar10.py", arg)
    config_utils.cifar_data(c, "cifar100")
    return c
