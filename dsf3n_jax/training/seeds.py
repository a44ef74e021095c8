"""Several seeds of one config trained together, as one compiled program.

The train states of K seeds are stacked (a leading axis of size K) and the
per-device ``train_step`` is ``jax.vmap``-ed over that axis inside the
data-parallel ``shard_map``: one compile serves every seed. Seed ``s`` is
initialised, shuffled and dropped out exactly as ``train_and_evaluate`` with
``config.seed = s`` (streamed batches), so the result equals training the seeds
one by one (``tests/test_seeds.py``, to 1e-5). ``config.seed`` itself is not
used.

  run, states, history = seeds.train_seeds(config, [0, 1, 2])
  metrics = seeds.evaluate_seeds(run, states, "test")  # one dict per seed

Nothing is written: this is for grids of short runs (``benchmarks/paper.py``),
not for runs that need checkpoints.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax import input_pipeline, losses
from dsf3n_jax.mesh import DATA_AXIS as AXIS
from dsf3n_jax.training import run as run_lib
from dsf3n_jax.training import steps as steps_lib
from dsf3n_jax.training.state import TrainState, make_init_fn

# The train-step metrics averaged per epoch in ``train_seeds``' history.
HISTORY_KEYS = ("loss", "id", "pair", "center")


def init_states(run: run_lib.Run, seeds: Sequence[int]) -> TrainState:
  """Each seed's initial state (as ``train_and_evaluate`` builds it, by the same compiled
  initialiser), stacked over seeds."""
  replicated = NamedSharding(run.mesh, P())
  init = make_init_fn(run.model, run.tx, num_classes=run.sources.num_classes,
                      loss_terms=run.config.loss.terms, sharding=replicated)
  return jax.jit(_stack, out_shardings=replicated)(*[init(int(seed)) for seed in seeds])


def _stack(*trees):
  """The trees' leaves stacked on a new leading (seed) axis."""
  return jax.tree.map(lambda *x: jnp.stack(x), *trees)


@jax.jit
def seed_state(states: TrainState, i: int) -> TrainState:
  """Seed ``i``'s state out of the stacked ones (one program for every ``i``, not an indexing
  op per leaf)."""
  return jax.tree.map(lambda x: x[i], states)


def make_seeds_step(step_fn: Callable, mesh: Mesh, *, num_shared: int = 0,
                    num_stacked: int = 0) -> Callable:
  """``(stacked states, stacked global batches, *stacked, *shared) -> (states, metrics)``.

  ``step_fn`` is a per-device step (``steps.per_device_step``); it is
  vmapped over the seed axis inside the ``data`` ``shard_map``, so its
  collectives still reduce over devices, per seed. Its ``num_stacked`` further
  arguments have the seed axis too (each member's hyper-parameters,
  ``steps.per_device_hyper_step``); the ``num_shared`` after them are the same for
  every seed and device.
  """
  in_axes = (0, 0) + (0,) * num_stacked + (None,) * num_shared
  mapped = jax.shard_map(jax.vmap(step_fn, in_axes=in_axes), mesh=mesh,
                         in_specs=(P(), P(None, AXIS)) + (P(),) * (num_stacked + num_shared),
                         out_specs=(P(), P()), check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))


class SeedBatches:
  """Each seed's train batches (its own ``TrainLoader`` order), stacked: ``(K, batch, ...)``."""

  def __init__(self, source, *, seeds: Sequence[int], global_batch_size: int, mesh: Mesh,
               shuffle: bool = True):
    self.loaders = [input_pipeline.TrainLoader(source, global_batch_size=global_batch_size,
                                               mesh=mesh, seed=int(s), shuffle=shuffle)
                    for s in seeds]
    self._stack = jax.jit(_stack, out_shardings=NamedSharding(mesh, P(None, AXIS)))

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    batches = [next(loader) for loader in self.loaders]
    return self._stack(*[{k: b[k] for k in ("visual", "audio", "label")} for b in batches])

  def close(self) -> None:
    for loader in self.loaders:
      loader.close()


def train_seeds(config: ml_collections.ConfigDict, seeds: Sequence[int], *,
                on_epoch: Callable[[int, dict[str, np.ndarray], float], None] | None = None,
                ) -> tuple[run_lib.Run, TrainState, list[dict[str, Any]]]:
  """Trains ``config`` for ``config.num_epochs`` epochs once per seed, all seeds at once.

  Returns the run's parts, the stacked final states and a history: per epoch,
  each seed's mean train loss parts (``HISTORY_KEYS``, lists of K floats) and
  the epoch's seconds. ``on_epoch(epoch, means, seconds)`` is called after each
  (1-based) epoch. A seed whose loss turns non-finite keeps training (its
  numbers are NaN); ``finite_seeds`` says which ended finite.
  """
  if not seeds or len(set(seeds)) != len(seeds):
    raise ValueError(f"seeds: expected distinct integers, got {list(seeds)}")
  return train_group([config] * len(seeds), seeds, on_epoch=on_epoch)


