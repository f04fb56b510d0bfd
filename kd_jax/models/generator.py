"""Image generators of generator-based data-free KD (z -> an image in the teacher's domain).

    gen = create_generator("dcgan", image_size=32, channels=1, latent_dim=100)
    variables = gen.init(key, jnp.zeros((2, 100)), train=False)
    images, updates = gen.apply(variables, z, train=True, mutable=["batch_stats"])

`dcgan`: the generator DAFL and DFAD share (DFAD `network/gan.py: GeneratorA`, DAFL's
`Generator` in DAFL-train.py; Fast-Datafree's `Generator` is the same shape):

    Linear(nz -> 2·ngf·(s/4)²) → BN → up ×2 (nearest) → conv3×3 2ngf→2ngf → BN → LeakyReLU 0.2
    → up ×2 → conv3×3 2ngf→ngf → BN → LeakyReLU 0.2 → conv3×3 ngf→C → tanh → BN (affine=False)

The last BatchNorm (no scale/bias) standardises every channel of the batch, so generated
images have the per-channel mean 0 / variance 1 of the teacher's normalised inputs (the
teacher's domain: `config.data.normalization` maps real images there). PyTorch default inits
and BatchNorm defaults (eps 1e-5; DAFL's `BatchNorm2d(C, 0.8)` passes 0.8 as eps by accident,
DFAD's uses the default). The generator is used in training mode (batch statistics) for every
image the student or the diagnostics see, as both reference codes do.

Each "up ×2 → conv3×3" pair is computed in its sub-pixel form (`UpsampleConv3x3`): one 2×2
convolution of the low-resolution map, 2.25× fewer multiplies, with the same variables and the
same output (up to float rounding) as the two layers written out.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.models import cpu_conv
from kd_jax.models.layers import (
    batch_norm,
    conv2d,
    conv_options,
    linear,
    torch_default_bias_init,
    torch_default_kernel_init,
)

# Along one axis, output pixel 2i + d of "nearest up x2, then a 3-tap kernel w (padding 1)" reads
# low-resolution pixels i-1, i, i (d = 0) or i, i, i+1 (d = 1): two taps, [w0, w1 + w2] at
# offsets (-1, 0) or [w0 + w1, w2] at (0, +1). SUBPIXEL_TAPS[d, a, k]: weight of w_k in tap a.
SUBPIXEL_TAPS = np.array([[[1, 0, 0], [0, 1, 1]], [[1, 1, 0], [0, 0, 1]]], np.float32)


def upsample2_conv3x3(x, kernel, conv_general_dilated=None):
    """`conv3x3(padding 1)(nearest_upsample_x2(x))` on NHWC, as one 2x2 convolution of the low-res
    `x` (padding 1, an (H+1)x(W+1) output) whose 4·C_out channels are the four output phases:
    phase (dh, dw) at low-res (i, j) lies at (i + dh, j + dw) of that output, because phase 1's
    taps start one pixel later. `kernel` [3, 3, C_in, C_out] (its taps are summed in the wider of its
    and x's dtype, then cast to x's); `conv_general_dilated`: None for XLA's, or a replacement with its
    signature (`cpu_conv.conv_function`)."""
    b, h, w, _ = x.shape
    out = kernel.shape[-1]
    wide = jnp.promote_types(kernel.dtype, x.dtype)  # bfloat16 activations: taps summed in f32
    taps = jnp.asarray(SUBPIXEL_TAPS, wide)
    phase_kernel = jnp.einsum("pak,qbl,klco->abcpqo", taps, taps, kernel.astype(wide))
    phase_kernel = phase_kernel.reshape(2, 2, kernel.shape[2], 4 * out).astype(x.dtype)
    conv = conv_general_dilated or jax.lax.conv_general_dilated
    y = conv(
        x,
        phase_kernel,
        (1, 1),
        ((1, 1), (1, 1)),
        dimension_numbers=jax.lax.conv_dimension_numbers(
            x.shape, phase_kernel.shape, ("NHWC", "HWIO", "NHWC")
        ),
    ).reshape(b, h + 1, w + 1, 2, 2, out)
    rows = [
        jnp.stack([y[:, dh : dh + h, dw : dw + w, dh, dw] for dw in (0, 1)], axis=3)
        for dh in (0, 1)
    ]
    return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, out)  # [b, h, dh, w, dw, o]


class UpsampleConv3x3(nn.Module):
    """Nearest upsampling x2 then `conv2d(features, 3, padding=1, use_bias=True)`, with that
    conv's variables (`kernel` [3, 3, C_in, C_out], `bias`, PyTorch's default init), computed by
    `upsample2_conv3x3`: 2.25x fewer multiplies and 9x smaller im2col patches than the two
    layers written out."""

    features: int
    in_features: int
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    @nn.compact
    def __call__(self, x):
        fan_in = 9 * self.in_features
        kernel = self.param(
            "kernel",
            torch_default_kernel_init,
            (3, 3, self.in_features, self.features),
            jnp.float32,
        )
        bias = self.param("bias", torch_default_bias_init(fan_in), (self.features,), jnp.float32)
        x = jnp.asarray(x, self.dtype)
        y = upsample2_conv3x3(x, kernel, cpu_conv.conv_function(self.conv, self.conv_groups))
        return y + bias.astype(self.dtype)


class DCGANGenerator(nn.Module):
    image_size: int = 32
    channels: int = 1
    latent_dim: int = 100
    ngf: int = 64
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    @nn.compact
    def __call__(self, z, train: bool = True):
        if self.image_size % 4:
            raise ValueError(
                f"dcgan generator: image_size {self.image_size} is not a multiple of 4"
            )
        s, c = self.image_size // 4, 2 * self.ngf
        x = jnp.asarray(z, self.dtype).reshape(z.shape[0], -1)
        x = linear(c * s * s, in_features=x.shape[-1], dtype=self.dtype, name="l1")(x)
        # PyTorch views [B, C·s·s] as NCHW: C is the slowest axis after the batch.
        x = x.reshape(x.shape[0], c, s, s).transpose(0, 2, 3, 1)
        x = batch_norm(train, dtype=self.dtype, name="bn0")(x)
        x = UpsampleConv3x3(c, c, self.dtype, **conv_options(self), name="conv1")(x)
        x = nn.leaky_relu(batch_norm(train, dtype=self.dtype, name="bn1")(x), 0.2)
        x = UpsampleConv3x3(self.ngf, c, self.dtype, **conv_options(self), name="conv2")(x)
        x = nn.leaky_relu(batch_norm(train, dtype=self.dtype, name="bn2")(x), 0.2)
        x = conv2d(
            self.channels,
            3,
            in_features=self.ngf,
            padding=1,
            use_bias=True,
            dtype=self.dtype,
            **conv_options(self),
            name="conv3",
        )(x)
        x = jnp.tanh(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            use_scale=False,
            use_bias=False,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            name="bn_out",
        )(x)
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))


_GENERATORS = {"dcgan": DCGANGenerator}


def list_generators() -> list[str]:
    return sorted(_GENERATORS)


def create_generator(
    name: str,
    image_size: int,
    channels: int,
    latent_dim: int,
    ngf: int = 64,
    dtype: Any = jnp.float32,
    conv: str = "auto",
    conv_groups: int = 1,
) -> nn.Module:
    """The registered generator `name` (config key `generator.model`); ValueError names the
    known ones."""
    if name not in _GENERATORS:
        raise ValueError(
            f"config.generator.model={name!r} is unknown; known generators: {list_generators()}"
        )
    return _GENERATORS[name](
        image_size=int(image_size),
        channels=int(channels),
        latent_dim=int(latent_dim),
        ngf=int(ngf),
        dtype=dtype,
        conv=conv,
        conv_groups=int(conv_groups),
    )
