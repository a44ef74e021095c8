"""Tests of config validation and one-line CLI errors: nothing here compiles the model."""

import os
import subprocess
import sys
from typing import Literal

import jax
import jax.numpy as jnp
import pytest
from flax import linen as nn

from configs import default
from dsf3n_jax import cli, config_check, config_schema, train
from dsf3n_jax.config_check import ConfigError
from dsf3n_jax.models import registry
from tests.test_train import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("synthetic", "vegas", "ave", "fsdd", "paired_features")


def small_config(**overrides):
  config = default.get_config("runlocal,tiny")
  for path, value in overrides.items():
    *parents, last = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    node[last] = value
  return config


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("variants", ["", "runlocal,tiny", "unimodal"])
def test_shipped_configs_are_valid(name, variants):
  module = __import__(f"configs.{name}", fromlist=["get_config"])
  config = module.get_config(variants)
  config.data.path = config.data.path or "features.npz"  # paired_features: given on the CLI
  config_check.validate(config, num_devices=8)
  config_check.check_unknown_fields(config, default.get_config())


@pytest.mark.parametrize("path, value, expected", [
    ("batch_size", 0, "a positive multiple of the 8 devices"),
    ("batch_size", -32, "a positive multiple of the 8 devices"),
    ("batch_size", 12, "a positive multiple of the 8 devices"),
    ("eval_batch_size", 0, "a positive multiple of the 8 devices"),
    ("keep_checkpoints", 0, "an int >= 1"),
    ("num_epochs", 0, "an int >= 1"),
    ("num_epochs", -1, "an int >= 1"),
    ("model.dropout_rate", 2.0, "a number in [0, 1)"),
    ("optim.lr", -1.0, "a number >= 0"),
    ("optim.lr", float("nan"), "a number >= 0"),
    ("selection_split", "valid", "one of validation, test, last"),
    ("metric.distance", "cos", "one of cosine, euclidean"),
    ("selection_metric", "map", "one of map_average, unimodal_map_average, or "
     "'<eval name>/<metric>'"),
    ("model.missing_partner", "zeros", "one of self, learned, mean"),
    ("model.partner_dropout", 1.5, "a number in [0, 1]"),
    ("model.kernel_sizes", (3, 4), "a non-empty sequence of odd positive ints"),
    ("data.name", "",
     "a dataset name: synthetic, vegas, ave, paired_features or a registered TFDS dataset"),
    ("data.on_device", "maybe", "one of auto, true, false"),
    ("optim.schedule", "linear", "one of constant, warmup_step, cosine"),
    ("model.fusion_kw.num_stages", -1, "an int >= 0"),  # a part's settings, from its fields
    ("model.fusion_kw.variant", "printed", "one of reference, paper"),
    ("model.head_kw.hidden", 0, "an int >= 1"),
    ("model.classifier_kw.hidden", -4, "an int >= 1"),
    ("data.validation_seed", -1, "an int >= 0"),
    ("data.synthetic.num_train", -5, "an int >= 1"),  # generate_synthetic's bounds
    ("data.synthetic.seed", -3, "an int >= 0"),
    ("data.synthetic.difficulty", float("nan"), "a number >= 0"),
])
def test_each_bad_value_is_named_with_what_is_accepted(path, value, expected):
  with pytest.raises(ConfigError) as err:
    config_check.validate(small_config(**{path: value}), num_devices=8)
  assert str(err.value) == f"config.{path}={value!r}: expected {expected}"


def test_every_problem_is_reported_at_once():
  config = small_config(**{"batch_size": 0, "num_epochs": -1, "metric.distance": "cos",
                           "data.name": "paired_features", "model.encoder_features": 8})
  with pytest.raises(ConfigError) as err:
    config_check.validate(config, num_devices=1)
  assert err.value.exit_status == 2
  assert [p.split("=")[0] for p in err.value.problems] == [
      "config.num_epochs", "config.metric.distance", "config.batch_size",
      "config.model.encoder_features", "config.data.path"]
  assert "config.batch_size=0: expected an int >= 1" in err.value.problems


