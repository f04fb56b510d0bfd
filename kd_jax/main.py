"""`python -m kd_jax.main --config=configs/<name>.py[:arg] --workdir=DIR [--config.key=value]`.

Flags only; the stages are run by kd_jax/run.py, each through the loop in kd_jax/train.py. The config is locked, so a misspelt
`--config.key` fails at once with the key named.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/*.py[:arg]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and results are written.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    from kd_jax import prerequisites, run

    try:
        run.run(FLAGS.config, FLAGS.workdir)
    except prerequisites.MissingPrerequisites as e:  # one block, no traceback; exit status 1
        raise SystemExit(f"{config_flags.get_config_filename(FLAGS['config'])}: {e}") from None


if __name__ == "__main__":
    app.run(main)
