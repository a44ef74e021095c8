"""dsf3n_jax.models.registry: parts by name, trained, saved and restored; the stock default."""

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax import checkpoints, config_check, convert, metrics, train
from dsf3n_jax.models import (
    DSF3N,
    Classifier,
    FineGrainedNet,
    ModalityEncoder,
    OutputHead,
    TwoStageFusion,
    registry,
)
from tests import test_train

NUM_CLASSES, VISUAL_DIM, AUDIO_DIM = 5, 24, 12


@registry.register_fusion("gated_sum")
class GatedSum(nn.Module):
  """A user's fusion: each modality mixed with its partner by one learned gate."""

  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, f_v, f_a, *, train=False, example_ids=None):
    del train, example_ids  # no dropout
    gate = nn.sigmoid(self.param("gate", nn.initializers.zeros, (), self.param_dtype))
    gate = gate.astype(f_v.dtype)
    return gate * f_v + (1 - gate) * f_a, gate * f_a + (1 - gate) * f_v


# A preset whose head width a config may not contradict.
registry.register_model("test_wide_head")(functools.partial(DSF3N, head_kw={"hidden": 64}))
# A preset swapping the fusion for one without settings.
registry.register_model("test_gated")(functools.partial(DSF3N, fusion="gated_sum"))


def tiny_config(**overrides):
  return test_train.tiny_config(**{"data.synthetic.num_classes": NUM_CLASSES, **overrides})


def tiny_mcfg(config):
  return train.model_config(config, num_classes=NUM_CLASSES, visual_dim=VISUAL_DIM,
                            audio_dim=AUDIO_DIM)


def test_a_registered_fusion_trains_with_its_params_under_fusion():
  config = tiny_config(**{"model.fusion": "gated_sum", "model.fusion_kw": {}})
  mcfg = tiny_mcfg(config)
  assert (mcfg["name"], mcfg["fusion"], mcfg["head"], mcfg["classifier"]) == (
      "dsf3n", "gated_sum", "mlp", "mlp")
  model = train.build_model(mcfg)
  tx = train.build_optimizer(config, 10)
  state = jax.device_get(train.make_init_fn(model, tx, num_classes=NUM_CLASSES)(0))
  assert jax.tree.map(np.shape, state.params["fusion"]) == {"gate": ()}
  assert {"visual_encoder", "head", "visual_classifier", "audio_classifier"} <= set(state.params)

  mesh = train.make_mesh(jax.devices()[:2])
  step = train.make_train_step(train.per_device_step(config, model, tx), mesh)
  state = jax.device_put(state, NamedSharding(mesh, P()))
  rng = np.random.default_rng(0)
  for _ in range(3):
    batch = dict(visual=rng.normal(size=(16, VISUAL_DIM)).astype(np.float32),
                 audio=rng.normal(size=(16, AUDIO_DIM)).astype(np.float32),
                 label=rng.integers(0, NUM_CLASSES, 16).astype(np.int32))
    state, step_metrics = step(state, jax.device_put(batch, NamedSharding(mesh, P("data"))))
    assert np.isfinite(float(step_metrics["loss"]))
  assert int(state.step) == 3
  assert float(state.params["fusion"]["gate"]) != 0.0  # the gate is trained


