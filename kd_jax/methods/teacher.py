"""Supervised training (cross-entropy on the labeled target set): the teachers every KD method
starts from, and the "student trained with data" reference. Segmentation
(`data.target.task`): per-pixel cross-entropy, ignore-index pixels left out."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kd_jax import losses
from kd_jax.data import pipeline
from kd_jax.methods.base import Method


class Teacher(Method):
    name = "teacher"
    uses_teacher = False

    def transfer_source(self):
        target = self.config.data.target
        return pipeline.open_source(
            target, target.train_split, jax.process_index(), jax.process_count()
        )

    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        (logits, _), new_stats = self.student_apply(
            params, batch_stats, batch["image"], train=True, rng=rng
        )
        smoothing = self.config.get("label_smoothing", 0.0)
        if self.segmentation:  # per-pixel CE, ignore-index pixels left out
            labels = batch["label"]
            loss = losses.pixel_cross_entropy(logits, labels, label_smoothing=smoothing)
            valid = labels != pipeline.IGNORE_INDEX
            hits = jnp.sum((logits.argmax(-1) == labels) & valid) / jnp.maximum(valid.sum(), 1)
            return loss, ({"model": new_stats}, {"ce": loss, "train_pixel_accuracy": hits})
        targets = optax.smooth_labels(jax.nn.one_hot(batch["label"], logits.shape[-1]), smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        accuracy = (logits.argmax(-1) == batch["label"]).mean()
        return loss, ({"model": new_stats}, {"ce": loss, "train_accuracy": accuracy})
