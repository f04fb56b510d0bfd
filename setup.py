"""kd_jax: data-free knowledge distillation in JAX (metadata lives in setup.cfg)."""

import setuptools

setuptools.setup()