def test_evaluators_are_checked_by_name_split_schedule_and_settings(tmp_path):
  config = small_config()
  config.evals.recall = {"type": "recal", "split": "dev", "every_steps": -1}
  with pytest.raises(ConfigError) as err:
    config_check.validate(config, num_devices=8)
  assert err.value.problems == [
      "config.evals.recall.type='recal': expected a registered evaluator: loss, "
      "precision_recall, retrieval (a module registering another must be imported first, e.g. "
      "by the config file; or name it as 'module:name')",
      "config.evals.recall.split='dev': expected one of train, validation, test",
      "config.evals.recall.every_steps=-1: expected an int >= 0"]
  config.evals.recall = {"type": "loss", "split": "test", "every_steps": 100, "every_epochs": 2}
  with pytest.raises(ConfigError, match=r"config.evals.recall.every_epochs=2: expected unset "
                     r"beside config.evals.recall.every_steps=100"):
    config_check.validate(config, num_devices=8)
  # An evaluator's own settings: refused before anything compiles, naming the entry.
  config = small_config(selection_metric="recall/precision_at_1")
  config.evals.recall = {"type": "precision_recall", "split": "test", "k": 5}
  with pytest.raises(ConfigError, match=r"config.evals.recall: .*'k'.*\(the settings of "
                     r"evaluator 'precision_recall': ks=\(1, 5, 10\), protocol='auto'\)"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config.evals.recall = {"type": "precision_recall", "split": "test", "ks": 0}
  with pytest.raises(ConfigError, match=r"config.evals.recall: ks=\(0,\): expected positive"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  config = small_config(selection_metric="nothing/map_average")
  with pytest.raises(ConfigError, match="the evaluator 'nothing' is not run"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


class Widen(nn.Module):
  """A custom head whose settings are its own fields (checked from their type hints)."""

  scale: float = 2.0
  mode: Literal["wide", "narrow"] = "wide"
  features: int = 64
  dropout_rate: float = 0.5
  dtype: object = None
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, train=False, example_ids=None):
    return nn.Dense(self.features)(x.reshape(x.shape[0], -1) * self.scale)


registry.register_head("test_widen")(Widen)


def test_a_parts_settings_are_its_own_fields_checked_like_any_field():
  # Another part with the stock part's settings left over: refused, naming what it takes.
  config = small_config(**{"model.head": "test_widen"})
  with pytest.raises(ConfigError) as err:
    config_check.validate(config, num_devices=8)
  assert err.value.problems == [
      "config.model.head_kw.hidden: not a setting of head 'test_widen' (it takes: scale, mode); "
      "a config that changes model.head sets model.head_kw to that part's settings"]
  config.model.head_kw = {"scale": "3", "mode": "tall", "dropout_rate": 0.1}
  with pytest.raises(ConfigError) as err:
    config_check.validate(config, num_devices=8)
  assert err.value.problems == [
      "config.model.head_kw.dropout_rate: given by config.model.dropout_rate, not a setting of "
      "the head",
      "config.model.head_kw.scale='3': expected a finite number",
      "config.model.head_kw.mode='tall': expected one of wide, narrow"]
  config.model.head_kw = {"scale": 0.5}
  config_check.validate(config, num_devices=8)
  mcfg = train.model_config(config, num_classes=3, visual_dim=4, audio_dim=2)
  assert mcfg["head_kw"] == {"mode": "wide", "scale": 0.5}  # complete, as it is saved
  model = train.build_model(mcfg, axis_name=None)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4)),
                                                jnp.zeros((1, 2))))
  assert variables["params"]["head"]["Dense_0"]["kernel"].shape[-1] == mcfg["embed_dim"]
  lines = config_schema.describe().splitlines()
  assert ("  model.fusion_kw.num_stages = 2: an int >= 0. MFA applications sharing one set of "
          "weights; 0: the ablation without MFA") in lines


