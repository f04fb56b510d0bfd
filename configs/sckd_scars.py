"""SCKD (or UNO) on Stanford Cars (98 known / 98 novel classes), DINO ViT-B/16, 224 px.

    python -m kd_jax.tools.convert_torch --arch=vit_b16 --num_classes=0 --src=dino_vitbase16_pretrain.pth --out=/ckpt/dino_vitb16
    python -m kd_jax.main --config=configs/sckd_scars.py --workdir=/tmp/kd/sckd_scars \
        --config.ncd.pretrain.train.ncd.backbone_workdir=/ckpt/dino_vitb16

TFDS `cars196` (train 8,144 / test 8,041). DINO weights via the teacher-import tool
`python -m kd_jax.tools.convert_torch`, passed as stage 1's `ncd.backbone_workdir` (required,
as in sckd_cub.py; `tfds build cars196` prepares the data). Known =
labels 0–97, novel = 98–195 by default (semantic-shift-benchmark lists via
`ncd.known_classes` / `ncd.novel_classes`). Protocol: `kd_jax.config_utils.ncd_fine_grained`. About
1 hour on one A100-class GPU (untimed here). `:uno`, `:pretrain`, `:smoke` as in sckd_cub.py.
"""

from kd_jax import config_utils
from kd_jax.methods import sckd


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, config_utils.NCD_ARGS, __file__)
    return config_utils.ncd_stages(lambda stage: _config(stage, "smoke" in flags), flags, __file__)


def _config(stage, smoke):
    c = config_utils.base_config()
    c.data.target.source, c.data.target.name = "tfds", "cars196"
    c.update(sckd.default_config(num_known=98, num_novel=98))
    config_utils.ncd_fine_grained(c, stage, smoke, train_images=8144)
    return c
