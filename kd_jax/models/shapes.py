"""Feature shapes of a model, traced with `jax.eval_shape` (no parameters, no FLOPs)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def feature_shapes(model: nn.Module, image_size: int, channels: int) -> dict[str, tuple]:
    """{tap: shape of one image's feature} of `model` on `image_size`² × `channels` inputs,
    e.g. `pre_logits` (D,) and the NHWC stage outputs (H, W, C)."""
    x = jax.ShapeDtypeStruct((2, image_size, image_size, channels), jnp.float32)
    _, feats = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.PRNGKey(0), x, train=False)[0], x
    )
    return {name: tuple(f.shape[1:]) for name, f in feats.items()}
