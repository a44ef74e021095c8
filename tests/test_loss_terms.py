"""Loss terms by name: the registry, auxiliary parameters with their own optimiser, old
checkpoints, and ``train_and_evaluate(model=, loss_fn=)``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from dsf3n_jax import checkpoints, config_check, losses, train
from dsf3n_jax.models import DSF3NOutput
from dsf3n_jax.training import state as state_lib
from tests.test_train import max_abs_diff, random_batches, run_steps, tiny_config, tiny_setup


def _init_temperature(key, *, num_classes, embed_dim, dtype):
  del key, num_classes, embed_dim
  return {"log_temperature": jnp.log(jnp.asarray(0.1, dtype))}


@losses.register_loss_term("test_infonce", init=_init_temperature,
                           optimizer=lambda config: optax.sgd(0.5))
def _infonce(outputs, batch, params, *, axis_name=None):
  """Symmetric InfoNCE over the global batch (as the README's example)."""
  v = losses.all_gather(outputs.emb_visual, axis_name)
  a = losses.all_gather(outputs.emb_audio, axis_name)
  v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
  a = a / jnp.linalg.norm(a, axis=-1, keepdims=True)
  logits = v @ a.T / jnp.exp(params["log_temperature"])
  pairs = jnp.arange(v.shape[0])
  return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, pairs).mean()
                + optax.softmax_cross_entropy_with_integer_labels(logits.T, pairs).mean())


def _outputs(seed=0, batch=12, dim=6, classes=4):
  rng = np.random.default_rng(seed)
  emb_v, emb_a = (jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32) for _ in range(2))
  logits_v, logits_a = (jnp.asarray(rng.normal(size=(batch, classes)), jnp.float32)
                        for _ in range(2))
  labels = jnp.asarray(rng.integers(0, classes, batch), jnp.int32)
  centers = jnp.asarray(rng.normal(size=(classes, dim)), jnp.float32)
  return DSF3NOutput(emb_v, emb_a, logits_v, logits_a), labels, centers


def test_the_default_terms_are_the_original_objective():
  outputs, labels, centers = _outputs()
  config = tiny_config()
  assert dict(config.loss.terms) == {"id": 1.0, "pair": 1e-4, "center": 5e-4}
  total, parts = losses.loss_from_config(config.loss)(
      outputs, {"label": labels, "mask": None}, {"center": centers})
  ref_total, ref_parts = losses.dsf3n_loss(outputs, labels, centers, alpha=1e-4, beta=5e-4)
  assert float(total) == float(ref_total)
  assert {k: float(v) for k, v in parts.items()} == {k: float(v) for k, v in ref_parts.items()}
  # Each part is its own function of the outputs (not the same number three times).
  assert float(parts["pair"]) == float(losses.pair_loss(outputs.emb_visual, outputs.emb_audio))
  config.loss.id_form = "paper"
  paper, _ = losses.loss_from_config(config.loss)(outputs, {"label": labels}, {"center": centers})
  assert float(paper) != float(total)


def test_unknown_terms_and_bad_weights_are_config_errors():
  config = tiny_config(**{"loss.terms.nope": 1.0, "loss.terms.pair": -1.0})
  config.loss.unimodal_terms.infonce = 0.5
  with pytest.raises(config_check.ConfigError) as e:
    config_check.validate(config, num_devices=1)
  problems = e.value.problems
  assert any(p.startswith("config.loss.terms.nope=1.0: expected a registered loss term: ")
             and "center, distill_class, distill_pair, id, pair" in p for p in problems), problems
  assert "config.loss.terms.pair=-1.0: expected a weight >= 0" in problems
  assert any(p.startswith("config.loss.unimodal_terms.infonce=0.5: expected a term of "
                          "loss.terms") for p in problems), problems
  # An old config's field names its new place.
  assert config_check.unknown_fields({"loss": {"alpha": 1.0}}, tiny_config()) == [
      "config.loss.alpha: unknown field; it is now config.loss.terms.pair"]
  # A user's term under loss.terms is not an unknown field.
  assert config_check.unknown_fields(tiny_config(**{"loss.terms.test_infonce": 0.1}),
                                     tiny_config()) == []
  # A "module:name" whose module fails to import says why.
  config = tiny_config(**{"loss.terms.no_such_module_y:term": 1.0})
  with pytest.raises(config_check.ConfigError, match=r"cannot import 'no_such_module_y' \(No "
                     r"module named 'no_such_module_y'\)"):
    config_check.validate(config, num_devices=1)


