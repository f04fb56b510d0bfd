"""configs/kd_cifar10.py on CIFAR-100: same arguments, schedule and runtime; the teacher is
configs/teacher_cifar100.py's, trained first into <workdir>/teacher unless
`--config.teacher.workdir` names a finished one.

    python -m kd_jax.main --config=configs/kd_cifar100.py:r34_r18,pool --config.teacher.workdir=gs://.../teacher_cifar100 --config.data.transfer.pattern='gs://.../imagenet32/pool-*.tfrecord' --workdir=gs://.../kd
"""

import importlib.util
import os


def get_config(arg="r34_r18,pool"):
    # Load the sibling module (not its config) to reuse its builder with CIFAR-100 data.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kd_cifar10.py")
    spec = importlib.util.spec_from_file_location("kd_jax_config_kd_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(arg, __file__, "cifar100")