def test_each_field_is_declared_once_with_help_and_a_default_its_rule_accepts():
  fields = config_schema.fields()
  paths = [f.path for f in fields]
  assert len(set(paths)) == len(paths)
  for field in fields:
    assert field.help.strip(), field.path
    if field.rule is not None:
      assert field.rule[0](field.default), (field.path, field.default, field.rule[1])
  # Every key of the base config is a declared field, a section above one, or inside one
  # (evals.test.type, loss.terms.id): nothing is declared anywhere else.
  declared = set(paths)
  for key in config_check.key_paths(default.get_config()):
    assert (key in declared or any(p.startswith(f"{key}.") for p in declared)
            or any(key.startswith(f"{p}.") for p in declared)), key
  assert "optim.lr = 0.0001: a number >= 0. Adam's learning rate" in config_schema.describe()
  assert dict(config_check.RULES) == dict(config_schema.rules())


def test_a_field_an_older_config_lacks_is_not_checked():
  config = small_config()
  del config.model["partner_dropout"]
  del config["selection_metric"]
  del config.metric["original_test_batches"]
  config_check.validate(config, num_devices=8)


def test_unknown_fields_name_the_closest_known_one():
  config = small_config()
  config.unlock()
  config.optim.learning_rate = 1.0
  config.num_epoch = 3
  config.data.synthetic.difficulty = 2.0  # generator kwargs: open-ended, checked by name
  with pytest.raises(ConfigError) as err:
    config_check.check_unknown_fields(config, default.get_config())
  assert err.value.problems == [
      "config.num_epoch: unknown field; did you mean config.num_epochs?",
      "config.optim.learning_rate: unknown field; did you mean config.optim.lr?"]
  config.data.synthetic.num_trian = 5
  del config.optim["learning_rate"], config["num_epoch"]
  with pytest.raises(ConfigError, match=r"^config\.data\.synthetic\.num_trian: unknown field; "
                     r"did you mean config\.data\.synthetic\.num_train\?$"):
    config_check.validate(config, num_devices=8)


def test_an_unknown_override_on_the_command_line_names_lr():
  from dsf3n_jax import main  # pylint: disable=g-import-not-at-top
  argv = ["main", f"--config={REPO}/configs/synthetic.py:runlocal",
          "--config.optim.learning_rate=1", "--config.optim.lr=1"]
  assert main._unknown_overrides(argv) == [
      "config.optim.learning_rate: unknown field; did you mean config.optim.lr?"]
  # A generator option the file does not set is not a flag: the message says where it goes.
  argv = ["main", f"--config={REPO}/configs/synthetic.py:runlocal",
          "--config.data.synthetic.difficulty=2"]
  assert main._unknown_overrides(argv) == [
      "config.data.synthetic.difficulty: an option of the synthetic generator that this config "
      "file does not set, so no flag (a flag overrides a field the file has); set it in a "
      "config file of yours: config.data.synthetic.difficulty = ... (default 1.0; "
      "docs/data.md)"]


def test_train_and_evaluate_refuses_before_creating_anything(tmp_path):
  from dsf3n_jax import train  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError, match=r"config\.keep_checkpoints=0: expected an int >= 1"):
    train.train_and_evaluate(small_config(keep_checkpoints=0), str(workdir))
  assert not workdir.exists()


def test_errors_are_lines_with_an_exit_status(capsys):
  assert cli.report(ConfigError(["config.a=1: expected x", "config.b=2: expected y"])) == 2
  assert cli.report(KeyError("emb_audio")) == 1
  assert cli.report(FloatingPointError("non-finite loss at step 7")) == 1
  assert capsys.readouterr().err.splitlines() == [
      "error: config.a=1: expected x", "error: config.b=2: expected y",
      "error: KeyError: 'emb_audio'", "error: non-finite loss at step 7"]
  assert cli.run(lambda argv: {}["x"], ["--verbose"]) == 1
  err = capsys.readouterr().err
  assert "Traceback" in err and err.endswith("error: KeyError: 'x'\n")
  with pytest.raises(KeyboardInterrupt):
    cli.run(lambda argv: (_ for _ in ()).throw(KeyboardInterrupt), [])


def test_cli_bad_config_is_one_error_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(8))
  proc = subprocess.run(
      [sys.executable, "-m", "dsf3n_jax.main", "--config=configs/synthetic.py:runlocal,tiny",
       "--config.batch_size=0", f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.splitlines() == ["error: config.batch_size=0: expected a positive multiple "
                                      "of the 8 devices"], proc.stderr
  assert not (tmp_path / "run").exists()
