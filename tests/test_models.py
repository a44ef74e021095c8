"""dsf3n_jax.models: shapes and dtypes, configuration flags, PyTorch-like init and BatchNorm."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dsf3n_jax.models import (
    DSF3N,
    BatchNorm,
    Bilinear,
    Classifier,
    Dropout,
    FineGrainedNet,
    ModalityEncoder,
    MultiModalFusionAttention,
    OutputHead,
    TwoStageFusion,
    layers,
)

SMALL = dict(encoder_features=256, stem_features=16, stem_kernel=8, stem_stride=2,
             stem_padding=3, branch_features=(16, 32, 64), head_kw={"hidden": 64},
             embed_dim=16, classifier_kw={"hidden": 8})


def _shapes(module, *args, **kwargs):
  """(output shape structs, variable shape structs) without computing anything."""
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args, **kwargs))
  out = jax.eval_shape(lambda v: module.apply(v, *args, **kwargs), variables)
  return out, variables


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_module_shapes_and_dtypes(dtype):
  b = 3
  x = jnp.zeros((b, 1024), jnp.float32)
  out, _ = _shapes(ModalityEncoder(1024, dtype=dtype), jnp.zeros((b, 128)))
  assert (out.shape, out.dtype) == ((b, 1024), dtype)
  out, var = _shapes(FineGrainedNet(dtype=dtype), x, train=False)
  assert (out.shape, out.dtype) == ((b, 3, 256), dtype)
  assert set(var["params"]) == {"bn", "stem"} | {f"conv{k}_{i}" for k in (3, 5, 7)
                                                 for i in (1, 2, 3)}
  assert var["params"]["stem"]["kernel"].shape == (32, 1, 64)
  assert var["params"]["conv7_3"]["kernel"].shape == (7, 128, 256)
  tokens = jnp.zeros((b, 3, 256), dtype)
  out, var = _shapes(MultiModalFusionAttention(dtype=dtype), tokens, tokens)
  assert (out.shape, out.dtype) == ((b, 3, 256), dtype)
  assert var["params"]["bilinear"]["kernel"].shape == (256, 256, 256)
  assert var["params"]["t_c"].shape == ()
  (o_v, o_a), _ = _shapes(TwoStageFusion(dtype=dtype), tokens, tokens)
  assert o_v.shape == o_a.shape == (b, 3, 256)
  out, var = _shapes(OutputHead(dtype=dtype), tokens, train=False)
  assert (out.shape, out.dtype) == ((b, 64), dtype)
  assert var["params"]["hidden"]["kernel"].shape == (768, 512)
  out, var = _shapes(Classifier(10, dtype=dtype), jnp.zeros((b, 64)), train=False)
  assert (out.shape, out.dtype) == ((b, 10), dtype)
  assert "bias" not in var["params"]["hidden"] and "bias" not in var["params"]["logits"]
  out, var = _shapes(DSF3N(10, dtype=dtype), x, jnp.zeros((b, 128)))
  assert [o.shape for o in out] == [(b, 64), (b, 64), (b, 10), (b, 10)]
  assert all(o.dtype == dtype for o in out)
  assert set(var) == {"params", "batch_stats"}
  n = sum(math.prod(p.shape) for p in jax.tree.leaves(var["params"]))
  assert n == 20_275_141  # ~20.3 M, as the original's; 16.8 M in the bilinear map
  assert var["batch_stats"]["visual_fine_grained"]["bn"]["var"].dtype == jnp.float32


def test_configuration_changes_the_structure():
  x, a = jnp.zeros((2, 1024)), jnp.zeros((2, 128))
  _, ref = _shapes(DSF3N(5), x, a)
  _, paper = _shapes(DSF3N(5, fusion_kw={"variant": "paper"}), x, a)
  mfa_ref, mfa_paper = ref["params"]["fusion"]["mfa"], paper["params"]["fusion"]["mfa"]
  assert set(mfa_ref) - set(mfa_paper) == {"w_2", "w_4", "t_c"}
  _, no_mfa = _shapes(DSF3N(5, fusion_kw={"num_stages": 0}), x, a)
  assert "fusion" not in no_mfa["params"]
  out, two = _shapes(DSF3N(5, kernel_sizes=(3, 5), branch_features=(8, 16)), x, a)
  assert "conv7_1" not in two["params"]["visual_fine_grained"]
  assert "conv3_3" not in two["params"]["visual_fine_grained"]
  assert two["params"]["head"]["hidden"]["kernel"].shape == (2 * 16, 512)
  with pytest.raises(ValueError, match="odd kernels"):
    _shapes(DSF3N(5, kernel_sizes=(4,)), x, a)
  with pytest.raises(ValueError, match="visual: expected shape"):
    _shapes(DSF3N(5), jnp.zeros((2, 1000)), a)
  with pytest.raises(ValueError, match="variant"):
    _shapes(DSF3N(5, fusion_kw={"variant": "nope"}), x, a)


@pytest.fixture(scope="module")
def full_init():
  """The full model initialised once (flattened params)."""
  init = jax.jit(DSF3N(10).init)
  variables = init(jax.random.key(0), jnp.zeros((1, 1024)), jnp.zeros((1, 128)))
  return variables


def test_init_reproduces_pytorch_distributions(full_init):
  flat = traverse_util.flatten_dict(jax.device_get(full_init["params"]), sep="/")
  fan_in_of = {}
  for name, value in flat.items():
    if name.endswith("kernel"):
      fan_in = (value.shape[0] if "bilinear" in name else math.prod(value.shape[:-1]))
      fan_in_of[name.rsplit("/", 1)[0]] = fan_in
  checked = 0
  for name, value in flat.items():
    module, leaf = name.rsplit("/", 1)
    if leaf in ("kernel", "bias") and not module.endswith("/bn"):
      bound = 1 / math.sqrt(fan_in_of[module])
      if "bilinear" in module:
        assert bound == 1 / 16
      assert np.max(np.abs(value)) <= bound, name
      if value.size >= 1000:  # uniform(-b, b): max ~ b, mean ~ 0, std b / sqrt(3)
        assert np.max(np.abs(value)) > 0.99 * bound, name
        assert abs(np.mean(value)) < 0.05 * bound, name
        assert np.std(value) == pytest.approx(bound / math.sqrt(3), rel=0.05), name
      checked += 1
  assert checked == len([n for n in flat if n.endswith(("kernel", "bias"))]) - 2 > 60
  for side in ("visual", "audio"):
    np.testing.assert_array_equal(flat[f"{side}_fine_grained/bn/scale"], [1.0])
    np.testing.assert_array_equal(flat[f"{side}_fine_grained/bn/bias"], [0.0])
    stats = full_init["batch_stats"][f"{side}_fine_grained"]["bn"]
    np.testing.assert_array_equal(stats["mean"], [0.0])
    np.testing.assert_array_equal(stats["var"], [1.0])
  assert float(flat["fusion/mfa/t_c"]) == 1.0


def test_batchnorm_matches_torch_running_statistics():
  torch = pytest.importorskip("torch")
  rng = np.random.RandomState(0)
  bn_t = torch.nn.BatchNorm1d(1)
  bn = BatchNorm()
  x0 = rng.randn(5, 40, 1).astype(np.float32) * 3 + 2
  variables = bn.init(jax.random.key(0), x0, train=False)
  for step in range(3):
    x = rng.randn(5, 40, 1).astype(np.float32) * (step + 1) + step
    y, new = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    variables = {"params": variables["params"], "batch_stats": new["batch_stats"]}
    y_t = bn_t.train()(torch.from_numpy(x.transpose(0, 2, 1)))
    np.testing.assert_allclose(y, y_t.detach().numpy().transpose(0, 2, 1), rtol=1e-5,
                               atol=1e-5)
  np.testing.assert_allclose(variables["batch_stats"]["mean"], bn_t.running_mean.numpy(),
                             rtol=1e-6)
  np.testing.assert_allclose(variables["batch_stats"]["var"], bn_t.running_var.numpy(),
                             rtol=1e-6)
  # The running variance uses the unbiased batch variance (Flax's stock one does not).
  x = rng.randn(2, 3, 1).astype(np.float32)
  _, new = bn.apply(bn.init(jax.random.key(0), x, train=False), x, train=True,
                    mutable=["batch_stats"])
  np.testing.assert_allclose(new["batch_stats"]["var"], 0.9 + 0.1 * np.var(x, ddof=1),
                             rtol=1e-6)
  y_eval = bn.apply(variables, x, train=False)
  expected = (x - variables["batch_stats"]["mean"]) / np.sqrt(variables["batch_stats"]["var"]
                                                              + 1e-5)
  np.testing.assert_allclose(y_eval, expected, rtol=1e-5, atol=1e-6)


def test_bilinear_first_input_is_index_i():
  rng = np.random.RandomState(0)
  x, z = rng.randn(2, 4).astype(np.float32), rng.randn(2, 3).astype(np.float32)
  layer = Bilinear(5)
  variables = layer.init(jax.random.key(0), x, z)
  kernel = np.asarray(variables["params"]["kernel"])  # (in1, in2, out)
  assert kernel.shape == (4, 3, 5)
  np.testing.assert_allclose(layer.apply(variables, x, z),
                             np.einsum("bi,ijo,bj->bo", x, kernel, z), rtol=1e-5, atol=1e-6)


def test_dropout_masks_follow_example_ids():
  x = jnp.ones((4, 256))
  drop = Dropout(0.5)
  key = {"dropout": jax.random.key(1)}
  y = drop.apply({}, x, deterministic=False, rngs=key)
  assert set(np.unique(np.asarray(y))) <= {0.0, 2.0}
  assert 0.3 < float(jnp.mean(y == 0)) < 0.7
  y_ids = drop.apply({}, x, deterministic=False, example_ids=jnp.array([3, 2, 1, 0]), rngs=key)
  np.testing.assert_array_equal(y_ids, y[::-1])
  np.testing.assert_array_equal(drop.apply({}, x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, deterministic=False), x)


@pytest.fixture(scope="module")
def small_setup():
  model = DSF3N(5, **SMALL)
  rng = np.random.RandomState(0)
  visual = rng.randn(4, 1024).astype(np.float32)
  audio = rng.randn(4, 128).astype(np.float32)
  # Random weights of the model's structure (a jitted init would compile for long).
  template = jax.eval_shape(model.init, jax.random.key(0), visual, audio)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
  values = []
  for path, s in leaves:
    name = "/".join(getattr(k, "key", "") for k in path)
    if name.endswith(("bn/scale", "bn/var", "t_c")):
      values.append(np.ones(s.shape, s.dtype))
    elif name.endswith(("bn/bias", "bn/mean")):
      values.append(np.zeros(s.shape, s.dtype))
    else:  # kernels like PyTorch's init, U(+-1/sqrt(fan_in)); larger in the fusion/classifiers
      fan_in = s.shape[0] if "bilinear" in name else math.prod(s.shape[:-1])
      bound = 0.1 if len(s.shape) == 1 else 1 / math.sqrt(fan_in)
      if "mfa" in name or "classifier" in name:
        bound *= 3
      values.append(rng.uniform(-bound, bound, s.shape).astype(s.dtype))
  return visual, audio, jax.tree_util.tree_unflatten(treedef, values)


def _apply(config, variables, visual, audio, *, train=False, rng=0):
  model = DSF3N(5, **{**SMALL, **config})
  if not train:
    return model.apply(variables, visual, audio)
  out, _ = model.apply(variables, visual, audio, train=True, mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(rng)})
  return out


def _differ(a, b, rel=1e-3):
  return float(jnp.max(jnp.abs(a - b))) > rel * float(jnp.max(jnp.abs(b)))


def test_flags_change_what_they_should(small_setup):
  visual, audio, variables = small_setup
  ref = _apply({}, variables, visual, audio)
  assert _differ(ref.emb_visual[0], ref.emb_visual[1])  # outputs depend on the inputs

  # Dropout: only in train mode, only with a positive rate, and per rng.
  t1 = _apply({}, variables, visual, audio, train=True, rng=1)
  t2 = _apply({}, variables, visual, audio, train=True, rng=2)
  assert _differ(t1.emb_visual, t2.emb_visual)
  z1 = _apply({"dropout_rate": 0.0}, variables, visual, audio, train=True, rng=1)
  z2 = _apply({"dropout_rate": 0.0}, variables, visual, audio, train=True, rng=2)
  np.testing.assert_array_equal(z1.emb_visual, z2.emb_visual)
  assert _differ(z1.emb_visual, ref.emb_visual)  # batch vs running statistics

  # Paper variant: same weights minus w_2, w_4, t_c; a different output.
  mfa = dict(variables["params"]["fusion"]["mfa"])
  for name in ("w_2", "w_4", "t_c"):
    mfa.pop(name)
  paper_vars = {"params": {**variables["params"], "fusion": {"mfa": mfa}},
                "batch_stats": variables["batch_stats"]}
  paper = _apply({"fusion_kw": {"variant": "paper"}}, paper_vars, visual, audio)
  assert _differ(paper.emb_visual, ref.emb_visual)

  # t_c scales the visual side of the gate (reference only).
  mfa_tc = {**variables["params"]["fusion"]["mfa"], "t_c": jnp.array(0.5)}
  tc_vars = {"params": {**variables["params"], "fusion": {"mfa": mfa_tc}},
             "batch_stats": variables["batch_stats"]}
  assert _differ(_apply({}, tc_vars, visual, audio).emb_visual, ref.emb_visual)

  # One fusion stage instead of two.
  one = _apply({"fusion_kw": {"num_stages": 1}}, variables, visual, audio)
  assert _differ(one.emb_visual, ref.emb_visual)

  # Without MFA the head sees the fine-grained tokens themselves.
  no_params = {k: v for k, v in variables["params"].items() if k != "fusion"}
  no_mfa = _apply({"fusion_kw": {"num_stages": 0}},
                  {"params": no_params, "batch_stats": variables["batch_stats"]}, visual, audio)
  assert _differ(no_mfa.emb_visual, ref.emb_visual)
  fine = FineGrainedNet(**{k: SMALL[k] for k in ("stem_features", "stem_kernel", "stem_stride",
                                                 "stem_padding", "branch_features")})
  enc = ModalityEncoder(SMALL["encoder_features"])
  h = enc.apply({"params": variables["params"]["visual_encoder"]}, visual)
  tokens = fine.apply({"params": variables["params"]["visual_fine_grained"],
                       "batch_stats": variables["batch_stats"]["visual_fine_grained"]}, h,
                      train=False)
  head = OutputHead(SMALL["head_kw"]["hidden"], SMALL["embed_dim"])
  expected = head.apply({"params": variables["params"]["head"]}, tokens, train=False)
  np.testing.assert_allclose(no_mfa.emb_visual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("in1, in2, block", [(3, 4, 8), (16, 16, 8), (16, 8, 4), (8, 24, 8),
                                             (16, 4, None)],
                         ids=["one_block", "two_blocks", "four_by_two_blocks",
                              "blocks_of_in2_alone", "unblocked"])
def test_bilinear_hand_written_backward_equals_autodiff(in1, in2, block, monkeypatch):
  """``layers.bilinear``'s blocked product and custom VJP against autodiff of the plain
  formula, float64, over one block, several (of ``in1`` for the product and the inputs'
  gradients, of ``in2`` for the kernel's), and with blocking off."""
  monkeypatch.setattr(layers, "BILINEAR_BLOCK", block)
  with jax.enable_x64(True):
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (5, in1), jnp.float64)
    z = jax.random.normal(k[1], (5, in2), jnp.float64)
    w = jax.random.normal(k[2], (in1, in2, 2), jnp.float64)
    g = jax.random.normal(k[3], (5, 2), jnp.float64)
    plain = lambda x, z, w: jnp.einsum("bi,bj,ijo->bo", x, z, w)
    np.testing.assert_allclose(layers.bilinear(x, z, w), plain(x, z, w), rtol=1e-13)
    loss = lambda f: (lambda *a: jnp.sum(f(*a) * g))
    got = jax.grad(loss(layers.bilinear), argnums=(0, 1, 2))(x, z, w)
    want = jax.grad(loss(plain), argnums=(0, 1, 2))(x, z, w)
    for a, b in zip(got, want):
      np.testing.assert_allclose(a, b, rtol=1e-12)


