"""ODSD on the offline benchmark (no download): LeNet-5 -> LeNet-5-half, or with `wrn` the
BatchNorm pair WRN-10-1 -> WRN-10-1-half (the README demo).

    python -m kd_jax.main --config=configs/odsd_mnist.py:wrn --workdir=/tmp/kd_jax_demo
    python -m kd_jax.main --config=configs/odsd_mnist.py --workdir=/tmp/kd/odsd_mnist

`wrn` (the demo): the bundled WRN-10-1 teacher (kd_jax/assets/teachers/mnist5k_wrn10_1, 98.1 %;
`configs/teacher_mnist.py:wrn` remakes it), 400 steps of batch 128; about 3-4 minutes on 2 idle
CPU cores (README, "Try it"). The run ends with a summary beside the same pair's KD baselines
(`c.reference`, from `benchmarks/offline_odsd.py --pair wrn`).
Without `wrn` the LeNet-5 teacher is trained first into <workdir>/teacher (124 s on 2 idle CPU
cores) unless `--config.teacher.workdir` names a finished teacher run; 1,000 steps of batch 128,
about 4-5 minutes with the teacher. The offline tables run 400 steps (`--config.num_steps=400`).
Either way APS samples N = 4,000 images (the size of the original train split) from the bundled
9,797-image open-world pool (printed and handwritten digits, letters, photo crops), and the
student learns from them with LNR + L_TR + L_SR; it is evaluated on the held-out MNIST-5k test
split (1,000 digits). Outputs in the workdir: results.json (accuracy, selection diagnostics),
sampling.png, selection_quality.png (every selection score's digit share as N varies; a second
teacher pass over the pool), selection.npz, metrics.jsonl, TensorBoard events.
`--config.odsd.score=knn` (or energy | mahalanobis | bn) ranks the pool by an OOD score instead
of APS (README, "Selection quality").

Arguments (comma-separated): `wrn` (above), `smoke` (a short run for tests: 300-step teacher,
N = 1,000, 150 student steps of 64), or one ablation of the offline table: `no_aps` (random
subset of N), `no_lnr` (plain KD targets), `no_tr` (λ_TR = 0), `no_sr` (λ_SR = 0), `dfnd`
(DFND's global confidence top-N: α = 0, gate none, no balancing, KD loss only), `all` (the whole
pool); or `refresh`: the adaptive refresh of §1F every 2 epochs over D (re-ranks the APS
candidates by the student's disagreement with the teacher).
Every other switch is `--config.odsd.<part>.<key>` (see kd_jax/methods/odsd.py).
"""

from kd_jax import config_utils
from kd_jax.methods import odsd

# The same pair and budget in README's "Try it" table (benchmarks/offline_odsd.py --pair wrn
# --steps 400, seeds 0-2, mean ± std): what this run's student is to be read against.
WRN_REFERENCE = (
    "KD on a random 4,000-image pool subset 36.0 ± 7.6 %, KD on the whole pool 33.7 ± 9.0 %, "
    "ODSD 82.9 ± 0.9 % (README, Try it: 400 steps, 3 seeds)"
)


def get_config(arg=None):
    flags = config_utils.parse_arg(
        arg,
        ("smoke", "wrn", "no_aps", "no_lnr", "no_tr", "no_sr", "dfnd", "all", "refresh"),
        __file__,
    )
    c = config_utils.offline_student(__file__, "odsd", smoke="smoke" in flags)
    c.odsd = odsd.default_config()
    c.odsd.aps.size = 4000  # N = the original train-set size (400 per class)
    c.batch_size = 128
    c.num_steps = 1000  # the demo's budget; the offline table overrides it (400)
    # The optimiser of configs/kd_mnist.py, so every row of the offline table differs only in
    # data and losses; the gradient clip keeps LNR's near-one-hot targets (scaled by τ²) from
    # killing the BatchNorm-free student at this learning rate.
    c.optimizer.lr = 0.05
    c.optimizer.warmup_steps = 100
    c.optimizer.grad_clip = 5.0
    c.log_every, c.eval_every, c.checkpoint_every = 100, 500, 500
    if "no_aps" in flags:
        c.odsd.aps.selection = "random"
    if "all" in flags:
        c.odsd.aps.selection = "all"
    if "refresh" in flags:
        c.odsd.aps.refresh_epochs = 2
    if "no_lnr" in flags:
        c.odsd.lnr.rule = "none"
    if "no_tr" in flags:
        c.odsd.tr.weight = 0.0
    if "no_sr" in flags:
        c.odsd.sr.weight = 0.0
    if "dfnd" in flags:
        c.odsd.aps.alpha, c.odsd.aps.gate, c.odsd.aps.balance = 0.0, "none", False
        c.odsd.lnr.rule, c.odsd.tr.weight, c.odsd.sr.weight = "none", 0.0, 0.0
    if "wrn" in flags:
        config_utils.offline_wrn_pair(c, __file__, smoke="smoke" in flags)
        c.num_steps = 400  # the budget of the README's WRN table
        c.log_every, c.eval_every, c.checkpoint_every = 50, 200, 200
        c.reference = WRN_REFERENCE
    if "smoke" in flags:
        c.batch_size, c.num_steps = 64, 150
        c.optimizer.warmup_steps = 10
        c.odsd.aps.size = 1000
        # selection_quality.png costs a second pool pass; tests/test_selection_scores.py covers it
        c.odsd.diagnostics.quality_plot = False
        c.log_every, c.eval_every, c.checkpoint_every = 50, 150, 150
    return c
