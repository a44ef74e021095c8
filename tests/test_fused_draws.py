"""fused_draws: a function's threefry hashes made together, bit for bit the same."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jex_core

from dsf3n_jax.fused_draws import fused_draws
from dsf3n_jax.training import state as state_lib
from tests.test_train import tiny_config


def _primitives(fn, *args) -> collections.Counter:
  """How many times the program of ``fn`` binds each primitive where its result is used
  (what XLA keeps), nested jits and loop bodies counted at each use."""
  counts = collections.Counter()

  def visit(jaxpr, live):
    for eqn in reversed(jaxpr.eqns):
      if not any(v in live for v in eqn.outvars):
        continue
      live.update(v for v in eqn.invars if not isinstance(v, jex_core.Literal))
      counts[eqn.primitive.name] += 1
      for sub in jex_core.jaxprs_in_params(eqn.params):
        visit(sub, set(sub.outvars))

  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  visit(jaxpr, {v for v in jaxpr.outvars if not isinstance(v, jex_core.Literal)})
  return counts


def _draws(key):
  a, b, c = jax.random.split(key, 3)
  return {
      "uniform": jax.random.uniform(a, (3, 5), minval=-0.5, maxval=2.0),
      "normal": jax.random.normal(b, (7,)),
      "bf16": jax.random.uniform(c, (4, 2), jnp.bfloat16),
      "bits8": jax.random.bits(jax.random.fold_in(key, 8), (9,), jnp.uint8),
      "bits16": jax.random.bits(jax.random.fold_in(key, 16), (2, 3, 2), jnp.uint16),
      "bernoulli": jax.random.bernoulli(jax.random.fold_in(a, 1), 0.3, (11,)),
      # Not joined: a batch of keys, and control flow.
      "batch": jax.vmap(lambda k: jax.random.uniform(k, (2,)))(jax.random.split(c, 4)),
      "loop": jax.lax.fori_loop(0, 2, lambda i, x: x + jax.random.normal(
          jax.random.fold_in(b, i), (3,)), jnp.zeros(3)),
      "uses": jax.random.normal(a, (5,)) * 2.0 + jnp.arange(5.0),
  }


def _assert_same_bits(a, b):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, jax.tree_util.keystr(path)
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


def test_every_kind_of_draw_is_bit_for_bit_and_those_that_join_hash_together():
  key = jax.random.key(3)
  _assert_same_bits(jax.jit(_draws)(key), jax.jit(fused_draws(_draws))(key))
  # Made together: the three top-level fold-ins (one hash), the draws from the split's keys
  # (sizes 15; 7, 8 and 5: two size classes, two hashes), then those from the fold-ins' keys
  # (9, 12, 11: one). The batch's draw and the loop's draws and fold-ins stay as they were.
  plain, fused = _primitives(_draws, key), _primitives(fused_draws(_draws), key)
  assert (plain["random_bits"], plain["random_fold_in"], plain["threefry2x32"]) == (9, 4, 0)
  assert (fused["random_bits"], fused["random_fold_in"], fused["threefry2x32"]) == (2, 1, 4)
  with jax.enable_x64(True):  # 64-bit draws
    f64 = lambda k: jax.random.uniform(k, (6,), jnp.float64) + jax.random.normal(  # noqa: E731
        jax.random.fold_in(k, 1), (2, 2), jnp.float64).sum()
    _assert_same_bits(jax.jit(f64)(key), jax.jit(fused_draws(f64))(key))
  # A function with side effects runs as it is (each pass would repeat them).
  printed = []
  noisy = lambda k: jax.debug.callback(printed.append, 1) or jax.random.normal(k, (3,))  # noqa: E731
  _assert_same_bits(jax.jit(noisy)(key), jax.jit(fused_draws(noisy))(key))
  assert printed == [1, 1] and _primitives(fused_draws(noisy), key)["random_bits"] == 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_initialiser_folds_and_draws_with_few_hashes_and_the_same_bits(dtype):
  # float32's bits: benchmarks.init_compile's test (the same comparison, at VEGAS's widths).
  with jax.enable_x64(dtype == "float64"):
    config = tiny_config(**{"model.dtype": dtype})
    model = state_lib.build_model(state_lib.model_config(config, num_classes=5, visual_dim=24,
                                                         audio_dim=12))
    terms = tuple(config.loss.terms)
    key = jax.random.key(7)

    def plain(k):
      return state_lib._init_without_optimizer(model, k, 5, terms)

    if dtype == "float64":
      options = state_lib.init_compiler_options(jax.default_backend())
      drawn = state_lib._init_program(model, 5, terms)(key)
      assert {x.dtype for x in jax.tree.leaves(drawn.params)} == {np.dtype(dtype)}
      _assert_same_bits(jax.jit(plain, compiler_options=options)(key), drawn)
    # A key (a fold-in) and a draw per weight matrix and bias (70 of each), made by a hash
    # for the keys with the class centres' draw, then one per size class of the parameters.
    classes = {(leaf.size - 1).bit_length()
               for leaf in jax.tree.leaves(jax.eval_shape(plain, key).params)}
    plain, fused = _primitives(plain, key), _primitives(fused_draws(plain), key)
  assert plain["random_bits"] >= 60 and plain["random_fold_in"] >= 60
  assert fused["random_bits"] == fused["random_fold_in"] == 0
  assert 0 < fused["threefry2x32"] <= 2 + len(classes) < 20


@pytest.mark.xla_optimized
def test_the_initialisers_compile_options_draw_the_bits_of_xlas_defaults():
  # INIT_COMPILER_OPTIONS (LLVM at -O1, XLA:CPU's loop emitters) only compile the initialiser
  # faster on CPU; it draws what XLA's default options draw (the benchmark: the full model).
  config = tiny_config(**{"model.dtype": "bfloat16"})
  model = state_lib.build_model(state_lib.model_config(config, num_classes=5, visual_dim=24,
                                                       audio_dim=12))
  terms = tuple(config.loss.terms)
  key = jax.random.key(11)
  at_default = jax.jit(fused_draws(lambda k: state_lib._init_without_optimizer(
      model, k, 5, terms)))(key)
  _assert_same_bits(at_default, state_lib._init_program(model, 5, terms)(key))


def test_an_initialiser_option_this_xla_lacks_is_left_out(monkeypatch):
  backend = jax.default_backend()
  known = state_lib.INIT_COMPILER_OPTIONS.get(backend, {})
  monkeypatch.setitem(state_lib.INIT_COMPILER_OPTIONS, backend,
                      {**known, "xla_no_such_option_of_any_xla": True})
  state_lib.init_compiler_options.cache_clear()
  try:
    assert state_lib.init_compiler_options(backend) == (known or None)
  finally:
    state_lib.init_compiler_options.cache_clear()