@pytest.mark.parametrize("missing_partner", ["self", "learned", "mean"])
def test_unimodal_embeddings_read_nothing_of_the_other_modality(missing_partner):
  model = DSF3N(5, **SMALL, missing_partner=missing_partner)
  rng = np.random.default_rng(0)
  visual = rng.normal(size=(4, 1024)).astype(np.float32)
  audio = rng.normal(size=(4, 128)).astype(np.float32)
  variables = model.init(jax.random.key(0), visual, audio)
  if missing_partner == "mean":  # a running mean of the partner's tokens
    _, state = model.apply(variables, visual, audio, train=True, mutable=["batch_stats"],
                           rngs={"dropout": jax.random.key(1)})
    assert float(jnp.abs(state["batch_stats"]["token_mean_audio"]).max()) > 0
    variables = {**variables, **state}
    # With bfloat16 parameters too the running means are float32, as BatchNorm's statistics.
    half = jax.eval_shape(DSF3N(5, **SMALL, missing_partner="mean",
                                param_dtype=jnp.bfloat16).init,
                          jax.random.key(0), visual, audio)["batch_stats"]  # their dtypes
    assert half["token_mean_audio"].dtype == half["visual_fine_grained"]["bn"]["mean"].dtype == (
        jnp.float32)
  emb_v = model.apply(variables, visual, method="embed_visual")
  emb_a = model.apply(variables, audio, method="embed_audio")
  assert emb_v.shape == emb_a.shape == (4, 16)
  # The alone outputs of a paired call are those, bitwise, whatever the other modality is.
  for other_audio in (audio, np.zeros_like(audio), audio[::-1]):
    _, alone = model.apply(variables, visual, other_audio, unimodal=True)
    np.testing.assert_array_equal(alone.emb_visual, emb_v)
  for other_visual in (visual, -visual):
    _, alone = model.apply(variables, other_visual, audio, unimodal=True)
    np.testing.assert_array_equal(alone.emb_audio, emb_a)
  paired = model.apply(variables, visual, audio)
  assert _differ(paired.emb_visual, emb_v)  # the paired embedding does mix the pair


