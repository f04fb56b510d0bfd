"""SCKD (or UNO) on FGVC-Aircraft (50 known / 50 novel variants), DINO ViT-B/16, 224 px.

    python -m kd_jax.tools.convert_torch --arch=vit_b16 --num_classes=0 --src=dino_vitbase16_pretrain.pth --out=/ckpt/dino_vitb16
    python -m kd_jax.main --config=configs/sckd_aircraft.py --workdir=/tmp/kd/sckd_aircraft \
        --config.data.target.path=/data/fgvc_aircraft \
        --config.ncd.pretrain.train.ncd.backbone_workdir=/ckpt/dino_vitb16

An image folder `<path>/<split>/<variant>/*.jpg` (splits `trainval` and `test`; lay out the
official `images_variant_{trainval,test}.txt` lists that way, one folder per variant, sorted
folder names = labels 0–99). Known = the first 50 variants, novel the other 50 (SSB lists via
`ncd.known_classes` / `ncd.novel_classes`). DINO weights via the teacher-import tool
`python -m kd_jax.tools.convert_torch`, passed as stage 1's `ncd.backbone_workdir` (both keys
are required: a bare run stops at once naming them). Protocol:
`kd_jax.config_utils.ncd_fine_grained`. About 1 hour on one A100-class GPU (untimed here).
`:uno`, `:pretrain`, `:smoke` as in sckd_cub.py.
"""

from kd_jax import config_utils
from kd_jax.methods import sckd


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, config_utils.NCD_ARGS, __file__)
    return config_utils.ncd_stages(lambda stage: _config(stage, "smoke" in flags), flags, __file__)


def _config(stage, smoke):
    c = config_utils.base_config()
    c.data.target.source = "folder"
    c.update(sckd.default_config(num_known=50, num_novel=50))
    config_utils.ncd_fine_grained(c, stage, smoke, train_images=6667)
    c.data.target.train_split = "trainval"
    return c