def test_names_are_saved_and_rebuild_the_model():
  config = tiny_config(**{"model.name": "dsf3n_paper"})
  mcfg = json.loads(json.dumps(tiny_mcfg(config)))  # as config.json / a checkpoint holds it
  assert mcfg["name"] == "dsf3n_paper"
  assert mcfg["fusion_kw"] == {"num_stages": 2, "variant": "paper"}  # the preset's
  model = train.build_model(mcfg)
  assert type(model) is DSF3N
  assert (model.fusion, model.head, model.classifier, dict(model.fusion_kw)) == (
      "mfa", "mlp", "mlp", {"num_stages": 2, "variant": "paper"})
  assert tiny_mcfg(config) == mcfg
  config = tiny_config(**{"model.fusion": "gated_sum", "model.fusion_kw": {}})
  mcfg = json.loads(json.dumps(tiny_mcfg(config)))
  assert mcfg["fusion_kw"] == {}  # MFA's settings do not linger with another fusion
  model = train.build_model(mcfg)
  assert (model.fusion, model.head, model.classifier) == ("gated_sum", "mlp", "mlp")
  assert tiny_mcfg(config) == mcfg
  # A run written before models had names rebuilds the stock model; the absent part names
  # count as the stock ones when a resume compares model configs.
  old = {k: v for k, v in tiny_mcfg(tiny_config()).items()
         if k not in ("name", *registry.PARTS)}
  model = train.build_model(old)
  assert (type(model), model.fusion, model.head, model.classifier) == (DSF3N, "mfa", "mlp", "mlp")
  current = {k: v for k, v in tiny_mcfg(tiny_config()).items() if k != "name"}
  checkpoints.check_model_config(old, current, where="old")
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="model.fusion: checkpoint has 'mfa', config has 'gated_sum'"):
    checkpoints.check_model_config(old, {**current, "fusion": "gated_sum"}, where="old")
  # A run written before the parts had their own settings: its flat fields are read as them.
  legacy = {k: v for k, v in old.items() if not k.endswith("_kw")}
  legacy.update(num_fusion_stages=2, mfa_variant="reference", use_mfa=True, head_hidden=32,
                classifier_hidden=16)
  checkpoints.check_model_config(legacy, current, where="legacy")
  model = train.build_model(legacy)
  assert (dict(model.fusion_kw), dict(model.head_kw), dict(model.classifier_kw)) == (
      {"num_stages": 2, "variant": "reference"}, {"hidden": 32}, {"hidden": 16})
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match="model.fusion_kw.num_stages: checkpoint has 0, config has 2"):
    checkpoints.check_model_config({**legacy, "use_mfa": False}, current, where="legacy")


def test_a_preset_refuses_a_config_that_contradicts_it():
  mcfg = tiny_mcfg(tiny_config(**{"model.name": "test_wide_head", "model.head_kw.hidden": 512}))
  assert mcfg["head_kw"] == {"hidden": 64}  # the config's is the default: the preset's applies
  with pytest.raises(ValueError, match=r"^config.model.head_kw.hidden=32 conflicts with "
                     r"config.model.name='test_wide_head', which sets head_kw.hidden=64$"):
    tiny_mcfg(tiny_config(**{"model.name": "test_wide_head"}))  # :tiny sets 32
  # A preset's part replaces the config's default part with its default settings.
  gated = tiny_mcfg(tiny_config(**{"model.name": "test_gated"}))
  assert (gated["fusion"], gated["fusion_kw"]) == ("gated_sum", {})
  # Settings the config changed are the user's: named, as not the preset part's.
  changed = tiny_mcfg(tiny_config(**{"model.name": "test_gated", "model.fusion_kw.num_stages": 1}))
  with pytest.raises(ValueError, match=r"fusion_kw.num_stages: not a setting of fusion "
                     r"'gated_sum'"):
    jax.eval_shape(lambda: train.build_model(changed, axis_name=None).init(
        jax.random.key(0), jnp.zeros((2, VISUAL_DIM)), jnp.zeros((2, AUDIO_DIM))))


@pytest.mark.parametrize("kind", ("model", *registry.PARTS))
def test_an_unknown_name_is_one_line_listing_the_registered(kind):
  field = "name" if kind == "model" else kind
  config = tiny_config(**{f"model.{field}": "nope"})
  known = ", ".join(registry.names(kind))
  with pytest.raises(ValueError) as err:
    tiny_mcfg(config)
  assert str(err.value).startswith(
      f"config.model.{field}='nope': unknown {kind}; registered: {known} (")
  assert "\n" not in str(err.value)
  with pytest.raises(config_check.ConfigError) as err:
    config_check.validate(config, num_devices=1)
  assert err.value.problems == [
      f"config.model.{field}='nope': expected a registered {kind}: {known} "
      f"({registry.IMPORT_HINT})"]
  with pytest.raises(ValueError, match=f"^model.{field}='nope': unknown {kind}; registered"):
    train.build_model({**tiny_mcfg(tiny_config()), field: "nope"})


