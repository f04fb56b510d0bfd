"""configs/teacher_cifar10.py on CIFAR-100: same arguments, schedule and runtime.

python -m kd_jax.main --config=configs/teacher_cifar100.py:resnet34_cifar --workdir=gs://.../teacher
"""

from kd_jax import config_utils


def get_config(arg="resnet34_cifar"):
    c = config_utils.sibling(__file__, "teacher_cifar10.py", arg)
    config_utils.cifar_data(c, "cifar100")
    return c