def test_partner_dropout_mixes_paired_and_alone_outputs():
  rng = np.random.default_rng(0)
  visual = rng.normal(size=(16, 1024)).astype(np.float32)
  audio = rng.normal(size=(16, 128)).astype(np.float32)
  base = DSF3N(5, **SMALL, dropout_rate=0.0)
  variables = base.init(jax.random.key(0), visual, audio)

  def train_out(p):
    out, _ = DSF3N(5, **SMALL, dropout_rate=0.0, partner_dropout=p).apply(
        variables, visual, audio, train=True, unimodal=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(3)})
    return out

  paired, alone = train_out(0.0)
  for p, expect in ((1.0, alone), (0.0, paired)):
    np.testing.assert_allclose(train_out(p)[0].emb_visual, expect.emb_visual, atol=1e-6)
  mixed = np.asarray(train_out(0.5)[0].emb_visual)
  from_alone = np.all(np.isclose(mixed, alone.emb_visual, atol=1e-6), axis=1)
  from_paired = np.all(np.isclose(mixed, paired.emb_visual, atol=1e-6), axis=1)
  assert np.all(from_alone | from_paired) and 0 < from_alone.sum() < 16
  with pytest.raises(ValueError, match="missing_partner: expected one of self, learned, mean"):
    DSF3N(5, **SMALL, missing_partner="zeros").init(jax.random.key(0), visual, audio)


