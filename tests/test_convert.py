"""dsf3n_jax.convert: key names, layouts, round trips, errors, and the command line."""

import json
import logging
import pathlib
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from benchmarks import torch_dsf3n  # noqa: E402
from dsf3n_jax import convert  # noqa: E402
from dsf3n_jax.models import DSF3N  # noqa: E402

SMALL = dict(encoder_features=256, stem_features=16, stem_kernel=8, stem_stride=2,
             stem_padding=3, branch_features=(16, 32, 64), head_kw={"hidden": 64},
             embed_dim=16, classifier_kw={"hidden": 8})


@pytest.fixture(scope="module")
def torch_state():
  """The full reference model's state dict (float32 torch tensors), 10 classes."""
  torch.manual_seed(0)
  return torch_dsf3n.CrossModalNN(10).state_dict()


def _np(state_dict, *, num_batches_tracked=False):
  return {k: v.numpy() for k, v in state_dict.items()
          if num_batches_tracked or not k.endswith("num_batches_tracked")}


def test_key_names_match_the_original(torch_state):
  expected = {
      "visual_layer.visual_encoder.weight", "audio_layer.audio_encoder.bias",
      "MmFA.joint_attention_map.weight", "MmFA.t_c", "MmFA.w_4.bias",
      "visual_fine_grained_feature.BN.running_var", "visual_fine_grained_feature.conv1.weight",
      "audio_fine_grained_feature.conv7_3.bias", "out_layer.0.weight", "out_layer.3.bias",
      "classifier_visual.classifier.0.weight", "classifier_audio.classifier.3.weight",
  }
  assert expected <= set(torch_state)
  assert torch_state["MmFA.t_c"].shape == ()
  assert tuple(torch_state["MmFA.joint_attention_map.weight"].shape) == (256, 256, 256)
  variables = convert.variables_template(DSF3N(10))
  assert set(convert.torch_key_map(variables)) == set(_np(torch_state))


def test_round_trip_torch_flax_torch_is_exact(torch_state):
  variables = convert.from_torch_state_dict(torch_state)
  assert set(variables) == {"params", "batch_stats"}
  template = convert.variables_template(DSF3N(10))
  got_shapes = jax.tree.map(np.shape, variables)
  assert got_shapes == jax.tree.map(lambda s: tuple(s.shape), template)
  p = variables["params"]
  w = torch_state["MmFA.joint_attention_map.weight"].numpy()
  np.testing.assert_array_equal(p["fusion"]["mfa"]["bilinear"]["kernel"], w.transpose(1, 2, 0))
  conv = torch_state["visual_fine_grained_feature.conv5_2.weight"].numpy()
  np.testing.assert_array_equal(p["visual_fine_grained"]["conv5_2"]["kernel"],
                                conv.transpose(2, 1, 0))
  np.testing.assert_array_equal(p["head"]["hidden"]["kernel"],
                                torch_state["out_layer.0.weight"].numpy().T)
  back = convert.to_torch_state_dict(variables)
  original = _np(torch_state, num_batches_tracked=True)  # 0 in an untrained net
  assert [k for k in back if not k.endswith("num_batches_tracked")] == list(
      convert.torch_key_map(variables))
  assert set(back) == set(original)
  for k, v in original.items():
    assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
    np.testing.assert_array_equal(back[k], v, err_msg=k)


@pytest.mark.parametrize("variant", [
    dict(fusion_kw={"variant": "paper"}), dict(fusion_kw={"num_stages": 0}),
    dict(kernel_sizes=(3, 5, 7, 9)),
    dict(branch_features=(16, 32, 48, 64))], ids=["paper", "no_mfa", "four_kernels",
                                                 "four_stages"])
def test_round_trip_of_other_configurations(variant):
  config = {**SMALL, **variant}
  torch.manual_seed(1)
  net = torch_dsf3n.CrossModalNN(7, **config)
  variables = convert.from_torch_state_dict(net.state_dict(), model=DSF3N(7, **config))
  back = convert.to_torch_state_dict(variables)
  original = _np(net.state_dict(), num_batches_tracked=True)
  assert set(back) == set(original)
  for k, v in original.items():
    np.testing.assert_array_equal(back[k], v, err_msg=k)
  net2 = torch_dsf3n.CrossModalNN(7, **config)
  net2.load_state_dict({k: torch.from_numpy(v) for k, v in back.items()})  # strict


