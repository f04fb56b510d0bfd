"""SCKD (or UNO) on CIFAR-10, 5 known / 5 novel classes (UNO protocol), CIFAR ResNet-18.

    python -m kd_jax.main --config=configs/sckd_cifar10.py --workdir=/tmp/kd/sckd_cifar10
    python -m kd_jax.main --config=configs/sckd_cifar10.py:uno --workdir=/tmp/kd/uno_cifar10

Stage 1 (`:pretrain`, supervised on classes 0–4, 200 epochs, SGD 0.1, warm-up 10 epochs, cosine,
wd 1e-4, batch 256) is trained into <workdir>/pretrain first unless
`--config.ncd.pretrain.workdir` names a finished run. Stage 2 is UNO's published recipe, so `:uno`
can be held against UNO's README numbers. From UNO's README command for CIFAR10
(DonkeyShot21/UNO): 500 epochs (its paper's text says 200; the command, which its v2 numbers
come from, says 500), batch 512, 4 heads, `--multicrop` (2 large + 2 small crops),
over-clustering factor 10. From its main_discover.py defaults: SGD 0.4, momentum 0.9,
wd 1.5e-4, 10 warm-up epochs, cosine to 1e-3, projector 512 → 2048 → 256. From its
utils/transforms.py (`ncd.strong_augment = uno_cifar`): both large views strongly augmented
(pad-4 random crop or resized crop of 50–100 % area, flip, colour jitter 0.4/0.4/0.2/0.1 with
p 0.6, solarize and equalize with p 0.1 each); small crops 18 px of 30–80 % area, flip, jitter
p 0.8, solarize / equalize p 0.2. SCKD's terms ramp over the first 10 epochs. Untimed here (no
GPU in this environment): by pixel count, 500 epochs of 2 × 32² + 2 × 18² crops are about 3.3×
the compute of the former 200-epoch, 2-view default. The former views:
`--config.ncd.strong_views=second --config.ncd.strong_augment=simclr
--config.ncd.num_small_crops=0`. TFDS `cifar10` must be prepared (`tfds build cifar10`).
`:smoke` shrinks everything to seconds (tests).
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
            epochs=500,
            lr=0.4,
            weight_decay=1.5e-4,
            warmup_epochs=10,
            end_lr=1e-3,
            ramp_epochs=10,
        )
        config_utils.ncd_uno_recipe(c, augment="uno_cifar", overcluster_factor=10)
    if smoke:
        config_utils.ncd_smoke(c)
    return c
