"""Seeds trained together (training.seeds) equal the same seeds trained one by one."""

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax import input_pipeline
from dsf3n_jax.training import run as run_lib
from dsf3n_jax.training import seeds as seeds_lib
from dsf3n_jax.training import steps as steps_lib
from dsf3n_jax.training.state import make_init_fn
from tests.test_train import tiny_config

SEEDS = (0, 5)


def _one_by_one(config, *, evaluate: bool = True):
  """``train(seed) -> (state, losses, test)``: the loop's streamed path for
  ``config.seed = seed``: init, loader, step. The seeds share the run's programs (one trace
  and compile of each, as for one seed: none of them depends on the seed). ``test``: the
  test split's metrics (None without ``evaluate``: two programs less to compile)."""
  run = run_lib.prepare_run(config)
  init = make_init_fn(run.model, run.tx, num_classes=run.sources.num_classes,
                      sharding=NamedSharding(run.mesh, P()))
  step = steps_lib.make_train_step(steps_lib.per_device_step(config, run.model, run.tx),
                                   run.mesh)
  embed = steps_lib.make_embed_fn(run.model, run.mesh)

  def train(seed):
    state = init(seed)
    loader = input_pipeline.TrainLoader(run.sources.train, global_batch_size=config.batch_size,
                                        mesh=run.mesh, seed=seed, shuffle=True)
    losses = []
    for _ in range(config.num_epochs * run.steps_per_epoch):
      state, m = step(state, next(loader))
      losses.append(float(m["loss"]))
    loader.close()
    test = (steps_lib.evaluate(embed, state, run.sources.test, config=config, mesh=run.mesh)
            if evaluate else None)
    return jax.device_get(state), losses, test

  return train


# The tests that take ``trained`` run on one xdist worker (``--dist loadgroup``, pyproject.toml):
# spread over two, each worker would build it.
SHARES_TRAINED = pytest.mark.xdist_group("seeds_trained")


@pytest.fixture(scope="module")
def trained():
  config = tiny_config(num_epochs=2)
  run, states, history = seeds_lib.train_seeds(config, SEEDS)
  return config, run, states, history


@SHARES_TRAINED
def test_seeds_together_equal_seeds_one_by_one(trained):
  config, run, states, history = trained
  tests = seeds_lib.evaluate_seeds(run, states, "test")
  assert len(history) == 2 and len(history[0]["loss"]) == len(SEEDS)
  one_by_one = _one_by_one(config)
  for i, seed in enumerate(SEEDS):
    alone, losses, test = one_by_one(seed)
    together = jax.device_get(seeds_lib.seed_state(states, i))
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(alone),
                          jax.tree.leaves(alone), jax.tree.leaves(together)):
      np.testing.assert_allclose(np.asarray(b, np.float64), np.asarray(a, np.float64),
                                 rtol=1e-5, atol=1e-5, err_msg=jax.tree_util.keystr(path[0]))
    spe = run.steps_per_epoch
    np.testing.assert_allclose([h["loss"][i] for h in history],
                               [np.mean(losses[e * spe:(e + 1) * spe]) for e in range(2)],
                               rtol=1e-5)
    np.testing.assert_allclose(tests[i]["loss"], test["loss"], rtol=1e-5)
    # The parameters agree to float32 rounding, and a rank may swap on a 1e-6 change of the
    # embeddings: one swap of neighbours among the 40 test items (8 a class) moves an AP by
    # up to 1/16, the mAP of both directions by up to 7.8e-4.
    for key in ("map_average", "unimodal_map_average"):
      np.testing.assert_allclose(tests[i][key], test[key], atol=8e-4)
  # Different seeds really are different runs.
  assert not np.allclose(jax.device_get(states.centers[0]), jax.device_get(states.centers[1]))


@SHARES_TRAINED
def test_a_diverged_seed_is_reported_and_not_evaluated(trained):
  _, run, states, _ = trained
  broken = states.replace(aux={**states.aux, "center": states.centers.at[1, 0, 0].set(np.nan)})
  np.testing.assert_array_equal(seeds_lib.finite_seeds(broken), [True, False])
  results = seeds_lib.evaluate_seeds(run, broken, "test")
  assert results[0] is not None and results[1] is None


def test_seeds_must_be_distinct():
  with pytest.raises(ValueError, match="distinct"):
    seeds_lib.train_seeds(tiny_config(num_epochs=1), [1, 1])
