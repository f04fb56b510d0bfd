"""Hinton KD from a frozen teacher: the baseline every data-free paper compares with.

The transfer set is chosen by `config.data.transfer`: the original training images *without
labels* (the upper bound), the whole open-world pool, or a random pool subset of N images.
"""

from __future__ import annotations

import jax

from kd_jax import losses, pool
from kd_jax.data import pipeline
from kd_jax.methods.base import Method


class KD(Method):
    name = "kd"

    def prepare(self):
        transfer = self.config.data.transfer
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
            self.config.data.transfer,
            teacher_model=self.teacher_model,
            teacher_vars=self.teacher_vars,
            domain=self.domain,
            num_classes=self.config.num_classes,
            batch_size=512,
        )

    def transfer_source(self):
        transfer = self.config.data.transfer
        if transfer.source == "original":
            target = self.config.data.target
            return pipeline.open_source(
                target, target.train_split, jax.process_index(), jax.process_count()
            )
        return pool.open_transfer_set(
            transfer, self.keep_ids, jax.process_index(), jax.process_count()
        )

    def results(self, state) -> dict:
        return {"selection": self.report} if self.report else {}

    def loss(self, params, batch_stats, batch, rng, teacher_vars, step):
        t_logits, _ = self.teacher_apply(teacher_vars, batch["image"])
        (s_logits, _), new_stats = self.student_apply(
            params, batch_stats, batch["image"], True, rng=rng
        )
        kd = losses.kd_loss(s_logits, t_logits, temperature=self.config.kd.temperature)
        agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).mean()
        return kd, ({"model": new_stats}, {"kd": kd, "teacher_agreement": agree})
