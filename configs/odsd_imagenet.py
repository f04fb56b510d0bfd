"""ODSD on ImageNet with a Places365 open-world pool (TFRecord shards): ResNet-50 -> student.

    python -m kd_jax.main --config=configs/odsd_imagenet.py:r18 \
        --config.teacher.workdir=gs://.../resnet50_torchvision \
        --config.data.transfer.pattern='gs://.../places365/pool-*.tfrecord' \
        --config.data.target.data_dir=gs://.../tensorflow_datasets \
        --workdir=gs://.../odsd_imagenet_r50_r18

Students (argument): r18 (ResNet-18, default), mbv2 (MobileNetV2), r50 (ResNet-50). All three
keys above are required (nothing here can train an ImageNet teacher or fetch the data); run
without them, the config stops at once listing every missing one with the command that makes
it. The teacher is a ResNet-50 workdir, e.g. torchvision's weights converted:

    python -c "import torch, torchvision; torch.save(torchvision.models.resnet50(weights='IMAGENET1K_V1').state_dict(), 'resnet50.pth')"
    python -m kd_jax.tools.convert_torch --arch=resnet50 --num_classes=1000 --src=resnet50.pth --out=/ckpt/resnet50_torchvision

The target (evaluation only) is TFDS imagenet2012 (validation split; `tfds build imagenet2012
--manual_dir=DIR` with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in DIR). Write the
pool with `python -m kd_jax.data.make_shards --src=PLACES365_TRAIN_DIR --out=DIR
--num_shards=256` (Places365-standard train, 1.8M images). APS samples N = 300,000 images
(per class 300), the student trains 100 epochs over them with cosine SGD 0.1 (batch 256, wd
1e-4), RandomResizedCrop(224) + flip, eval resize 1/0.875 + centre crop, τ = 4. The teacher
pass over 1.8M images is about 10 minutes on a v4-32; training about 12 h for ResNet-50 ->
ResNet-18 on a v4-32.

`,smoke` (tests, CPU): ResNet-50 at 224 px (and even ResNet-18 at 64 px: minutes per compile
on a loaded 2-core machine) is too slow to compile on a CPU, so smoke swaps in tiny WRN-16-1
teacher (trained for 2 steps into <workdir>/teacher) and student at 32 px, 10 classes of the
(mock) imagenet2012, N = 32, 2 steps — the same code path otherwise (inception crop, eval crop
0.875, ImageNet normalisation, TFDS target, pool shards, BatchNorm diagnostics).
"""

from kd_jax import config_utils
from kd_jax.methods import odsd

STUDENTS = {"r18": "resnet18", "mbv2": "mobilenet_v2", "r50": "resnet50"}


def _data(c, image_size):
    c.data.image_size, c.data.channels, c.data.normalization = image_size, 3, "imagenet"
    c.data.eval_crop = 0.875
    c.data.augment = "inception"
    c.data.shuffle_buffer = 50000
    c.data.target.source, c.data.target.name = "tfds", "imagenet2012"
    c.data.target.train_split, c.data.target.eval_split = "train", "validation"


def get_config(arg="r18"):
    flags = config_utils.parse_arg(arg, tuple(STUDENTS) + ("smoke",), __file__)
    chosen = [f for f in flags if f in STUDENTS]
    if len(chosen) > 1:
        raise ValueError(f"odsd_imagenet.py: pick one student of {sorted(STUDENTS)}")
    c = config_utils.base_config()
    c.method = "odsd"
    c.num_classes = 1000
    c.model.name = STUDENTS[chosen[0] if chosen else "r18"]
    c.teacher.model = "resnet50"
    _data(c, 224)
    c.data.transfer.source = "shards"
    c.odsd = odsd.default_config()
    c.odsd.aps.size = 300000
    c.odsd.aps.score_batch_size = 1024
    c.batch_size, c.eval_batch_size = 256, 500
    c.num_steps = 100 * c.odsd.aps.size // c.batch_size
    c.optimizer.lr, c.optimizer.momentum, c.optimizer.weight_decay = 0.1, 0.9, 1e-4
    c.optimizer.schedule = "cosine"
    c.kd.temperature = 4.0
    c.log_every, c.eval_every, c.checkpoint_every = 100, 5000, 2000
    if "smoke" in flags:
        c.num_classes = 10
        c.model.name = c.teacher.model = "wrn16_1"
        _data(c, 32)
        c.data.shuffle_buffer = 64
        t = config_utils.base_config()  # a 2-step teacher so the whole path runs on mock data
        t.method, t.model.name, t.num_classes = "teacher", "wrn16_1", 10
        t.data = c.data.copy_and_resolve_references()
        t.batch_size, t.eval_batch_size, t.num_steps = 16, 16, 2
        t.data.target.max_eval_examples = 16
        t.log_every = t.eval_every = t.checkpoint_every = 2
        c.teacher.train = t
        c.odsd.aps.size, c.odsd.aps.score_batch_size = 32, 32
        c.odsd.diagnostics.bn_images = 32
        c.batch_size, c.eval_batch_size, c.num_steps = 16, 16, 2
        c.data.target.max_eval_examples = 16
        c.log_every = c.eval_every = c.checkpoint_every = 2
    return c
