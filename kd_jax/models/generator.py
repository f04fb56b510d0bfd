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
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from kd_jax.models.layers import batch_norm, conv2d, conv_options, linear


def _upsample2(x):
    """`F.interpolate(x, scale_factor=2)` (nearest) on NHWC."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


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
        x = _upsample2(x)
        x = conv2d(
            c,
            3,
            in_features=c,
            padding=1,
            use_bias=True,
            dtype=self.dtype,
            **conv_options(self),
            name="conv1",
        )(x)
        x = nn.leaky_relu(batch_norm(train, dtype=self.dtype, name="bn1")(x), 0.2)
        x = _upsample2(x)
        x = conv2d(
            self.ngf,
            3,
            in_features=c,
            padding=1,
            use_bias=True,
            dtype=self.dtype,
            **conv_options(self),
            name="conv2",
        )(x)
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
