"""SCKD (or UNO) on ImageNet-100 (50 known / 50 novel classes), ImageNet ResNet-18, 224 px.

    python -m kd_jax.main --config=configs/sckd_imagenet100.py --workdir=/tmp/kd/sckd_in100 \
        --config.data.target.data_dir=/data/tfds \
        --config.ncd.classes_file=/data/imagenet100_classes.txt

TFDS `imagenet2012` (manual download). The 100 classes: UNO's official list (one WordNet id,
e.g. `n01558993`, or integer label per line, the first 50 known) via `ncd.classes_file`; that
file cannot be downloaded here, so the default is a seeded choice (`ncd.subset_seed=0`) of 100
of the 1,000 labels — a different subset from UNO's, so numbers are not comparable with its table
until the official list is passed. Stage 1 (`pretrain`, supervised on the 50 known classes,
100 epochs, SGD 0.1, batch 256, wd 1e-4) is trained into <workdir>/pretrain first unless
`--config.ncd.pretrain.workdir` names a finished run; stage 2: batch 512, SGD 0.4 (10 warm-up
epochs, cosine to 1e-3), wd 1.5e-4, 60 epochs, 4 heads + over-clustering (our choice of epochs).
Each stream is filtered by class from the full train split: the first pass counts the images
(one read of the split). Roughly a day on one A100-class GPU (untimed here).
`:smoke` shrinks it to seconds (tests, on `tfds.testing.mock_data`).
"""

from kd_jax import config_utils
from kd_jax.methods import sckd

IMAGES_PER_CLASS = 1300  # ImageNet-1k train images per class (about; for the schedule only)


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, config_utils.NCD_ARGS, __file__)
    return config_utils.ncd_stages(lambda stage: _config(stage, "smoke" in flags), flags, __file__)


def _config(stage, smoke):
    c = config_utils.base_config()
    c.num_classes = 100
    c.data.image_size, c.data.channels, c.data.normalization = 224, 3, "imagenet"
    c.data.augment, c.data.eval_crop = "inception", 0.875
    c.data.target.source, c.data.target.name = "tfds", "imagenet2012"
    c.data.target.train_split, c.data.target.eval_split = "train", "validation"
    c.update(sckd.default_config(num_known=50, num_novel=50))
    c.ncd.subset_seed, c.ncd.total_classes = 0, 1000
    c.model.name = "resnet18"
    if stage == "pretrain":
        config_utils.ncd_schedule(
            c,
            images=50 * IMAGES_PER_CLASS,
            batch=256,
            epochs=100,
            lr=0.1,
            weight_decay=1e-4,
            warmup_epochs=5,
            end_lr=1e-3,
        )
    else:
        config_utils.ncd_schedule(
            c,
            images=100 * IMAGES_PER_CLASS,
            batch=512,
            epochs=60,
            lr=0.4,
            weight_decay=1.5e-4,
            warmup_epochs=10,
            end_lr=1e-3,
            ramp_epochs=10,
        )
    if smoke:
        config_utils.ncd_smoke(c)
    return c