def test_the_teacher_is_the_paired_output_with_every_real_partner():
  rng = np.random.default_rng(0)
  visual = rng.normal(size=(16, 1024)).astype(np.float32)
  audio = rng.normal(size=(16, 128)).astype(np.float32)
  variables = DSF3N(5, **SMALL).init(jax.random.key(0), visual, audio)

  def train_out(p, dropout_rate=0.0, **kw):
    out, _ = DSF3N(5, **SMALL, dropout_rate=dropout_rate, partner_dropout=p).apply(
        variables, visual, audio, train=True, unimodal=True, mutable=["batch_stats"],
        rngs={"dropout": jax.random.key(3)}, **kw)
    return out

  def same(a, b, atol=0.0):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)

  paired, alone, teacher = train_out(0.75, teacher=True)
  with_partner, _ = train_out(0.0)
  same(teacher, with_partner, atol=1e-6)
  dropped = ~np.all(np.isclose(paired.emb_visual, teacher.emb_visual, atol=1e-6), axis=1)
  assert 0 < dropped.sum() < 16  # the loss's paired outputs have the stand-in for some
  # Asking for the teacher changes no other output, head dropout included.
  same((paired, alone), train_out(0.75))
  same(train_out(0.75, 0.5, teacher=True)[:2], train_out(0.75, 0.5))
  # Without partner dropout the paired outputs are the teacher.
  same(train_out(0.0, teacher=True)[2], with_partner)


