"""DeepLabV3-ResNet50 teacher on NYUv2-13 (DFAD's protocol), from `kd_jax.data.convert_nyuv2`'s npz.

    python -m kd_jax.main --config=configs/teacher_nyuv2.py --workdir=/ckpt/teacher_nyuv2 \
        --config.data.target.path='/data/nyuv2/nyuv2_{split}.npz'

The data (`python -m kd_jax.data.convert_nyuv2 --root=NYU_ROOT --out=/data/nyuv2
--short_side=256`, see configs/odsd_nyuv2.py) and its geometry are DFAD's released code: images
at 256 px on the shorter side, random 128×128 crops (padded where smaller) + horizontal flip for
training, the whole 256×341 test images for mIoU / pixel accuracy (654 test, 795 train images;
unlabeled pixels are the ignore index 255). Schedule of DFAD's `train_teacher_seg.py` command for
NYUv2: SGD 0.05 / 0.9 / 5e-4, batch 16, 200 epochs (10,000 steps), ×0.1 after 100 epochs. Two
differences: DFAD starts from an ImageNet-pretrained ResNet-50 and trains with a focal loss
(γ = 2); kd_jax's teacher method trains from scratch with per-pixel cross-entropy, so expect a
teacher below DFAD's 0.517 mIoU. `:student` trains DeepLabV3-MobileNetV2 instead (the student
trained with labels); `:smoke` swaps in the small DeepLabV3 variants at 32 px (tests).
Runtime not measured here (no accelerator, no data).
"""

from kd_jax import config_utils

NUM_CLASSES = 13  # DFAD's NYUv2-13 (convert_nyuv2 maps unlabeled to the ignore index 255)


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, ("smoke", "student"), __file__)
    smoke = "smoke" in flags
    c = config_utils.base_config()
    c.method = "teacher"
    c.num_classes = NUM_CLASSES
    if "student" in flags:
        c.model.name = "deeplabv3_mobilenetv2_small" if smoke else "deeplabv3_mobilenetv2"
    else:
        c.model.name = "deeplabv3_resnet_small" if smoke else "deeplabv3_resnet50"
    c.teacher.model = ""
    # DFAD normalises with mean = std = 0.5; ImageNet's statistics here, the pool's own domain
    # (any fixed choice serves a teacher trained here, see odsd_nyuv2.py for a converted one).
    c.data.image_size, c.data.channels, c.data.normalization = 128, 3, "imagenet"
    c.data.augment = "crop_flip"
    c.data.eval_size = 0  # the whole (256 px shorter side) test image
    c.data.target.source, c.data.target.task = "npz", "segmentation"
    c.data.target.path = ""  # required: DIR/nyuv2_{split}.npz
    c.data.target.train_split, c.data.target.eval_split = "train", "test"
    c.batch_size = 16
    c.eval_batch_size = 128
    c.num_steps = 200 * -(-795 // c.batch_size)  # 200 epochs of DFAD's 50 batches
    c.optimizer.update(
        name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4, schedule="step", decay_at=(0.5,)
    )
    c.log_every, c.eval_every, c.checkpoint_every = 100, 1000, 1000
    if smoke:  # tiny models and images so a CPU compiles it in seconds
        c.data.image_size = 32
        c.data.shuffle_buffer = 64
        c.data.target.max_eval_examples = 16
        c.batch_size, c.eval_batch_size, c.num_steps = 8, 16, 2
        c.log_every = c.eval_every = c.checkpoint_every = 2
    return c