@pytest.fixture(scope="module")
def small_variables():
  """Random variables with the structure of a reduced-width ``DSF3N`` (4 classes)."""
  template = convert.variables_template(DSF3N(4, **SMALL))
  rng = np.random.RandomState(0)
  return jax.tree.map(lambda s: rng.uniform(-0.1, 0.1, s.shape).astype(s.dtype), template)


def test_flax_variables_load_into_torch(small_variables):
  sd = convert.to_torch_state_dict(small_variables)
  net = torch_dsf3n.CrossModalNN(4, **SMALL)
  missing, unexpected = net.load_state_dict({k: torch.from_numpy(np.asarray(v))
                                             for k, v in sd.items()})
  assert not missing and not unexpected
  assert int(net.visual_fine_grained_feature.BN.num_batches_tracked) == 0


def test_num_batches_tracked_is_the_step_count_pytorch_would_have(small_variables):
  net = torch_dsf3n.CrossModalNN(4, **SMALL)
  v, a = torch.randn(6, 1024), torch.randn(6, 128)
  net.train()
  for _ in range(3):  # PyTorch counts one per train-mode forward of each BatchNorm
    net(v, a)
  sd = convert.to_torch_state_dict(small_variables, num_batches_tracked=3)
  for k, ref in net.state_dict().items():
    if k.endswith("num_batches_tracked"):
      assert sd[k].dtype == np.int64 and sd[k].shape == () and int(sd[k]) == int(ref) == 3, k
  keys = list(sd)
  for prefix in ("visual_fine_grained_feature.BN.", "audio_fine_grained_feature.BN."):
    i = keys.index(prefix + "running_var")
    assert keys[i + 1] == prefix + "num_batches_tracked"  # where PyTorch has it
  net2 = torch_dsf3n.CrossModalNN(4, **SMALL)
  net2.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()})  # strict
  assert int(net2.audio_fine_grained_feature.BN.num_batches_tracked) == 3
  # A params-only tree (e.g. gradients) has no BatchNorm buffers at all.
  assert not any("num_batches_tracked" in k for k in convert.to_torch_state_dict(
      small_variables["params"], num_batches_tracked=3))
  with pytest.raises(ValueError, match="num_batches_tracked"):
    convert.to_torch_state_dict(small_variables, num_batches_tracked=-1)


def test_params_only_tree_converts(small_variables):
  grads = jax.tree.map(lambda x: np.ones_like(x), small_variables["params"])
  sd_bare = convert.to_torch_state_dict(grads)
  sd_wrapped = convert.to_torch_state_dict({"params": grads})
  assert set(sd_bare) == set(sd_wrapped)
  assert not any("running" in k for k in sd_bare)
  assert "MmFA.joint_attention_map.weight" in sd_bare
  # And back, with a params-only template.
  back = convert.from_torch_state_dict(sd_bare, template={"params": grads})
  assert set(back) == {"params"}


def test_torch_tensors_numpy_and_module_prefix_agree(torch_state):
  from_tensors = convert.from_torch_state_dict(torch_state)
  from_numpy = convert.from_torch_state_dict(
      {"module." + k: v.numpy() for k, v in torch_state.items()})
  jax.tree.map(np.testing.assert_array_equal, from_tensors, from_numpy)
  # A bfloat16 checkpoint (numpy has no bfloat16): its values, exactly.
  half = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
          for k, v in torch_state.items()}
  from_half = convert.from_torch_state_dict(half)
  want = convert.from_torch_state_dict({k: v.float() if v.is_floating_point() else v
                                        for k, v in half.items()})
  jax.tree.map(np.testing.assert_array_equal, from_half, want)


def test_dtype_cast(torch_state):
  variables = convert.from_torch_state_dict(torch_state, dtype=np.float64)
  assert {v.dtype for v in jax.tree.leaves(variables)} == {np.dtype(np.float64)}


def test_missing_unexpected_and_misshaped_keys_are_named(torch_state):
  sd = dict(torch_state)
  del sd["MmFA.w_2.weight"]
  sd["visual_fine_grained_feature.conv9_1.weight"] = torch.zeros(64, 64, 9)
  sd["out_layer.3.bias"] = torch.zeros(65)
  with pytest.raises(ValueError) as info:
    convert.from_torch_state_dict(sd)
  msg = str(info.value)
  assert "missing keys ['MmFA.w_2.weight']" in msg
  assert "visual_fine_grained_feature.conv9_1.weight" in msg and "unexpected" in msg
  assert "out_layer.3.bias: expected (64,), got (65,)" in msg


