"""LeNet-5 teacher on the offline MNIST-5k train split (4,000 real digits; no download).

    python -m kd_jax.main --config=configs/teacher_mnist.py --workdir=/tmp/kd/teacher_mnist

About 2 minutes on 2 idle CPU cores (124 s measured). `:smoke` shrinks it to seconds (tests:
LeNet-5 at ~0.95). `:half` trains LeNet-5-half instead (the "student trained with data"
reference). `:wrn` trains WRN-10-1 (the BatchNorm pair's teacher; 98.1 % at seed 0; `wrn,half`:
WRN-10-1-half); kd_jax/assets/teachers/mnist5k_wrn10_1 is that run, exported with
`python -m kd_jax.tools.export_teacher <workdir> <out>`.
"""

from kd_jax import config_utils


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, ("smoke", "half", "wrn"), __file__)
    c = config_utils.base_config()
    c.method = "teacher"
    c.model.name = "lenet5_half" if "half" in flags else "lenet5"
    if "wrn" in flags:
        c.model.name = "wrn10_1_half" if "half" in flags else "wrn10_1"
    c.teacher.model = ""
    c.data.image_size, c.data.channels, c.data.normalization = 32, 1, "mnist"
    c.data.augment = "crop"
    c.data.target.source = "offline_mnist"
    c.batch_size = 128
    c.num_steps = 1500
    c.optimizer.lr = 0.05
    c.log_every, c.eval_every, c.checkpoint_every = 100, 500, 500
    if "smoke" in flags:
        # 300 steps: a usable teacher (~0.95) in well under a minute, for the student smokes.
        c.batch_size, c.num_steps = 64, 300
        c.log_every, c.eval_every, c.checkpoint_every = 50, 300, 300
    return c
