"""Hinton KD from a frozen teacher: the baseline every data-free paper compares with.

The transfer set is chosen by `config.data.transfer`: the original training images *without
labels* (the upper bound), the whole open-world pool, or a random pool subset of N images.
Segmentation (`data.target.task`): the same per pixel (τ² KL at every pixel, averaged), the
pool scored through `Method.pool_teacher_model`.
"""

from __future__ import annotations

import jax

from kd_jax import losses, pool
from kd_jax.data import pipeline
from kd_jax.methods.base import Method


class KD(Method):
    name = "kd"

    def prepare(self):
        transfer = self.transfer_spec
        self.keep_ids, self.report = None, {}
        if transfer.source == "original":
            return
        if transfer.subset == "random":
            size = int(transfer.subset_size)
            selection, self.report = pool.select_transfer_set(
                self.workdir,
                transfer,
                pool.random_rule(size, seed=self.config.seed),
                score_fn=self.score_pool,
                num_classes=self.config.num_classes,
                rule_name=f"random {size}",
                plot_title=f"KD transfer set (random {size})",
            )
            self.keep_ids = selection.ids
        elif transfer.subset != "all":
            raise ValueError(
                f"config.data.transfer.subset={transfer.subset!r}: the kd method "
                f"takes 'all' or 'random' (selection rules live in odsd / eikd)"
            )

    def score_pool(self) -> pool.PoolScores:
        """The teacher pass over the pool (for the report of a random subset)."""
        return pool.score_pool(
            self.workdir,
            self.transfer_spec,
            teacher_model=self.pool_teacher_model,
            teacher_vars=self.teacher_vars,
            domain=self.domain,
            num_classes=self.config.num_classes,
            batch_size=512,
        )

    def transfer_source(self):
        transfer = self.transfer_spec
        if transfer.source == "original":
            target = self.config.data.target
            return pipeline.open_source(
                target, target.train_split, jax.process_index(), jax.process_count()
            )
        return pool.open_transfer_set(
            transfer, self.keep_ids, jax.process_index(), jax.process_count()
        )

    def results(self, state) -> dict:
        out = {"selection": self.report} if self.report else {}
        if self.segmentation and self.teacher_info.get("miou") is not None:
            out["teacher_miou"] = self.teacher_info["miou"]
        return out

    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        t_logits, _ = self.teacher_apply(teacher_vars, batch["image"])
        (s_logits, _), new_stats = self.student_apply(
            params, batch_stats, batch["image"], True, rng=rng
        )
        tau = self.config.kd.temperature
        if self.segmentation:
            kd = losses.pixel_kd_loss(s_logits, t_logits, temperature=tau)
        else:
            kd = losses.kd_loss(s_logits, t_logits, temperature=tau)
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).mean()
        return kd, ({"model": new_stats}, {"kd": kd, "teacher_agreement": agree})