def test_non_strict_ignores_unexpected_keys_with_a_warning(torch_state):
  sd = dict(torch_state)
  extra = ["visual_fine_grained_feature.conv9_1.weight",
           "audio_fine_grained_feature.out_layer_1.weight"]
  for k in extra:
    sd[k] = torch.zeros(3)
  with pytest.raises(ValueError, match=r"conv9_1.*--no_strict in convert"):
    convert.from_torch_state_dict(sd)
  with pytest.warns(UserWarning, match="out_layer_1"):
    variables = convert.from_torch_state_dict(sd, strict=False)
  reference = convert.from_torch_state_dict(torch_state)
  jax.tree.map(np.testing.assert_array_equal, variables, reference)


def test_num_classes_is_read_off_the_state_dict():
  net = torch_dsf3n.CrossModalNN(15)
  variables = convert.from_torch_state_dict(net.state_dict())
  assert variables["params"]["visual_classifier"]["logits"]["kernel"].shape == (32, 15)
  with pytest.raises(KeyError, match="classifier_visual.classifier.3.weight"):
    convert.num_classes_of({})


def test_command_line_both_directions(tmp_path, torch_state):
  pth = tmp_path / "audio_image_vegas_best_.pth"
  torch.save(torch_state, pth)  # what the original's train_model.py writes
  npz = convert.main([str(pth), str(tmp_path / "flax"), "--format", "npz"])
  assert npz == tmp_path / "flax" / "variables.npz"
  loaded = convert.load_npz(npz)
  assert "params/fusion/mfa/bilinear/kernel" in np.load(npz).files
  from dsf3n_jax import retrieval
  assert retrieval.load_variables(npz)[1]["num_classes"] == 10  # what --variables needs
  jax.tree.map(np.testing.assert_array_equal, loaded, convert.from_torch_state_dict(torch_state))
  out = convert.main(["--to_torch", str(npz), str(tmp_path / "back.pth")])
  back = torch.load(out, weights_only=True)
  original = _np(torch_state, num_batches_tracked=True)
  assert set(back) == set(original)
  for k, v in original.items():
    np.testing.assert_array_equal(back[k].numpy(), v, err_msg=k)
  net = torch_dsf3n.CrossModalNN(10)
  net.load_state_dict(back)  # strict
  out = convert.main(["--to_torch", str(npz), str(tmp_path / "trained.pth"),
                      "--num_batches_tracked", "1720"])
  net.load_state_dict(torch.load(out, weights_only=True))
  assert int(net.visual_fine_grained_feature.BN.num_batches_tracked) == 1720


def test_command_line_variants_and_errors(tmp_path):
  net = torch_dsf3n.CrossModalNN(3, mfa_variant="paper")
  pth = tmp_path / "paper.pth"
  torch.save({"state_dict": net.state_dict()}, pth)
  with pytest.raises(ValueError, match="missing keys .*MmFA.w_2.weight"):
    convert.main([str(pth), str(tmp_path / "a")])
  path = convert.main([str(pth), str(tmp_path / "b"), "--mfa_variant", "paper", "--format",
                       "npz"])
  assert "params/fusion/mfa/w_1/kernel" in np.load(path).files
  assert "params/fusion/mfa/t_c" not in np.load(path).files
  with pytest.raises(SystemExit):
    convert.main([str(pth), str(tmp_path / "c"), "--format", "nope"])
  with pytest.raises(SystemExit):
    convert.main([str(tmp_path / "absent.pth"), str(tmp_path / "d")])


