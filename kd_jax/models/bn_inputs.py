"""The inputs of a model's BatchNorm layers, read without changing the model.

    outputs, taps = apply_with_bn_inputs(model, variables, x, train=False)
    # taps: [(path, input [B, ..., C], running mean [C], running var [C]), ...] in call order

Every `nn.BatchNorm.__call__` is intercepted (`flax.linen.intercept_methods`): its input and
its running statistics are recorded, and the call then runs unchanged, so parameter trees and
outputs are those of a plain `model.apply` (no `sow`, no extra collection). The recorded inputs
are traced values of the same forward pass: differentiable with respect to `x`, which is what
DeepInversion's BatchNorm-statistics loss needs (`kd_jax.losses.bn_statistics_loss`).
"""

from __future__ import annotations

import flax.linen as nn


def apply_with_bn_inputs(model: nn.Module, variables, x, **apply_kwargs):
    """`model.apply(variables, x, **apply_kwargs)` -> (its outputs, BatchNorm taps)."""
    taps = []

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, nn.BatchNorm) and context.method_name == "__call__":
            taps.append(
                (
                    "/".join(str(p) for p in module.scope.path),
                    args[0],
                    module.get_variable("batch_stats", "mean"),
                    module.get_variable("batch_stats", "var"),
                )
            )
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        outputs = model.apply(variables, x, **apply_kwargs)
    return outputs, taps
