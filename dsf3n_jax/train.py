"""Training and evaluation: config in, checkpoints, metrics and results out.

The public names of ``dsf3n_jax.training``, in one namespace:

- ``training.state``: ``TrainState``, ``model_config``, ``build_model``,
  ``build_optimizer`` (``learning_rate_schedule``, ``scale_by_adam``),
  ``init_state`` (``make_init_fn``: compiled once for every seed).
- ``training.steps``: the per-device ``train_step`` and its mapped forms
  (``make_train_step``, ``make_train_epoch``), ``run_steps`` (a streamed
  epoch), ``make_embed_fn``,
  ``embed_split``, ``evaluate``.
- ``training.run``: ``load_data``, ``make_mesh``, the checks before a run.
- ``training.loop``: ``train_and_evaluate``.
- ``training.workdir``: the lock, ``config.json``, ``results.json``, metrics,
  ``format_results`` (the final table).
- ``training.restore``: ``restore_model``, ``save_variables_as_run``,
  ``default_config``.
- ``training.seeds`` (not re-exported): several seeds of one config trained
  together as one vmapped program (``train_seeds``, ``evaluate_seeds``).
"""

from dsf3n_jax.config_schema import SELECTION_METRICS
from dsf3n_jax.mesh import DATA_AXIS as AXIS
from dsf3n_jax.training.loop import train_and_evaluate
from dsf3n_jax.training.restore import default_config, restore_model, save_variables_as_run
from dsf3n_jax.training.run import feature_stats, load_data, make_mesh, resolve_on_device
from dsf3n_jax.training.state import (
    MODEL_FIELDS,
    TrainState,
    build_model,
    build_optimizer,
    init_state,
    learning_rate_schedule,
    make_init_fn,
    model_config,
    scale_by_adam,
)
from dsf3n_jax.training.steps import (
    EMBED_KEYS,
    PROTOCOL_KEYS,
    embed_split,
    evaluate,
    make_embed_fn,
    make_train_epoch,
    make_train_step,
    per_device_step,
    run_steps,
    train_step,
)
from dsf3n_jax.training.workdir import format_results, has_data

__all__ = [
    "AXIS", "EMBED_KEYS", "MODEL_FIELDS", "PROTOCOL_KEYS", "SELECTION_METRICS", "TrainState",
    "build_model", "build_optimizer", "default_config", "embed_split", "evaluate", "feature_stats",
    "format_results", "has_data",
    "init_state", "learning_rate_schedule", "load_data", "make_embed_fn", "make_init_fn",
    "make_mesh", "make_train_epoch", "make_train_step", "model_config", "per_device_step",
    "resolve_on_device", "restore_model", "run_steps", "save_variables_as_run", "scale_by_adam",
    "train_and_evaluate", "train_step",
]
