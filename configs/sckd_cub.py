"""SCKD (or UNO) on CUB-200-2011 (100 known / 100 novel classes), DINO ViT-B/16, 224 px.

    python -m kd_jax.tools.convert_torch --arch=vit_b16 --num_classes=0 --src=dino_vitbase16_pretrain.pth --out=/ckpt/dino_vitb16
    python -m kd_jax.main --config=configs/sckd_cub.py --workdir=/tmp/kd/sckd_cub \
        --config.ncd.pretrain.train.ncd.backbone_workdir=/ckpt/dino_vitb16

TFDS `caltech_birds2011` (train 5,994 / test 5,794). The DINO ViT-B/16 weights are brought with
the teacher-import tool `python -m kd_jax.tools.convert_torch` into a workdir and named as stage 1's
`ncd.backbone_workdir` (required: stage 1 fine-tunes only the last block, so a bare run stops
at once naming it, with the TFDS data if that is not prepared: `tfds build caltech_birds2011`).
Known = labels 0–99, novel = 100–199 by default; the semantic-shift-benchmark split that Cr-KD
uses goes in `--config.ncd.known_classes=(...)` / `--config.ncd.novel_classes=(...)` (in both
stages). Protocol: `kd_jax.config_utils.ncd_fine_grained`. About 1 hour on one A100-class GPU (untimed
here). `:uno` for the UNO base, `:pretrain` for stage 1 only, `:smoke` for seconds (tests).
"""

from kd_jax import config_utils
from kd_jax.methods import sckd


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, config_utils.NCD_ARGS, __file__)
    return config_utils.ncd_stages(lambda stage: _config(stage, "smoke" in flags), flags, __file__)


def _config(stage, smoke):
    c = config_utils.base_config()
    c.data.target.source, c.data.target.name = "tfds", "caltech_birds2011"
    c.update(sckd.default_config(num_known=100, num_novel=100))
    config_utils.ncd_fine_grained(c, stage, smoke, train_images=5994)
    return c
