"""SCKD (or UNO) novel class discovery on the offline MNIST-5k benchmark (no download).

    python -m kd_jax.main --config=configs/sckd_mnist.py --workdir=/tmp/kd/sckd_mnist
    python -m kd_jax.main --config=configs/sckd_mnist.py:uno --workdir=/tmp/kd/uno_mnist

Digits 0–4 are known (labeled), 5–9 novel (unlabeled). LeNet-5 backbone (84-d features).
SCKD is the paper's replica mechanism (`sckd.variant=replica`, α = β = 0.1);
`--config.sckd.variant=relations` runs the earlier relation-based reconstruction.
Stage 1 (`ncd_pretrain`, supervised on 0–4) is trained into <workdir>/pretrain first unless
`--config.ncd.pretrain.workdir` names a finished `:pretrain` run. Runtime: under 15 minutes on 2 CPU
cores, stage 1 included. Arguments: `uno` (the UNO base: no SCKD terms), `pretrain` (stage 1
only), `smoke` (seconds; tests).
"""

from kd_jax import config_utils
from kd_jax.methods import sckd


def get_config(arg=None):
    flags = config_utils.parse_arg(arg, config_utils.NCD_ARGS, __file__)
    return config_utils.ncd_stages(lambda stage: _config(stage, "smoke" in flags), flags, __file__)


def _config(stage, smoke):
    c = config_utils.base_config()
    c.update(sckd.default_config(num_known=5, num_novel=5))
    c.num_classes = 10
    c.model.name = "lenet5"
    c.data.image_size, c.data.channels, c.data.normalization = 32, 1, "mnist"
    c.data.augment = "crop"
    c.data.target.source = "offline_mnist"
    c.ncd.hidden_dim, c.ncd.proj_dim = 256, 64
    c.eval_batch_size = 1000
    # Relations variant: λ_SMI = λ_SC = 0.1 (the low end of the paper's sweep): at λ = 1 the
    # instance-level InfoNCE of L_SMI overrides the clustering objective on this benchmark
    # (known-class accuracy falls to chance; see benchmarks/results/offline_sckd.md).
    c.sckd.lambda_smi, c.sckd.lambda_sc = 0.1, 0.1
    if stage == "pretrain":
        c.batch_size, c.num_steps = 128, 300
        c.optimizer.update(lr=0.05, weight_decay=5e-4, warmup_steps=20)
        c.log_every, c.eval_every, c.checkpoint_every = 50, 300, 300
        if smoke:
            c.batch_size, c.num_steps = 64, 40
            c.log_every, c.eval_every, c.checkpoint_every = 20, 40, 40
        return c
    c.batch_size, c.num_steps = 128, 300
    c.optimizer.update(lr=0.05, weight_decay=1.5e-4, warmup_steps=20, end_lr=1e-4)
    c.sckd.ramp_steps = 30
    c.log_every, c.eval_every, c.checkpoint_every = 50, 300, 300
    if smoke:
        c.ncd.num_heads, c.ncd.hidden_dim, c.ncd.proj_dim = 2, 64, 32
        c.batch_size, c.num_steps = 64, 150
        c.sckd.ramp_steps = 15
        c.optimizer.warmup_steps = 5
        c.log_every, c.eval_every, c.checkpoint_every = 50, 150, 150
    return c
