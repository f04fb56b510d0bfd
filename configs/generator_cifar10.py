"""Generator baselines (DAFL, DFAD, DeepInversion-style) on CIFAR10: a generator trained
against the frozen teacher replaces the transfer set.

    python -m kd_jax.main --config=configs/generator_cifar10.py:dafl,r34_r18 \
        --config.teacher.workdir=gs://.../teacher_cifar10 --workdir=gs://.../dafl_cifar10

Arguments: one preset (`dafl` default, `dfad`, `deepinv`), one pair (r34_r18 default,
vgg11_r18, wrn40_2_wrn16_1, wrn40_2_wrn40_1, wrn40_2_wrn16_2), `smoke` (tests: 2 steps).
Settings per preset and their sources: kd_jax/methods/generator.py `cifar_config` (DAFL
README's CIFAR commands; DFAD_cifar.py; Fast-Datafree's deepinv weights). Runtime: not measured
on an accelerator here; on 2 CPU cores these runs are out of reach (a DAFL step of batch 1024 with
the ngf-64 generator is ~0.4 TFLOP for the generator alone). Without
`--config.teacher.workdir` the pair's teacher is trained first with teacher_cifar10.py; TFDS
`cifar10` must be prepared (only its test split is read by this method).
"""

from kd_jax.methods import generator


def get_config(arg="dafl,r34_r18"):
    return generator.cifar_config(arg, __file__, "cifar10")