def test_a_term_named_module_colon_name_is_saved_as_its_module_and_name(tmp_path, monkeypatch):
  (tmp_path / "user_terms_for_test.py").write_text(
      "from dsf3n_jax import losses\n"
      "@losses.register_loss_term('user_term_for_test')\n"
      "def term(outputs, batch, params, *, axis_name=None):\n"
      "  return losses.pair_loss(outputs[0], outputs[1], axis_name=axis_name)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  origins = losses.term_origins(["user_terms_for_test:user_term_for_test"])
  assert origins == {"user_terms_for_test:user_term_for_test":
                     "user_terms_for_test:user_term_for_test"}
  losses.import_terms(origins)  # what restoring the run does


def test_adam_without_momentum_steps_by_the_sign_of_the_gradient():
  from dsf3n_jax import train
  tx = train.scale_by_adam(0.0, 0.999, 1e-12)
  grads = {"w": jnp.array([1e-3, 2.0, -5.0])}
  updates, _ = tx.update(grads, tx.init(grads))
  np.testing.assert_allclose(updates["w"], np.sign(grads["w"]), rtol=1e-5)


def test_a_term_with_parameters_trains_them_by_its_own_optimizer_on_any_device_count():
  config = tiny_config(**{"loss.terms.test_infonce": 1.0})
  model, tx, state0 = tiny_setup(config, loss_terms=config.loss.terms)
  assert set(state0.aux) == {"center", "test_infonce"}
  np.testing.assert_allclose(state0.aux["test_infonce"]["log_temperature"], np.log(0.1),
                             rtol=1e-6)
  # The centres are drawn as before terms had names (the same key).
  _, _, plain = tiny_setup(tiny_config())
  np.testing.assert_array_equal(state0.centers, plain.centers)
  step_fn = train.per_device_step(config, model, tx)
  batches = random_batches(2, 16)
  ref, hist = run_steps(step_fn, state0, batches, 1)
  assert "test_infonce" in hist[0] and np.isfinite(hist[0]["test_infonce"])
  moved = float(ref.aux["test_infonce"]["log_temperature"] - np.log(0.1))
  assert abs(moved) > 1e-4  # trained, by SGD at 0.5 (not the network's Adam at 1e-3)
  # all_gather makes the term one over the global batch on any device count: 8 as 1
  state, _ = run_steps(step_fn, state0, batches, 8)
  assert max_abs_diff(state.aux, ref.aux) < 1e-5
  assert max_abs_diff(state.params, ref.params) < 1e-5


def _old_layout(state, config):
  """``state`` as checkpoints were written before ``TrainState.aux`` (format 1)."""
  o = config.optim
  net = optax.chain(optax.chain(state_lib.scale_by_adam(o.b1, o.b2, o.eps),
                                optax.scale_by_learning_rate(optax.constant_schedule(o.lr))))
  tx = optax.multi_transform({"net": net, "centers": optax.sgd(o.center_lr)}, lambda t: {
      "net": jax.tree.map(lambda _: "net", t["net"]), "centers": "centers"})
  trainable = {"net": state.params, "centers": state.centers}

  @jax.jit  # one program, not an op-by-op run that compiles each of its ~200 operations
  def after_one_update(trainable):
    return tx.update(jax.tree.map(jnp.ones_like, trainable), tx.init(trainable), trainable)[1]

  opt_state = after_one_update(trainable)
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "centers": state.centers, "opt_state": opt_state, "rng": state.rng}


def test_a_checkpoint_from_before_aux_restores_leaf_for_leaf(tmp_path):
  config = tiny_config()
  model, tx, state = tiny_setup(config)
  old = _old_layout(state, config)
  manager = ocp.CheckpointManager(tmp_path / "run" / "checkpoints")
  meta = {"epoch": 1, "step": 3, "best": None, "optimizer_state": True,
          "loss": {"alpha": 1e-4, "beta": 5e-4, "id_form": "ce", "unimodal_weight": 0.0}}
  manager.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(old),
                                          meta=ocp.args.JsonSave(meta)))
  manager.wait_until_finished()
  manager.close()
  checkpointer = checkpoints.Checkpointer(tmp_path / "run", read_only=True)
  try:
    restored, saved_meta = checkpointer.restore(
        checkpoints.abstract_like(state, jax.make_mesh((1,), ("data",),
                                                       devices=jax.devices()[:1])))
  finally:
    checkpointer.close()
  assert saved_meta["step"] == 3
  np.testing.assert_array_equal(restored.centers, old["centers"])
  assert max_abs_diff(restored.params, old["params"]) == 0
  assert max_abs_diff(restored.opt_state, old["opt_state"]) == 0
  count = restored.opt_state.inner_states["net"].inner_state[0][0].count
  assert int(count) == 1  # the old optimiser's step, not a fresh state


def test_train_and_evaluate_takes_a_model_and_a_loss(tmp_path):
  config = tiny_config(num_epochs=1)
  called = []

  def pair_only(outputs, batch, aux, *, axis_name=None):
    called.append(axis_name)
    value = losses.pair_loss(outputs.emb_visual, outputs.emb_audio, mask=batch.get("mask"),
                             axis_name=axis_name)
    return value, {"pair_only": value}

  data = train.load_data(config)
  wide = train.build_model(train.model_config(
      config, num_classes=data.num_classes, visual_dim=data.visual_dim,
      audio_dim=data.audio_dim)).clone(head_kw={"hidden": 24}, axis_name=None)
  results = train.train_and_evaluate(config, str(tmp_path / "run"), model=wide,
                                     loss_fn=pair_only)
  assert {"data", None} <= set(called)  # the step (mapped) and the evaluation (whole split)
  assert results["final"]["test"]["loss"] == results["final"]["test"]["pair_only"]
  assert "id" not in results["final"]["test"]
  state = checkpoints.Checkpointer(tmp_path / "run", read_only=True)
  try:
    assert state.read_meta()["model"]["head_kw"]["hidden"] != 24  # config.model is what is recorded
  finally:
    state.close()
  with pytest.raises(ValueError, match=r"run: the run trained a model given from Python"):
    train.restore_model(str(tmp_path / "run"))  # not config.model's: not rebuilt from it
