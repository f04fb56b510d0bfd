"""One process of tests/test_multiprocess.py: a KD run through the real engine entry point.

Runs `kd_jax.train.train_and_evaluate` on configs/kd_mnist.py:smoke with a synthetic TFRecord
pool as the transfer set. The parent sets the environment (fake CPU device count, JAX_ENABLE_X64=1, and for
the distributed runs KD_JAX_DISTRIBUTED / KD_JAX_COORDINATOR / KD_JAX_NUM_PROCESSES /
KD_JAX_PROCESS_ID, exactly what launch/gpu.sh exports), so `parallel.maybe_initialize_distributed`
is exercised as on a pod.

Every process records its file-level share of the pool (all ids its reader yields) and every
host-local batch it trained on (images, labels, ids) into `--out`; the test replays those global
batches in one 8-device process. The hooks wrap the method's data functions only; the loop, the
step, the mesh and the checkpoints are the production code.
"""

from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True)
    p.add_argument("--teacher_workdir", required=True)
    p.add_argument("--pool_pattern", required=True)
    p.add_argument("--out", required=True, help="this process's record (.npz)")
    p.add_argument("--num_steps", type=int, default=4)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--model", default="lenet5_half")
    return p.parse_args(argv)


def make_config(args):
    from kd_jax import config_utils

    c = config_utils.load_config(os.path.join(ROOT, "configs", "kd_mnist.py"), "smoke")
    c.model.name = args.model
    c.teacher.workdir = args.teacher_workdir
    c.data.transfer.source = "shards"
    c.data.transfer.pattern = args.pool_pattern
    c.data.transfer.subset = "all"
    c.data.transfer.subset_size = 0
    c.data.target.max_eval_examples = 64
    c.batch_size = args.batch_size
    c.eval_batch_size = 64
    c.num_steps = args.num_steps
    c.log_every = c.eval_every = c.checkpoint_every = args.num_steps
    c.async_checkpoints = False
    c.dtype = "float64"  # compared with a 1-process run: float64 makes it decisive on any CPU
    return c


def main(argv=None):
    args = parse_args(argv)
    import jax
    import numpy as np

    from kd_jax import train
    from kd_jax.methods.kd import KD

    config = make_config(args)
    record = {"share_ids": [], "batches": []}

    original_source, original_batches = KD.transfer_source, KD.train_batches

    def transfer_source(self):
        ds, count = original_source(self)
        # The whole share this process's reader yields (ids only: cheap for a tiny pool).
        ids = [int(i) for i in ds.map(lambda e: e["id"]).as_numpy_iterator()]
        if len(ids) != count:
            raise AssertionError(f"share holds {len(ids)} ids but reports {count}")
        record["share_ids"] = ids
        return ds, count

    def train_batches(self, start_step):
        for local in original_batches(self, start_step):
            record["batches"].append({k: np.array(v) for k, v in local.items()})
            yield local

    KD.transfer_source, KD.train_batches = transfer_source, train_batches
    results = train.train_and_evaluate(config, args.workdir)
    print(
        f"[worker {jax.process_index()}/{jax.process_count()}] devices "
        f"{jax.local_device_count()}/{jax.device_count()} results {results.get('final_accuracy')}",
        flush=True,
    )
    b = record["batches"]
    np.savez(
        args.out,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        device_count=jax.device_count(),
        share_ids=np.asarray(record["share_ids"], np.int64),
        batch_ids=np.stack([x["id"] for x in b]),
        batch_labels=np.stack([x["label"] for x in b]),
        batch_images=np.stack([x["image"] for x in b]),
    )


if __name__ == "__main__":
    main()