def test_input_noise_is_drawn_per_example_and_only_in_training():
  rng = np.random.default_rng(0)
  visual = rng.normal(size=(8, 1024)).astype(np.float32)
  audio = rng.normal(size=(8, 128)).astype(np.float32)
  variables = DSF3N(5, **SMALL).init(jax.random.key(0), visual, audio)
  model = DSF3N(5, **SMALL, input_noise=0.5)

  def noisy(x, salt, ids, scale=None):
    return model.apply(variables, x, salt, train=True, example_ids=ids, scale=scale,
                       method="_noisy", rngs={"dropout": jax.random.key(7)})

  ids = jnp.arange(8) + 100
  whole = noisy(visual, 0, ids)
  # An example's noise is a function of its global index: a shard of the batch gets the same.
  np.testing.assert_array_equal(noisy(visual[4:], 0, ids[4:]), whole[4:])
  delta = np.asarray(whole) - visual
  assert 0.45 < delta.std() < 0.55 and abs(delta.mean()) < 0.05
  assert not np.allclose(noisy(audio, 1, ids) - audio, delta[:, :128])  # modalities differ
  np.testing.assert_allclose(np.asarray(noisy(visual, 0, ids, scale=1.0)) - visual, 2 * delta,
                             rtol=1e-5, atol=1e-5)  # a traced scale in place of the field
  # Evaluation, and the default (0), see the features as they are.
  np.testing.assert_array_equal(
      model.apply(variables, visual, 0, train=False, example_ids=ids, method="_noisy"), visual)
  np.testing.assert_array_equal(
      DSF3N(5, **SMALL).apply(variables, visual, 0, train=True, example_ids=ids,
                              method="_noisy", rngs={"dropout": jax.random.key(7)}), visual)
  with pytest.raises(ValueError, match="input_noise: expected a standard deviation >= 0"):
    DSF3N(5, **SMALL, input_noise=-1.0).init(jax.random.key(0), visual, audio)
  # A modality embedded alone in train mode draws its noise by example too: a reordered batch
  # gives the reordered embeddings (BatchNorm's batch statistics do not see the order).
  order = np.random.default_rng(1).permutation(8)
  for method, x in (("embed_visual", visual), ("embed_audio", audio)):
    def embed(x, ids, method=method):
      return model.apply(variables, x, train=True, example_ids=ids, method=method,
                         rngs={"dropout": jax.random.key(7)}, mutable=["batch_stats"])[0]
    np.testing.assert_allclose(embed(x[order], ids[order]), embed(x, ids)[order],
                               rtol=1e-5, atol=1e-5, err_msg=method)


