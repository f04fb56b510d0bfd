"""Vision Transformers ViT-B/16 and ViT-S/16, equal to timm's `vit_base_patch16_224` /
`vit_small_patch16_224` and to DINO's `vit_base` / `vit_small` (facebookresearch/dino
`vision_transformer.py`): class token, learned position embeddings, pre-LN blocks, LayerNorm eps
1e-6, exact (erf) GELU, fused qkv with bias, no dropout; `head` on the class token after the final
LayerNorm. `num_classes=0` drops the head (logits = pre_logits), like DINO's `head = Identity`.

Module names mirror timm/DINO's state_dict with `.<digit>` folded into the parent name:
`patch_embed/proj` (16×16 stride-16 conv, HWIO), `cls_token` [1,1,D], `pos_embed` [1,1+N,D],
`blocks_{i}/{norm1, attn/qkv, attn/proj, norm2, mlp/fc1, mlp/fc2}`, `norm`, `head`.
The fused `qkv` output is laid out (3, heads, head_dim) like PyTorch's, so `qkv.weight.T` maps
directly. Patch tokens are the conv output flattened row-major over (h, w), as PyTorch's
`flatten(2).transpose(1, 2)`.

Init as timm: Linear trunc-normal(0.02) bias 0, pos_embed trunc-normal(0.02), cls_token
N(0, 1e-6²), patch conv PyTorch default, LayerNorm 1/0.

Parameter counts (1000 classes): vit_b16 86,567,656; vit_s16 22,050,664.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.layers import at_least_float32, conv2d, conv_options, normal_init

_trunc02 = nn.initializers.truncated_normal(stddev=0.02)


def _dense(features, dtype, name):
    return nn.Dense(
        features,
        kernel_init=_trunc02,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )


def _layer_norm(dtype, name):
    return nn.LayerNorm(epsilon=1e-6, dtype=dtype, param_dtype=jnp.float32, name=name)


class PatchEmbed(nn.Module):
    embed_dim: int
    patch_size: int
    dtype: Any = jnp.float32
    conv: str = "auto"
    conv_groups: int = 1

    @nn.compact
    def __call__(self, x):
        p = self.patch_size
        x = conv2d(
            self.embed_dim,
            p,
            in_features=x.shape[-1],
            stride=p,
            use_bias=True,
            dtype=self.dtype,
            **conv_options(self),
            name="proj",
        )(x)
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d)


class Attention(nn.Module):
    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        hd = d // self.num_heads
        qkv = _dense(3 * d, self.dtype, "qkv")(x).reshape(b, n, 3, self.num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, heads, hd]
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * (hd**-0.5)
        attn = jax.nn.softmax(at_least_float32(logits), axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, d)
        return _dense(d, self.dtype, "proj")(out)


class Mlp(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = _dense(self.hidden, self.dtype, "fc1")(x)
        x = nn.gelu(x, approximate=False)
        return _dense(d, self.dtype, "fc2")(x)


class Block(nn.Module):
    num_heads: int
    mlp_hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = x + Attention(self.num_heads, dtype=self.dtype, name="attn")(
            _layer_norm(self.dtype, "norm1")(x)
        )
        x = x + Mlp(self.mlp_hidden, dtype=self.dtype, name="mlp")(
            _layer_norm(self.dtype, "norm2")(x)
        )
        return x


class VisionTransformer(nn.Module):
    """Taps: `tokens` [B, 1+N, D] (after the final LayerNorm), `pre_logits` [B, D] (its class
    token). The position embedding is sized for `img_size`; another input size is an error."""

    num_classes: int = 1000
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    dtype: Any = jnp.float32
    conv: str = "auto"  # convolution algorithm (kd_jax.models.cpu_conv)
    conv_groups: int = 1  # data-parallel shards of the batch

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BatchNorm; dropout / drop-path are 0 as in timm's defaults
        x = jnp.asarray(x, self.dtype)
        if x.shape[1] != self.img_size or x.shape[2] != self.img_size:
            raise ValueError(
                f"VisionTransformer built for {self.img_size}x{self.img_size} inputs got "
                f"{x.shape[1]}x{x.shape[2]}; create it with img_size={x.shape[1]}"
            )
        d = self.embed_dim
        x = PatchEmbed(
            d, self.patch_size, dtype=self.dtype, **conv_options(self), name="patch_embed"
        )(x)
        b, n, _ = x.shape
        cls = self.param("cls_token", normal_init(1e-6), (1, 1, d), jnp.float32)
        pos = self.param("pos_embed", _trunc02, (1, 1 + n, d), jnp.float32)
        x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, d)), x], axis=1)
        x = x + pos.astype(self.dtype)
        for i in range(self.depth):
            x = Block(
                self.num_heads, int(d * self.mlp_ratio), dtype=self.dtype, name=f"blocks_{i}"
            )(x)
        x = _layer_norm(self.dtype, "norm")(x)
        feats = {"tokens": x, "pre_logits": x[:, 0]}
        if self.num_classes > 0:
            logits = _dense(self.num_classes, self.dtype, "head")(x[:, 0])
        else:
            logits = x[:, 0]
        return at_least_float32(logits), feats


def vit_b16(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs) -> VisionTransformer:
    """ViT-B/16: 768 d, 12 layers, 12 heads, MLP 3072 (keyword arguments override them)."""
    kwargs = {"embed_dim": 768, "depth": 12, "num_heads": 12, **kwargs}
    return VisionTransformer(num_classes=num_classes, dtype=dtype, **kwargs)


def vit_s16(num_classes: int = 1000, dtype: Any = jnp.float32, **kwargs) -> VisionTransformer:
    """ViT-S/16: 384 d, 12 layers, 6 heads, MLP 1536 (keyword arguments override them)."""
    kwargs = {"embed_dim": 384, "depth": 12, "num_heads": 6, **kwargs}
    return VisionTransformer(num_classes=num_classes, dtype=dtype, **kwargs)
