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
`--config.ncd.pretrain.workdir` names a finished run. Stage 2 follows UNO's published ImageNet
recipe (DonkeyShot21/UNO; its README command is for its own 882 / 30 ImageNet splits, the
nearest it publishes): from that command 60 epochs, SGD 0.2 with 5 warm-up epochs, 4 heads,
`--multicrop` (2 large + 2 small crops), over-clustering factor 4, and a global batch of 512
(2 GPUs × 256, half labeled, half unlabeled: its utils/data.py, `ncd.labeled_fraction = 0.5`);
from its main_discover.py defaults momentum 0.9, wd 1.5e-4, cosine to 1e-3, projector
512 → 2048 → 256; from its utils/transforms.py (`ncd.strong_augment = uno_imagenet`): both large
views strongly augmented (resized crop of 50–100 % area, flip, colour jitter 0.4/0.4/0.2/0.1
with p 0.5, grayscale p 0.2, Gaussian blur σ 0.1–2 with p 0.2: no solarize / equalize there),
small crops 96 px of 8–50 % area, flip, jitter p 0.8, grayscale p 0.2, blur p 0.5. Each stream
is filtered by class from the full train split: the first pass counts the images (one read of
the split). Untimed here (no GPU in this environment); roughly a day on one A100-class GPU
before multi-crop, which adds about a fifth per step by pixel count (2 × 96² next to 2 × 224²).
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
            lr=0.2,
            weight_decay=1.5e-4,
            warmup_epochs=5,
            end_lr=1e-3,
            ramp_epochs=10,
        )
        config_utils.ncd_uno_recipe(c, augment="uno_imagenet", overcluster_factor=4)
        c.ncd.labeled_fraction = 0.5
    if smoke:
        config_utils.ncd_smoke(c)
    return c
