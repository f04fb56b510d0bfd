"""kd_jax: knowledge distillation without the original training data, in JAX/Flax.

`from kd_jax import losses, sampling` gives the pure, arrays-in/arrays-out notebook API; it
imports neither TensorFlow nor Flax. The training program is `python -m kd_jax.main`.
"""

__version__ = "0.1.0"