def test_a_module_given_an_unknown_part_fails_at_init():
  with pytest.raises(ValueError, match="^model.head='nope': unknown head; registered: mlp"):
    DSF3N(3, visual_dim=4, audio_dim=4, head="nope").init(
        jax.random.key(0), jnp.zeros((1, 4)), jnp.zeros((1, 4)))


def test_registering_a_taken_name_or_an_unknown_kind_is_an_error():
  with pytest.raises(ValueError, match="fusion 'mfa' is already registered"):
    registry.register_fusion("mfa")(GatedSum)
  registry.register_fusion("gated_sum")(GatedSum)  # the same class again (a re-import): fine
  # A preset of a stock part under the stock name would change what saved runs rebuild as.
  stock = registry.lookup("fusion", "mfa")
  with pytest.raises(ValueError, match="fusion 'mfa' is already registered"):
    registry.register_fusion("mfa")(functools.partial(stock, num_stages=1))
  assert registry.lookup("fusion", "mfa") is stock
  registry.register_fusion("preset_once")(functools.partial(GatedSum))
  registry.register_fusion("preset_once")(functools.partial(GatedSum))  # the same preset again
  with pytest.raises(ValueError, match="'preset_once' is already registered"):
    registry.register_fusion("preset_once")(functools.partial(GatedSum, dtype=jnp.float16))
  first = lambda: GatedSum  # noqa: E731 - two lambdas of one module share a name
  second = lambda: GatedSum  # noqa: E731
  registry.register("head", "lambda_once")(first)
  with pytest.raises(ValueError, match="head 'lambda_once' is already registered"):
    registry.register("head", "lambda_once")(second)
  # A loss term through the generic register is a LossTerm, or refused at once.
  with pytest.raises(TypeError, match="loss_term 'bare': expected a losses.LossTerm"):
    registry.register("loss_term", "bare")(lambda outputs, batch: 0.0)
  with pytest.raises(ValueError, match="kind: expected one of model, fusion, head, classifier"):
    registry.register("loss", "x")
  with pytest.raises(TypeError, match="expected a registered name or a Module class"):
    DSF3N(3, fusion=lambda: None).init(jax.random.key(0), jnp.zeros((1, 1024)),
                                       jnp.zeros((1, 128)))


SMALL = dict(encoder_features=128, stem_features=16, stem_kernel=8, stem_stride=2,
             stem_padding=3, branch_features=(16, 16, 32), head_kw={"hidden": 32},
             embed_dim=16, classifier_kw={"hidden": 8})


class OriginalComposition(nn.Module):
  """DSF3N (SMALL settings) with its parts built as its setup built them before they were
  fields, for the paired forward."""

  def setup(self):
    s = SMALL
    self.visual_encoder = ModalityEncoder(s["encoder_features"])
    self.audio_encoder = ModalityEncoder(s["encoder_features"])
    fine_grained = functools.partial(
        FineGrainedNet, kernel_sizes=(3, 5, 7), stem_features=s["stem_features"],
        stem_kernel=s["stem_kernel"], stem_stride=s["stem_stride"],
        stem_padding=s["stem_padding"], branch_features=s["branch_features"])
    self.visual_fine_grained = fine_grained()
    self.audio_fine_grained = fine_grained()
    self.fusion = TwoStageFusion(2, "reference")
    # The heads' dropout_rate is keyword-only (shared by both through heads.TwoLayerHead).
    self.head = OutputHead(s["head_kw"]["hidden"], s["embed_dim"], dropout_rate=0.5)
    self.visual_classifier = Classifier(NUM_CLASSES, s["classifier_kw"]["hidden"], dropout_rate=0.5)
    self.audio_classifier = Classifier(NUM_CLASSES, s["classifier_kw"]["hidden"],
                                       dropout_rate=0.5)

  def __call__(self, visual, audio, *, train=False):
    f_v = self.visual_fine_grained(self.visual_encoder(visual), train=train)
    f_a = self.audio_fine_grained(self.audio_encoder(audio), train=train)
    m_v, m_a = self.fusion(f_v, f_a)
    o_v, o_a = self.head(m_v, train=train), self.head(m_a, train=train)
    return (o_v, o_a, self.visual_classifier(o_v, train=train),
            self.audio_classifier(o_a, train=train))


