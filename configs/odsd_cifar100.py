"""ODSD on CIFAR-100 with an ImageNet-32 open-world pool (TFRecord shards), the paper's setting.

    python -m kd_jax.main --config=configs/odsd_cifar100.py:r34_r18 \
        --config.teacher.workdir=gs://.../teacher_cifar100_resnet34 \
        --config.data.transfer.pattern='gs://.../imagenet32/pool-*.tfrecord' \
        --workdir=gs://.../odsd_cifar100_r34_r18

Pairs (argument): r34_r18 (default), vgg11_r18, wrn40_2_wrn16_1, wrn40_2_wrn40_1,
wrn40_2_wrn16_2. Same recipe as configs/odsd_cifar10.py (N = 50,000 = 500 per class, 200
epochs over D, SGD 0.1 / 0.9 / 5e-4, batch 128, ×0.1 at epochs 120 / 150 / 180); about 3 h on a
v4-8 for ResNet-34 -> ResNet-18. Without `--config.teacher.workdir` the teacher is trained first
into <workdir>/teacher with configs/teacher_cifar100.py's settings. TFDS `cifar100` must be
prepared (`tfds build cifar100`). `,smoke` runs a few steps (tests).
"""

import importlib.util
import os


def get_config(arg="r34_r18"):
    # Load the sibling module (not its config) to reuse its builder with CIFAR-100 data (100
    # classes, CIFAR-100 normalisation, target and teacher config).
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "odsd_cifar10.py")
    spec = importlib.util.spec_from_file_location("kd_jax_config_odsd_cifar10", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cifar_config(arg, "cifar100", __file__)