def test_command_line_writes_a_workdir_that_training_code_reads(tmp_path, torch_state,
                                                               monkeypatch):
  from dsf3n_jax import train
  from dsf3n_jax.training.workdir import WorkdirError

  pth = tmp_path / "audio_image_vegas_best_.pth"
  torch.save(torch_state, pth)
  ckpt = convert.main([str(pth), str(tmp_path / "run")])  # orbax is the default
  assert ckpt == tmp_path / "run" / "checkpoints" / "0"
  model, variables, config = train.restore_model(str(tmp_path / "run"))
  assert model.num_classes == 10 and config.model.fusion_kw.variant == "reference"
  expected = convert.from_torch_state_dict(torch_state)
  jax.tree.map(np.testing.assert_array_equal, variables, expected)
  # Its config names the default data, which these weights never saw: the tools ask for data.
  from dsf3n_jax import retrieve
  with pytest.raises(ValueError, match=r"converted weights, trained on no dataset of its "
                     r"config: name the data to embed with --data=FILE"):
    retrieve.main([f"--workdir={tmp_path / 'run'}", "--queries=0"])
  # A folder that holds a run is refused, by the command line (before reading the weights)
  # and by the writer under it; the run is left as it was.
  before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
  with pytest.raises(SystemExit):
    convert.main([str(pth), str(tmp_path / "run")])
  with pytest.raises(WorkdirError, match="holds a run already"):
    train.save_variables_as_run(str(tmp_path / "run"), variables, config=config)
  assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
  # A conversion that fails leaves nothing: no folder, no temporary one.
  sd = dict(torch_state)
  sd["out_layer.0.weight"] = sd["out_layer.0.weight"].clone()
  sd["out_layer.0.weight"][0, 0] = float("nan")
  torch.save(sd, tmp_path / "nan.pth")
  with pytest.raises(ValueError, match=r"nan\.pth: .*non-finite.*out_layer\.0\.weight \(1 of"):
    convert.main([str(tmp_path / "nan.pth"), str(tmp_path / "nan")])
  assert not (tmp_path / "nan").exists() and not list(tmp_path.glob(".nan*"))
  (tmp_path / "empty").mkdir()  # an empty folder is a new one; a relative one as it reads
  monkeypatch.chdir(tmp_path)
  assert convert.main([str(pth), "empty"]) == tmp_path / "empty/checkpoints/0"


@pytest.mark.parametrize("kind", ["pickle", "object_array", "random_bytes", "hdf5", "npy",
                                  "zip_of_other_things", "empty"])
def test_load_npz_refuses_what_is_not_an_npz_of_arrays(bad_npz_files, assert_refused_npz,
                                                       kind):
  from dsf3n_jax.datasets import DataValidationError
  path = bad_npz_files[kind]
  with pytest.raises(DataValidationError) as e:
    convert.load_npz(path)
  assert_refused_npz(str(e.value), path)


def test_command_line_refuses_a_pickle_in_one_error_line(bad_npz_files, tmp_path):
  import os
  import subprocess

  from dsf3n_jax import cli
  env = {k: v for k, v in os.environ.items() if k != cli.VERBOSE_ENV}
  for kind in ("pickle", "object_array", "hdf5"):
    src = bad_npz_files[kind]
    proc = subprocess.run([sys.executable, "-m", "dsf3n_jax.convert", "--to_torch", str(src),
                           str(tmp_path / "out.pth")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}: "), lines
    assert "expected a variables .npz of arrays" in lines[0] and "allow_pickle" not in lines[0]
    assert not (tmp_path / "out.pth").exists()


def test_a_trained_run_exports_to_pytorch_scalars_as_scalars_and_converts_back(tmp_path,
                                                                              caplog):
  """Run -> .pth (the original's CrossModal_NN loads it strictly) -> flax: shapes compared
  exactly (torch accepts (1,) for a scalar and numpy broadcasts; neither hides it here)."""
  from dsf3n_jax import train
  from tests.test_train import tiny_config
  run = tmp_path / "run"
  train.train_and_evaluate(tiny_config(**{"num_epochs": 1, "eval_every_epochs": 1}), str(run))
  with caplog.at_level(logging.WARNING):
    pth = convert.main(["--to_torch", str(run), str(tmp_path / "run.pth")])
  assert not [r for r in caplog.records if "read only" in r.getMessage()
              or "read_only" in r.getMessage()]  # orbax's notices of a read-only manager
  saved = torch.load(pth, weights_only=True)
  _, variables, config = train.restore_model(str(run), which="best")
  expected = convert.to_torch_state_dict(variables, num_batches_tracked=6)
  assert set(saved) == set(expected)
  for k, v in expected.items():
    assert tuple(saved[k].shape) == tuple(np.shape(v)), k
  assert tuple(saved["MmFA.t_c"].shape) == ()
  assert int(saved["visual_fine_grained_feature.BN.num_batches_tracked"]) == 6  # the step
  del config
  fields = json.loads((run / "config.json").read_text())["model"]  # as the run recorded it
  torch_fields = ("visual_dim", "audio_dim", "encoder_features", "kernel_sizes",
                  "stem_features", "stem_kernel", "stem_stride", "stem_padding",
                  "branch_features", "fusion_kw", "head_kw", "classifier_kw", "embed_dim")
  net = torch_dsf3n.CrossModalNN(fields["num_classes"],
                                 **{k: fields[k] for k in torch_fields})
  net.load_state_dict(saved, strict=True)
  back = convert.from_torch_state_dict(convert.load_torch_checkpoint(pth),
                                       model=train.build_model(fields, axis_name=None))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(variables)):
    assert np.shape(a) == np.shape(b)
    np.testing.assert_array_equal(a, b)
  latest = convert.main(["--to_torch", str(run), str(tmp_path / "latest.pth"), "--checkpoint",
                         "latest"])
  assert latest.exists()
  # Back by the command line: the sizes the shapes do not hold (a tiny model's stem stride)
  # come from the file written beside the .pth; the converted run exports again by default.
  sizes = json.loads(convert.fields_path(pth).read_text())
  assert sizes["stem_stride"] == fields["stem_stride"] and sizes["num_classes"] == 5
  again = convert.main([str(pth), str(tmp_path / "again")])
  assert again == tmp_path / "again" / "checkpoints" / "0"
  _, converted, _ = train.restore_model(str(tmp_path / "again"), which="best")
  jax.tree.map(np.testing.assert_array_equal, converted, variables)
  # ... as the .pth it came from, num_batches_tracked included (the run, not trained since,
  # keeps the .pth's counts in its torch_source.json; its own step is 0).
  twice = convert.main(["--to_torch", str(tmp_path / "again"), str(tmp_path / "twice.pth")])
  back = torch.load(twice, weights_only=True)
  assert set(back) == set(saved)
  for k, v in back.items():
    np.testing.assert_array_equal(v.numpy(), saved[k].numpy(), err_msg=k)
    assert v.dtype == saved[k].dtype and v.shape == saved[k].shape, k


