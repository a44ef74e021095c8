"""Command line: ``python -m dsf3n_jax.main --config=configs/synthetic.py --workdir=DIR``.

Every config field can be overridden: ``--config.optim.lr=3e-4``. Multi-host
flags (``--coordinator_address``, ``--num_processes``, ``--process_id``)
override ``config.distributed``.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training configuration file.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Before jax is used: quieter logs and (multi-host) the distributed runtime.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from dsf3n_jax import distributed, train

  if not FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # progress goes to the console; libraries stay quiet
  config = FLAGS.config
  if str(config.model.dtype) == "float64":  # float64 end to end: parameters, optimiser, loss
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_enable_x64", True)
  distributed.initialize(config.distributed, coordinator_address=FLAGS.coordinator_address,
                         num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  results = train.train_and_evaluate(config, FLAGS.workdir)
  if distributed.is_main_process():
    print(train.format_results(results))
    print(f"results: {os.path.join(FLAGS.workdir, 'results.json')}")
  logging.flush()


def run():
  """Console entry point."""
  sys.path.insert(0, os.getcwd())  # so configs can `from configs import default`
  app.run(main)


if __name__ == "__main__":
  run()
