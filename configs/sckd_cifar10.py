"""SCKD (or UNO) on CIFAR-10, 5 known / 5 novel classes (UNO protocol), CIFAR ResNet-18.

    python -m kd_jax.main --config=configs/sckd_cifar10.py --workdir=/tmp/kd/sckd_cifar10
    python -m kd_jax.main --config=configs/sckd_cifar10.py:uno --workdir=/tmp/kd/uno_cifar10

Stage 1 (`:pretrain`, supervised on classes 0–4, 200 epochs, SGD 0.1, warm-up 10 epochs, cosine,
wd 1e-4, batch 256) is trained into <workdir>/pretrain first unless
`--config.ncd.pretrain.workdir` names a finished run. Stage 2: batch 512, SGD 0.4, momentum 0.9,
wd 1.5e-4, 200 epochs (10 warm-up, cosine to 1e-3), 4 heads + over-clustering, projector
512 → 2048 → 128, SCKD ramp over the first 10 epochs. About 1.5 hours for both stages on one
A100-class GPU (untimed here: no GPU in this environment). TFDS `cifar10` must be prepared
(`tfds build cifar10`). `:smoke` shrinks everything to seconds (tests).
"""

from kd_jax import config_utils
from kd_jax.methods import sckd

TRAIN_IMAGES = {"pretrain": 25000, "discover": 50000}


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, config_utils.NCD_ARGS, __file__)
    return config_utils.ncd_stages(lambda stage: _config(stage, "smoke" in flags), flags, __file__)


def _config(stage, smoke):
    c = config_utils.base_config()
    config_utils.cifar_data(c, "cifar10")
    c.update(sckd.default_config(num_known=5, num_novel=5))
    c.model.name = "resnet18_cifar"
    if stage == "pretrain":
        config_utils.ncd_schedule(
            c,
            images=TRAIN_IMAGES[stage],
            batch=256,
            epochs=200,
            lr=0.1,
            weight_decay=1e-4,
            warmup_epochs=10,
            end_lr=1e-3,
        )
    else:
        config_utils.ncd_schedule(
            c,
            images=TRAIN_IMAGES[stage],
            batch=512,
            epochs=200,
            lr=0.4,
            weight_decay=1.5e-4,
            warmup_epochs=10,
            end_lr=1e-3,
            ramp_epochs=10,
        )
    if smoke:
        config_utils.ncd_smoke(c)
    return c
