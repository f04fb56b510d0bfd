"""Trainable heads beside a student (used in training only, never at test time)."""

from __future__ import annotations

import flax.linen as nn

from kd_jax.models.layers import at_least_float32


class Projector(nn.Module):
    """Bias-free linear map of student features to `features` channels (the teacher's width):
    a Dense on [B, D] features, a 1×1 convolution on NHWC taps. `dense_name` names the Dense
    (ODSD's checkpoints call it `proj`, EIKD's `dense`)."""

    features: int
    dense_name: str = "dense"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        if x.ndim == 4:
            return nn.Conv(self.features, (1, 1), use_bias=False, name="conv")(x)
        return nn.Dense(self.features, use_bias=False, name=self.dense_name)(x)


class MLPHead(nn.Module):
    """Dense -> [BatchNorm] -> ReLU -> Dense on float32 (or wider) features: SimCLR's 2-layer
    projection head (ODSD's L_SR) or, with `batch_norm`, UNO's projector (PyTorch's BatchNorm
    defaults: momentum 0.1, eps 1e-5)."""

    hidden: int
    features: int
    batch_norm: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(self.hidden, name="fc1")(at_least_float32(x))
        if self.batch_norm:
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn")(
                x
            )
        return nn.Dense(self.features, name="fc2")(nn.relu(x))