def test_each_batch_norm_keeps_its_own_count_through_a_converted_run(small_variables, tmp_path):
  """A .pth's num_batches_tracked (one per BatchNorm, whatever they are) are what a run
  converted from it records (not a model variable) and what --to_torch writes back, plus the
  steps the run trained since; a run not converted from a .pth exports its step."""
  net = torch_dsf3n.CrossModalNN(4, **SMALL)
  net.visual_fine_grained_feature.BN.num_batches_tracked.fill_(1720)
  net.audio_fine_grained_feature.BN.num_batches_tracked.fill_(1721)
  counts = {"visual_fine_grained_feature.BN.num_batches_tracked": 1720,
            "audio_fine_grained_feature.BN.num_batches_tracked": 1721}
  assert convert.num_batches_tracked_of(
      {"module." + k: v for k, v in net.state_dict().items()}) == counts
  assert sorted(convert.num_batches_tracked_keys(small_variables)) == sorted(counts)
  sd = convert.to_torch_state_dict(small_variables, num_batches_tracked=counts)
  assert {k: int(sd[k]) for k in counts} == counts and sd[next(iter(counts))].dtype == np.int64
  with pytest.raises(ValueError, match=r"no count for \['visual_fine_grained_feature"):
    convert.to_torch_state_dict(small_variables, num_batches_tracked={
        "audio_fine_grained_feature.BN.num_batches_tracked": 3})
  source = convert._torch_source(tmp_path / "in.pth", net.state_dict(), small_variables)
  assert source["num_batches_tracked"] == counts and source["step"] == 0
  assert convert.run_num_batches_tracked(tmp_path, 7) == 7  # no torch_source.json: the step
  (tmp_path / convert.TORCH_SOURCE).write_text(json.dumps(source))
  assert convert.run_num_batches_tracked(tmp_path, 0) == counts
  assert convert.run_num_batches_tracked(tmp_path, 5) == {k: v + 5 for k, v in counts.items()}
  (tmp_path / convert.TORCH_SOURCE).write_text("{}")
  with pytest.raises(ValueError, match=r"torch_source.json: expected a JSON object with 'step'"):
    convert.run_num_batches_tracked(tmp_path, 0)


