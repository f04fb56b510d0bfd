"""SCKD (or UNO) on CIFAR-100, split `80_20` (80 known / 20 novel) or `50_50`, CIFAR ResNet-18.

    python -m kd_jax.main --config=configs/sckd_cifar100.py:80_20 --workdir=/tmp/kd/sckd_c100_80
    python -m kd_jax.main --config=configs/sckd_cifar100.py:50_50,uno --workdir=/tmp/kd/uno_c100_50

Known classes are labels 0..C_l-1, novel the next C_u (UNO's split). Stage 1 (`pretrain`,
supervised, 200 epochs, SGD 0.1, wd 1e-4, batch 256) is trained into <workdir>/pretrain first
unless `--config.ncd.pretrain.workdir` names a finished run (one stage-1 run serves both `uno`
and SCKD). Stage 2: batch 512, SGD 0.4 (10 warm-up epochs, cosine to 1e-3), wd 1.5e-4,
200 epochs (Cr-KD trains 50_50 for 500 with multi-crop: `--config.num_steps`), 4 heads +
3× over-clustering heads, projector 512 → 2048 → 128, SCKD ramp over 10 epochs. About 1.5 hours
per split on one A100-class GPU (untimed here). `:smoke` shrinks it to seconds (tests).
"""

from kd_jax import config_utils
from kd_jax.methods import sckd

SPLITS = {"80_20": (80, 20), "50_50": (50, 50)}


def get_config(arg="80_20"):
    flags = config_utils.parse_arg(arg, config_utils.NCD_ARGS + tuple(SPLITS), __file__)
    chosen = [s for s in SPLITS if s in flags]
    if len(chosen) > 1:
        raise ValueError(f"{__file__}: pick one split of {sorted(SPLITS)}")
    num_known, num_novel = SPLITS[chosen[0] if chosen else "80_20"]

    def build(stage):
        c = config_utils.base_config()
        config_utils.cifar_data(c, "cifar100")
        c.update(sckd.default_config(num_known=num_known, num_novel=num_novel))
        c.model.name = "resnet18_cifar"
        if stage == "pretrain":
            config_utils.ncd_schedule(
                c,
                images=500 * num_known,
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
                images=50000,
                batch=512,
                epochs=200,
                lr=0.4,
                weight_decay=1.5e-4,
                warmup_epochs=10,
                end_lr=1e-3,
                ramp_epochs=10,
            )
        if "smoke" in flags:
            config_utils.ncd_smoke(c)
        return c

    return config_utils.ncd_stages(build, flags, __file__)