def test_the_default_composition_is_the_original_model_bit_for_bit():
  stock = DSF3N(NUM_CLASSES, visual_dim=VISUAL_DIM, audio_dim=AUDIO_DIM, **SMALL)
  as_module_defs = stock.clone(  # the same parts given as ModuleDefs instead of names
      fusion=functools.partial(TwoStageFusion, num_stages=2, variant="reference"),
      head=functools.partial(OutputHead, hidden=SMALL["head_kw"]["hidden"], dropout_rate=0.5),
      classifier=functools.partial(Classifier, hidden=SMALL["classifier_kw"]["hidden"],
                                   dropout_rate=0.5))
  visual = jax.random.normal(jax.random.key(1), (4, VISUAL_DIM))
  audio = jax.random.normal(jax.random.key(2), (4, AUDIO_DIM))

  def run(model):
    variables = model.init(jax.random.key(0), visual, audio)
    outputs, stats = model.apply(variables, visual, audio, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(3)})
    return variables, tuple(outputs), stats

  expected = run(OriginalComposition())
  for model in (stock, as_module_defs):
    got = run(model)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(a, b)


class FirstToken(nn.Module):
  """A fusion breaking the interface: it keeps the first token only."""

  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, f_v, f_a, *, train=False, example_ids=None):
    return f_v[:, :1], f_a[:, :1]


class EightWide(nn.Module):
  """A head breaking the interface: 8 outputs whatever ``features`` asks for."""

  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens, *, train=False, example_ids=None):
    return nn.Dense(8)(tokens.reshape(tokens.shape[0], -1))


class SixClasses(nn.Module):
  """A classifier breaking the interface: 6 logits whatever ``num_classes`` asks for."""

  num_classes: int
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, o, *, train=False, example_ids=None):
    return nn.Dense(6)(o)


@registry.register_fusion("synced_fusion_for_test")
class SyncedFusion(nn.Module):
  """A fusion with the model-given fields: it records what it was given."""

  axis_name: str | None = None
  dropout_rate: float = 0.0
  weights: tuple[float, ...] = (0.5, 0.5)  # a sequence of floats: a setting like any other
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, f_v, f_a, *, train=False, example_ids=None):
    return self.weights[0] * f_v, self.weights[1] * f_a


def test_a_part_gets_the_models_axis_and_rate_and_takes_float_sequences():
  model = DSF3N(3, visual_dim=VISUAL_DIM, audio_dim=AUDIO_DIM, fusion=SyncedFusion,
                fusion_kw={"weights": (0.25, 0.75)}, axis_name="data", dropout_rate=0.3, **SMALL)
  part = registry.resolve_part("fusion", SyncedFusion, model)
  assert part.keywords == {"weights": (0.25, 0.75), "axis_name": "data", "dropout_rate": 0.3}
  from dsf3n_jax import config_schema
  (weights,) = [f for f in config_schema.part_fields("fusion", "synced_fusion_for_test")
                if f.path.endswith(".weights")]
  assert weights.rule is None or weights.rule[0]((0.25, 0.75))


def test_a_part_breaking_its_interface_is_named():
  x, a = jnp.zeros((2, VISUAL_DIM)), jnp.zeros((2, AUDIO_DIM))
  model = DSF3N(3, visual_dim=VISUAL_DIM, audio_dim=AUDIO_DIM, **SMALL)
  init = lambda m: jax.eval_shape(lambda: m.init(jax.random.key(0), x, a))  # noqa: E731
  with pytest.raises(ValueError, match=r"fusion <class .*FirstToken'>: expected outputs of the "
                     r"input shapes \(2, 3, 32\) and \(2, 3, 32\), got \(2, 1, 32\)"):
    init(model.clone(fusion=FirstToken))
  with pytest.raises(ValueError, match=r"^model.head_kw.hidden: not a setting of head "
                     r"'EightWide' \(it takes: no settings\)"):
    init(model.clone(head=EightWide))  # with the stock head's settings
  with pytest.raises(ValueError, match=r"head <class .*EightWide'>: expected an output of shape "
                     r"\(2, 16\), got \(2, 8\)"):
    init(model.clone(head=EightWide, head_kw={}))
  with pytest.raises(ValueError, match=r"classifier <class .*SixClasses'>: expected logits of "
                     r"shape \(2, 3\) \(num_classes\), got \(2, 6\)"):
    init(model.clone(classifier=SixClasses, classifier_kw={}))