def program_key(config: ml_collections.ConfigDict) -> str:
  """What must be equal for configs to train as one program (``train_group``): the config
  without its hyper-parameters' values (``steps.hyper_params``) and seed, but with
  whether each is on (weight decay, a unimodal loss, partner dropout)."""
  c = json.loads(config.to_json_best_effort())
  c.pop("seed", None)
  for section, key in steps_lib.HYPER_FIELDS:
    value = c[section].pop(key, 0.0)
    if key != "lr":
      c[section][f"{key} > 0"] = bool(value and value > 0)
  c["loss"]["terms"] = sorted(c["loss"].get("terms", {}))
  c["loss"].pop("unimodal_terms", None)  # weights of some of loss.terms (config_check)
  return json.dumps(c, sort_keys=True)


def stacked_hyper_params(configs: Sequence[ml_collections.ConfigDict], mesh: Mesh):
  """Each config's ``steps.hyper_params`` as arrays stacked over the configs, replicated:
  the stacked argument of ``per_device_hyper_step`` under ``make_seeds_step``."""
  return jax.device_put(_stack(*[jax.tree.map(jnp.asarray, steps_lib.hyper_params(c))
                                 for c in configs]), NamedSharding(mesh, P()))


# What ``train_group``'s error names as the values a sweep traces.
HYPER_NAMES = tuple(f"{s}.{k}" for s, k in steps_lib.HYPER_FIELDS) + ("loss.terms.*",
                                                                         "loss.unimodal_terms.*")


def train_group(configs: Sequence[ml_collections.ConfigDict], seeds: Sequence[int], *,
                on_epoch: Callable[[int, dict[str, np.ndarray], float], None] | None = None,
                on_states: Callable[[int, TrainState], None] | None = None,
                run: run_lib.Run | None = None,
                ) -> tuple[run_lib.Run, TrainState, list[dict[str, Any]]]:
  """Trains member i, ``configs[i]`` with seed ``seeds[i]``, every member at once.

  The configs must differ only in their hyper-parameters (``steps.hyper_params``:
  learning rate, weight decay, partner dropout, input noise, the loss weights) and seed:
  ``program_key`` equal. Each member's values are stacked and traced, so one
  compiled step trains all of them, and member i ends as ``train_and_evaluate``
  would train ``configs[i]`` with ``config.seed = seeds[i]`` (streamed batches).
  Returns as ``train_seeds``; ``on_states(epoch, states)`` is called after each epoch
  with the stacked states (for evaluations). ``run``: ``run.prepare_run(configs[0])``
  when the caller has it already.
  """
  if not configs or len(configs) != len(seeds):
    raise ValueError(f"train_group: expected one seed per config, got {len(configs)} "
                     f"configs and {len(seeds)} seeds")
  keys = [program_key(c) for c in configs]
  if any(k != keys[0] for k in keys):
    bad = next(i for i, k in enumerate(keys) if k != keys[0])
    raise ValueError(f"train_group: config {bad} differs from config 0 in more than the "
                     f"hyper-parameters a sweep traces ({', '.join(HYPER_NAMES)})")
  config = configs[0]
  run = run or run_lib.prepare_run(config)
  step_fn = steps_lib.per_device_hyper_step(config, run.model,
                                            steps_per_epoch=run.steps_per_epoch)
  step = make_seeds_step(step_fn, run.mesh, num_stacked=1)
  hyper = stacked_hyper_params(configs, run.mesh)
  states = init_states(run, seeds)
  batches = SeedBatches(run.sources.train, seeds=seeds, global_batch_size=config.batch_size,
                        mesh=run.mesh, shuffle=config.data.shuffle)
  history = []
  try:
    for epoch in range(1, config.num_epochs + 1):
      t0, collected = time.perf_counter(), []
      for _ in range(run.steps_per_epoch):
        states, m = step(states, next(batches), hyper)
        collected.append({k: m[k] for k in HISTORY_KEYS if k in m})
      means = {k: np.mean(np.stack([np.asarray(c[k]) for c in collected]), axis=0)
               for k in collected[0]}
      seconds = time.perf_counter() - t0
      history.append({"epoch": epoch, "seconds": seconds,
                      **{k: v.tolist() for k, v in means.items()}})
      if on_epoch is not None:
        on_epoch(epoch, means, seconds)
      if on_states is not None:
        on_states(epoch, states)
  finally:
    batches.close()
  return run, states, history


def finite_seeds(states: TrainState) -> np.ndarray:
  """(K,) bool: whether each seed's parameters, statistics and centres are all finite."""
  return np.asarray(_finite_seeds(states))


@jax.jit
def _finite_seeds(states: TrainState) -> jax.Array:
  leaves = jax.tree.leaves((states.params, states.batch_stats, states.aux))
  per_leaf = [jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1) for x in leaves]
  return functools.reduce(jnp.logical_and, per_leaf)


def evaluate_seeds(run: run_lib.Run, states: TrainState, split: str) -> list[dict | None]:
  """``steps.evaluate`` on ``split`` for each seed (None for a seed whose state is not finite)."""
  source = getattr(run.sources, split)
  if source is None:
    raise ValueError(f"the data has no {split} split")
  embed_fn = steps_lib.make_embed_fn(run.model, run.mesh)
  loss_fn = run.loss_fn or losses.loss_from_config(run.config.loss)  # compiled once
  finite = finite_seeds(states)
  return [steps_lib.evaluate(embed_fn, seed_state(states, i), source, config=run.config,
                             mesh=run.mesh, split=split, loss_fn=loss_fn)
          if finite[i] else None
          for i in range(len(finite))]
