"""DFAD (generator maximises the student-teacher L1 logit gap; student minimises it)
LeNet-5 -> LeNet-5-half on the offline benchmark; `deepinv` (with `wrn`) adds DeepInversion's
BatchNorm-statistics matching and the one-hot term.

    python -m kd_jax.main --config=configs/dfad_mnist.py --workdir=/tmp/kd/dfad_mnist \
        --config.teacher.workdir=/tmp/kd/teacher_mnist
    python -m kd_jax.main --config=configs/dfad_mnist.py:wrn,deepinv --workdir=/tmp/kd/deepinv_wrn \
        --config.teacher.workdir=/tmp/kd/teacher_mnist_wrn

The teacher is trained first into <workdir>/teacher unless `--config.teacher.workdir` names a
finished configs/teacher_mnist.py run (of `--config.model.name=wrn10_1` for `wrn`).
Arguments: `wrn` (WRN-10-1 -> WRN-10-1-half), `deepinv` (needs `wrn`), `smoke` (tests).
Runtime: see the README section "Generator baselines" (measured there on 2 CPU cores).

Settings (DFAD, VainF/Data-Free-Adversarial-Distillation DFAD_mnist.py): 5 student updates
per generator update, each on fresh z; student SGD lr 0.01, momentum 0.9, weight decay 1e-4;
generator Adam lr 1e-3; nz 100; batch 512 (here 256), 40 epochs × 50 iterations there.
`deepinv`: Fast-Datafree scripts/deepinv_cifar.sh weights (bn 10, oh 1, adv 1, KD T = 20).
"""

from kd_jax import config_utils
from kd_jax.methods import generator


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, ("wrn", "deepinv", "smoke"), __file__)
    preset = "deepinv" if "deepinv" in flags else "dfad"
    c = generator.offline_config(__file__, preset, flags)
    c.batch_size = 128
    c.num_steps = 350
    c.generator.ngf = 16  # DFAD's 64, reduced for the CPU budget (see dafl_mnist.py)
    c.generator.s_steps = 5
    c.optimizer.update(lr=0.01, momentum=0.9, weight_decay=1e-4, schedule="cosine")
    c.generator.optimizer.lr = 1e-3
    if preset == "deepinv":
        c.kd.temperature = 20.0
    c.log_every, c.eval_every, c.checkpoint_every = 50, 200, 200
    if "smoke" in flags:
        c.batch_size, c.num_steps = 64, 20
        c.generator.ngf = 8
        c.generator.eval_images = 128
        c.log_every, c.eval_every, c.checkpoint_every = 10, 20, 10
    return c