def test_convert_refuses_another_composition_naming_the_part():
  # Other settings of the stock parts convert.
  convert.check_reference_model(DSF3N(3, fusion_kw={"variant": "paper", "num_stages": 0}))
  convert.check_reference_model(DSF3N(3, head=OutputHead))  # the stock class, given itself

  class WiderHead(OutputHead):
    pass

  for kwargs, message in (
      (dict(fusion="gated_sum"), "model.fusion='gated_sum' has no counterpart"),
      (dict(head=WiderHead), "model.head='.*WiderHead' has no counterpart"),
      (dict(classifier=functools.partial(Classifier, hidden=4)),
       "model.classifier='Classifier' has no counterpart"),
  ):
    with pytest.raises(ValueError, match=f"^convert: {message} in the original PyTorch model; "
                       "only"):
      convert.from_torch_state_dict({}, model=DSF3N(3, **kwargs))

  class Subclass(DSF3N):
    pass

  with pytest.raises(ValueError, match="^convert: the model is a Subclass, not DSF3N"):
    convert.from_torch_state_dict({}, model=Subclass(3))
  with pytest.raises(ValueError, match="^convert: model.missing_partner='learned' has variables"):
    convert.from_torch_state_dict({}, model=DSF3N(3, missing_partner="learned"))
  variables = convert.variables_template(DSF3N(3, fusion="gated_sum"))
  with pytest.raises(ValueError, match="no torch name for Flax variable params/fusion/gate"):
    convert.to_torch_state_dict(variables)


def test_a_run_with_a_registered_fusion_restores_it(tmp_path):
  config = tiny_config(num_epochs=1, **{"model.fusion": "gated_sum", "model.fusion_kw": {}})
  workdir = str(tmp_path / "run")
  results = train.train_and_evaluate(config, workdir)
  model, variables, saved = train.restore_model(workdir)
  assert saved.model.fusion == "gated_sum" and model.fusion == "gated_sum"
  assert set(variables["params"]["fusion"]) == {"gate"}
  assert float(variables["params"]["fusion"]["gate"]) != 0.0
  # The restored model embeds the test split as the trained state did at the end of the run.
  mesh = train.make_mesh()
  out = train.embed_split(train.make_embed_fn(model, mesh), variables,
                          train.load_data(config).test, mesh=mesh,
                          batch_size=config.eval_batch_size)
  maps = metrics.cross_modal_map(out["emb_visual"], out["emb_audio"], out["label"],
                                 distance=config.metric.distance)
  assert float(maps["average"]) == pytest.approx(results["final"]["test"]["map_average"],
                                                 abs=1e-6)


def test_a_module_colon_name_imports_the_module_that_registers_it(tmp_path, monkeypatch):
  from dsf3n_jax.models import registry
  (tmp_path / "user_parts_for_test.py").write_text(
      "from dsf3n_jax.models import registry\n"
      "from dsf3n_jax.models.heads import OutputHead\n"
      "registry.register('head', 'user_head')(OutputHead)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert registry.lookup("head", "user_parts_for_test:user_head") is not None
  with pytest.raises(ValueError, match=r"cannot import 'no_such_module_x'"):
    registry.lookup("head", "no_such_module_x:user_head")
  # A module that fails as it is imported is named with its error.
  (tmp_path / "raising_parts_for_test.py").write_text("raise RuntimeError('boom')\n")
  with pytest.raises(ValueError, match=r"model.head='raising_parts_for_test:h': cannot import "
                     r"'raising_parts_for_test' \(RuntimeError: boom\)"):
    registry.lookup("head", "raising_parts_for_test:h", where="model.head")
