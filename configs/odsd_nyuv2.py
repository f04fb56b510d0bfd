"""ODSD on NYUv2 segmentation (§5, DFAD's protocol) with an ImageNet open-world pool.

    python -m kd_jax.main --config=configs/odsd_nyuv2.py --workdir=/runs/odsd_nyuv2 \
        --config.teacher.workdir=/ckpt/teacher_nyuv2 \
        --config.data.target.path='/data/nyuv2/nyuv2_{split}.npz' \
        --config.data.transfer.pattern=/data/imagenet_pool

Teacher DeepLabV3-ResNet50 -> student DeepLabV3-MobileNetV2 (kd_jax.models, output stride 8),
13 classes, no background class (`odsd.segmentation.background = -1`: APS balances images by
their dominant class among all 13). All three keys above are required; run without them, the
config stops at once listing every missing one with the command that makes it.

Data, once:

    # DFAD's layout: NYU_ROOT/480_640/IMAGE/*.png and NYU_ROOT/nyuv2-meta-data (the 13-class
    # labels and splits.mat of github.com/ankurhanda/nyuv2-meta-data); 256 px shorter side
    python -m kd_jax.data.convert_nyuv2 --root=NYU_ROOT --out=/data/nyuv2 --short_side=256
    # the pool: ImageNet-1k train (1.28M images, labels unused) at the converted NYUv2 size
    python -m kd_jax.data.make_shards --src=ILSVRC2012_TRAIN_DIR --out=/data/imagenet_pool \
        --num_shards=256 --image_size=256x341 --format=jpeg

The teacher is a finished run of configs/teacher_nyuv2.py (same data, same domain), or a
PyTorch DeepLabV3-ResNet50 state dict converted with `python -m kd_jax.tools.convert_torch
--arch=deeplabv3_resnet50 --num_classes=13` (torchvision's naming; logits parity with
torchvision's deeplabv3_resnet50, and of the student with VainF's deeplabv3_mobilenet, is
checked by tests/test_convert_torch.py on reduced-width fixtures). DFAD's own checkpoint is not a
drop-in: it was trained on inputs normalised with mean = std = 0.5 (this domain uses ImageNet's
statistics) and its ASPP rates are (12, 24, 32), not torchvision's (12, 24, 36).

Protocol, from DFAD's released code (dataloader.py, DFAD_nyu_deeplab.py): images resized to 256
px on the shorter side (the "256 px" of the protocol), random 128×128 crops (padded where
smaller) + horizontal flip for training, mIoU (ignore index 255: unlabeled pixels) on the whole
256×341 images of the 654-image test split. Pool images take the same crops; L_SR's second view
is another crop / flip. Student schedule of DFAD's NYUv2 run: SGD 0.1 / 0.9 / 5e-5, batch 64,
75,000 steps (300 epochs × 50 iterations × 5 student steps), ×0.3 after each third (its
`--scheduler`, StepLR(100, 0.3)); τ = 4 for LNR (§4). APS samples N = 50,000 pool images, a
choice: §1E's rule (the original train-set size) gives 795, which DFAD's 4.8M training crops
would repeat ~6,000 times; 50,000 is what the CIFAR configs draw from the same ImageNet pool,
~96 epochs of crops here. Every other switch is `--config.odsd.<part>.<key>`.

Reference mIoU (DFAD's table; `reference`, printed beside the run's own): teacher 0.517, KD on
the original data 0.380, KD on related real data 0.396, DFAD 0.364. Runtime not measured
here (no accelerator, no data).

`smoke` (tests, CPU): the small DeepLabV3 variants (deeplabv3_resnet_small ->
deeplabv3_mobilenetv2_small), 32 px crops (tests/test_nyuv2.py converts to a 32 px shorter
side), N = 16, 2 steps of 8, 16 BN-distance images, no plot — the same code path otherwise (npz
target, pool shards, 13 classes, no background, whole-image eval).
"""

from kd_jax import config_utils
from kd_jax.methods import odsd

REFERENCE = (
    "DFAD's table (NYUv2, mIoU): teacher 0.517, KD on original data 0.380, KD on related "
    "data 0.396, DFAD 0.364"
)


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, ("smoke",), __file__)
    smoke = "smoke" in flags
    # The teacher config's data and classes, so student and teacher share one domain; its
    # training is not chained (teacher.train stays empty): the teacher is a required workdir.
    t = config_utils.sibling(__file__, "teacher_nyuv2.py", "smoke" if smoke else None)
    c = config_utils.base_config()
    c.method = "odsd"
    c.num_classes = t.num_classes
    c.teacher.model = t.model.name
    c.model.name = "deeplabv3_mobilenetv2_small" if smoke else "deeplabv3_mobilenetv2"
    c.data = t.data.copy_and_resolve_references()
    c.data.transfer.source = "shards"
    c.data.transfer.pattern = ""  # required: the pool's shard directory or glob
    c.eval_batch_size = t.eval_batch_size
    c.odsd = odsd.default_config()
    c.odsd.aps.size = 50000
    c.odsd.segmentation.background = -1  # NYUv2-13 has no background class
    c.kd.temperature = 4.0
    c.batch_size = 64
    c.num_steps = 300 * 50 * 5
    c.optimizer.update(
        name="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-5,
        schedule="step",
        decay_at=(1 / 3, 2 / 3),
        decay_factor=0.3,
    )
    c.log_every, c.eval_every, c.checkpoint_every = 100, 2500, 2500
    c.reference = REFERENCE
    if smoke:
        c.odsd.aps.size, c.odsd.aps.score_batch_size = 16, 16
        c.odsd.diagnostics.plot = False  # a figure costs time, not coverage
        c.odsd.diagnostics.bn_images = 16
        c.batch_size, c.num_steps = 8, 2
        c.log_every = c.eval_every = c.checkpoint_every = 2
        c.reference = ""
    return c