def test_usage_errors_name_the_argument_given_and_exit_2(tmp_path, capsys):
  from dsf3n_jax import cli
  (tmp_path / "not_a_run").mkdir()
  np.savez(tmp_path / "v.npz", x=np.zeros(2))
  for argv, line in (
      (["--to_torch", str(tmp_path / "not_a_run"), str(tmp_path / "o.pth")],
       f"error: --to_torch {tmp_path / 'not_a_run'}: no training run here (config.json not "
       "found); expected a training run's folder or a variables .npz"),
      (["--to_torch", str(tmp_path / "v.npz"), str(tmp_path / "o.pth"),
        "--num_batches_tracked=-1"],
       "error: --num_batches_tracked=-1: expected an int >= 0 (the training steps the weights "
       "had)"),
      ([str(tmp_path / "v.npz"), str(tmp_path / "out"), f"--model_config={tmp_path / 'no.json'}"],
       f"error: --model_config={tmp_path / 'no.json'}: no such file")):
    capsys.readouterr()
    assert cli.run(convert.main, argv) == 2, argv
    assert capsys.readouterr().err.splitlines() == [line]
  assert not (tmp_path / "o.pth").exists() and not (tmp_path / "out").exists()


def test_a_flag_of_the_other_direction_is_refused_not_ignored(tmp_path, capsys):
  """Each flag of one direction, given in the other: a usage error naming the flag and its
  direction (exit status 2), before anything is read or written."""
  from dsf3n_jax import cli
  np.savez(tmp_path / "v.npz", x=np.zeros(2))
  (tmp_path / "in.pth").write_bytes(b"not read")
  to_torch = ["--to_torch", str(tmp_path / "v.npz"), str(tmp_path / "o.pth")]
  to_run = [str(tmp_path / "in.pth"), str(tmp_path / "out")]
  run_side = "a flag of the .pth -> run direction (without --to_torch); not read with --to_torch"
  torch_side = "a flag of --to_torch (a run or variables .npz -> .pth); not read without it"
  for argv, line in (
      ([*to_torch, "--format", "npz"], f"--format=npz: {run_side}"),
      ([*to_torch, "--format=orbax"], f"--format=orbax: {run_side}"),
      ([*to_torch, "--num_classes=3"], f"--num_classes=3: {run_side}"),
      ([*to_torch, f"--model_config={tmp_path / 'm.json'}"],
       f"--model_config={tmp_path / 'm.json'}: {run_side}"),
      ([*to_torch, "--mfa_variant=paper"], f"--mfa_variant=paper: {run_side}"),
      ([*to_torch, "--no_mfa"], f"--no_mfa: {run_side}"),
      ([*to_torch, "--kernel_sizes=3,5"], f"--kernel_sizes=3,5: {run_side}"),
      ([*to_torch, "--no_strict"], f"--no_strict: {run_side}"),
      ([*to_run, "--checkpoint=latest"], f"--checkpoint=latest: {torch_side}"),
      ([*to_run, "--num_batches_tracked=5"], f"--num_batches_tracked=5: {torch_side}"),
      # A variables file holds one set of weights: no checkpoint to choose.
      ([*to_torch, "--checkpoint=best"],
       f"--checkpoint=best: read with --to_torch of a training run's folder only; "
       f"{tmp_path / 'v.npz'} is a variables file (one set of weights)")):
    capsys.readouterr()
    assert cli.run(convert.main, argv) == 2, argv
    assert capsys.readouterr().err.splitlines() == [f"error: {line}"], argv
  assert not (tmp_path / "o.pth").exists() and not (tmp_path / "out").exists()


def test_a_file_that_is_not_a_pth_is_one_error_line(tmp_path):
  bad = tmp_path / "features.npz"
  np.savez(bad, x=np.zeros(3))
  with pytest.raises(ValueError,
                     match=r"features.npz: not a PyTorch state dict file \(.pth\)") as e:
    convert.load_torch_checkpoint(bad)
  assert "\n" not in str(e.value)
  np.save(tmp_path / "array.npy", np.zeros(3))  # a pickle torch refuses: not its advice
  with pytest.raises(ValueError, match=r"array\.npy: not a PyTorch state dict") as e:
    convert.load_torch_checkpoint(tmp_path / "array.npy")
  assert "weights_only set to False" not in str(e.value) and "trusted" not in str(e.value)
  with pytest.raises(SystemExit):  # a missing run folder or file: argparse's one line
    convert.main(["--to_torch", str(tmp_path / "absent"), str(tmp_path / "x.pth")])
