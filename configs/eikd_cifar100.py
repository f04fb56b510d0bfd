"""EIKD on CIFAR100 with an ImageNet-32 open-world pool (TFRecord shards).

    python -m kd_jax.main --config=configs/eikd_cifar100.py:r34_r18 \
        --config.teacher.workdir=gs://.../teacher_cifar100 \
        --config.data.transfer.pattern='gs://.../imagenet32/pool-*.tfrecord' --workdir=gs://.../eikd

Same recipe as configs/eikd_cifar10.py (pairs r34_r18, vgg11_r18, wrn40_2_wrn16_1,
wrn40_2_wrn40_1, wrn40_2_wrn16_2; N = 600k balanced, so 6,000 per class; top-50 class
dropping; batch 256, 80k iterations, steps at 40 % / 80 %): about 2.5 h on a v4-8 for
ResNet-34 -> 18. `global`, `no_drop`, `no_feat`, `no_rel`, `smoke` as there. Without
`--config.teacher.workdir` the teacher is trained first into <workdir>/teacher with
configs/teacher_cifar100.py's settings; TFDS `cifar100` must be prepared (`tfds build cifar100`).
"""

import importlib.util
import os


def get_config(arg="r34_r18"):
    # Load the sibling module (not its config) to reuse its builder with CIFAR-100 data.
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "eikd_cifar10.py")
    spec = importlib.util.spec_from_file_location("kd_jax_config_eikd_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.build(arg, __file__, "cifar100")