def test_a_model_built_directly_names_a_bad_setting():
  """The checks ``config_check`` makes of a config, for a model built in Python. (The modules
  make them as they are called: ``jax.eval_shape`` runs the same calls, without drawing the
  full model's 20 M parameters op by op.)"""
  visual, audio = jnp.zeros((2, 1024)), jnp.zeros((2, 128))

  def init(model):
    return jax.eval_shape(lambda: model.init(jax.random.key(0), visual, audio))

  for kwargs, match in (
      (dict(encoder_features=64), r"encoder features 64: too short for the stem \(kernel 32"),
      (dict(kernel_sizes=()), r"kernel_sizes=\(\), branch_features=.*at least one branch"),
      (dict(fusion_kw={"num_stages": -1}), "num_stages: expected MFA applications >= 0"),
      (dict(dropout_rate=1.5), r"dropout rate: expected a probability in \[0, 1\], got 1.5"),
  ):
    model = DSF3N(3, **kwargs)
    with pytest.raises(ValueError, match=match):
      jax.eval_shape(lambda model=model: model.apply(
          model.init(jax.random.key(0), visual, audio), visual, audio, train=True,
          mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}))
  with pytest.raises(ValueError, match="num_classes: expected a positive int, got 0"):
    init(DSF3N(0))
  init(DSF3N(np.int64(3)))  # a numpy count is a count
