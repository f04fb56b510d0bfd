"""ODSD for segmentation (§5) on SegMNIST: small DeepLabV3-ResNet → small DeepLabV3-MobileNetV2.

    python -m kd_jax.main --config=configs/odsd_segmnist.py --workdir=/tmp/kd/odsd_segmnist

APS samples N = 2,000 canvases from the 5,000-canvas SegMNIST pool (`segmnist_pool`: canvases of
the bundled open-world pool's handwriting, printed digits, letters and photo crops; no masks):
image score = mean pixel max-probability of the teacher, class balance by the dominant
non-background class (soft pixel share, background = class 10 left out), prototypes on the
teacher's pooled head features. The student learns with per-pixel LNR + L_TR + L_SR (pooled
features) and is evaluated by mIoU / pixel accuracy on the 1,000 SegMNIST test canvases.
The teacher (configs/teacher_segmnist.py) is trained first into <workdir>/teacher unless
`--config.teacher.workdir` names a finished teacher run. Outputs: results.json (miou,
pixel_accuracy, per_class_iou, teacher_miou, selection: per-class counts, source and related
(digit canvas) shares of the selection vs the pool), selection.npz, sampling.png.

Arguments (comma-separated): `smoke` (the smallest run through every part, for tests: the
teacher's smoke, a 128-canvas pool, N = 32, 4 student steps of 16, no plot or BN distance), or
one ablation: `no_aps` (a random pool subset of N), `no_lnr` (plain per-pixel KD targets),
`no_tr` (λ_TR = 0), `no_sr` (λ_SR = 0), `all` (the whole pool).
Every other switch is `--config.odsd.<part>.<key>` (kd_jax/methods/odsd.py).

Measured runtime (AMD EPYC, 2 cores shared with other jobs): the full run is not measured yet;
`:smoke` from a random teacher (tests/test_segmentation_odsd.py) 103 s at load 3–5, mostly
XLA compilation (README "Segmentation").
"""

from kd_jax import config_utils
from kd_jax.data import segmnist
from kd_jax.methods import odsd


def get_config(arg=None):
    flags = config_utils.parse_arg(
        arg, ("smoke", "no_aps", "no_lnr", "no_tr", "no_sr", "all"), __file__
    )
    smoke = "smoke" in flags
    c = config_utils.base_config()
    c.method = "odsd"
    c.teacher.train = config_utils.sibling(
        __file__, "teacher_segmnist.py", "smoke" if smoke else None
    )
    c.num_classes = c.teacher.train.num_classes
    c.teacher.model = c.teacher.train.model.name
    c.model.name = "deeplabv3_mobilenetv2_small"
    c.data = c.teacher.train.data.copy_and_resolve_references()
    c.data.transfer.source = "segmnist_pool"
    c.data.transfer.pool_canvases = 0  # 0 = the 5,000-canvas pool
    c.eval_batch_size = c.teacher.train.eval_batch_size
    c.odsd = odsd.default_config()
    c.odsd.aps.size = 2000  # N: half the SegMNIST train size, as kd_segmnist.py:random
    c.odsd.segmentation.background = segmnist.BACKGROUND
    c.odsd.diagnostics.bn_images = 2000
    c.kd.temperature = 4.0
    c.batch_size = 32
    c.num_steps = 1500
    # kd_segmnist.py's optimiser, so ODSD and KD differ only in data and losses.
    c.optimizer.update(name="adamw", lr=2e-3, weight_decay=1e-4, warmup_steps=50)
    c.log_every, c.eval_every, c.checkpoint_every = 100, 500, 500
    if "no_aps" in flags:
        c.odsd.aps.selection = "random"
    if "all" in flags:
        c.odsd.aps.selection = "all"
    if "no_lnr" in flags:
        c.odsd.lnr.rule = "none"
    if "no_tr" in flags:
        c.odsd.tr.weight = 0.0
    if "no_sr" in flags:
        c.odsd.sr.weight = 0.0
    if smoke:  # the smallest run through every part (tests/test_segmentation_odsd.py)
        c.data.transfer.pool_canvases = 128  # a 128-canvas pool composed the same way
        c.data.target.max_eval_examples = 64
        c.eval_batch_size = 64
        c.batch_size, c.num_steps = 16, 4
        c.optimizer.warmup_steps = 2
        c.odsd.aps.size = 32
        c.odsd.aps.score_batch_size = 64
        # no sampling.png / BN-statistics distance: each costs compilations, not coverage
        c.odsd.diagnostics.plot = False
        c.odsd.diagnostics.bn_images = 0
        c.log_every, c.eval_every, c.checkpoint_every = 2, 4, 4
    return c
