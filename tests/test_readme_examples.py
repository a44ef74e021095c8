"""The README's Extending examples, run as a user runs them: their own files, no edit inside."""

import json
import os
import re
import subprocess
import sys

import pytest

from tests.test_train import REPO, xla_flags


def readme_examples() -> dict[str, str]:
  """``{file name: code}`` of the README blocks marked ``<!-- example: NAME -->``."""
  text = (REPO / "README.md").read_text()
  found = re.findall(r"<!-- example: (\S+) -->\n```python\n(.*?)```", text, flags=re.S)
  return dict(found)


def user_folder(tmp_path, devices: int) -> dict[str, str]:
  """Writes every README example into ``tmp_path``; the environment of a user there (the
  package installed, not on ``PYTHONPATH``) with ``devices`` CPU devices."""
  for name, code in readme_examples().items():
    (tmp_path / name).write_text(code)
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices))
  env.pop("PYTHONPATH", None)
  return env


def test_the_readme_has_its_examples():
  assert {"my_fusion.py", "my_config.py", "my_loss.py", "my_loss_config.py", "my_dataset.py",
          "my_data_config.py", "my_evaluator.py", "my_eval_config.py"} <= set(readme_examples())


def train_example(tmp_path, config: str, *extra, devices: int = 1):
  """``python -m dsf3n_jax.main --config=<config>:runlocal,tiny --workdir=run`` in the user's
  folder on 64 synthetic train and 24 test items, batches of 16; must succeed."""
  proc = subprocess.run([sys.executable, "-m", "dsf3n_jax.main",
                         f"--config={config}:runlocal,tiny", "--workdir=run",
                         "--config.data.synthetic.num_train=64",
                         "--config.data.synthetic.num_test=24", "--config.batch_size=16",
                         "--config.eval_batch_size=16", *extra], cwd=tmp_path,
                        env=user_folder(tmp_path, devices), capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


@pytest.mark.slow
def test_a_users_evaluator_reaches_results_and_tensorboard_and_a_profile_is_written(tmp_path):
  from tests.test_failures import _scalars

  proc = train_example(tmp_path, "my_eval_config.py", "--config.num_epochs=2",
                       "--config.profile_steps=(1, 3)",
                       "--config.selection_metric=recall/unimodal_precision_at_1")
  run = tmp_path / "run"
  final = json.loads((run / "results.json").read_text())["final"]
  assert set(final) == {"first_hit", "recall", "test"}
  assert 1 <= final["first_hit"]["median"] <= 24 and 1 <= final["first_hit"]["mean"] <= 24
  for key in ("precision_at_1", "recall_at_5", "unimodal_precision_at_5_audio_to_visual"):
    assert 0 <= final["recall"][key] <= 1, final["recall"]
  scalars = _scalars(run / "tensorboard")
  assert len(scalars["first_hit/median"]) == 2  # every_epochs: runlocal's 1, 2 epochs
  assert len(scalars["recall/unimodal_precision_at_1"]) == 2  # every 4 of the 8 steps
  # Before the last evaluation only the selection metric's protocol (unimodal) is computed.
  assert len(scalars["recall/precision_at_1"]) == 1
  best = json.loads((run / "results.json").read_text())["best"]  # selected by that evaluator
  assert (best["selected_on"], best["metric"]) == ("recall", "unimodal_precision_at_1")
  assert best["value"] == pytest.approx(max(scalars["recall/unimodal_precision_at_1"]), rel=1e-6)
  traces = list((run / "profile").rglob("*.xplane.pb"))
  assert traces and all(t.stat().st_size > 0 for t in traces), list(run.rglob("*"))
  assert "profile of steps 2-3 written to" in proc.stderr


@pytest.mark.slow
def test_a_custom_fusion_trains_resumes_and_is_read_back_by_retrieve(tmp_path):
  env = user_folder(tmp_path, 1)
  small = ["--config.data.synthetic.num_train=64", "--config.data.synthetic.num_test=24",
           "--config.batch_size=16", "--config.eval_batch_size=16"]

  def main(*extra):
    return subprocess.run([sys.executable, "-m", "dsf3n_jax.main",
                           "--config=my_config.py:runlocal,tiny", "--workdir=run", *small,
                           *extra], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)

  bad = main("--config.num_epochs=1", "--config.model.fusion_kw.gate_init=open")
  assert bad.returncode == 2 and "config.model.fusion_kw.gate_init" in bad.stderr, bad.stderr
  first = main("--config.num_epochs=1")
  assert first.returncode == 0, first.stderr[-3000:]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["fusion"] == "my_fusion:gated_sum"
  assert saved["model"]["fusion_kw"] == {"gate_init": 0.5}  # MFA's settings gone
  resumed = main("--config.num_epochs=2")  # resumes the same workdir
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["epochs"] == 2
  shown = subprocess.run([sys.executable, "-m", "dsf3n_jax.retrieve", "--workdir=run",
                          "--checkpoint=latest", "--queries=0,1", "--k=3"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
  assert shown.returncode == 0, shown.stderr[-3000:]
  assert shown.stdout.count("query audio row") == 2 and "rank" in shown.stdout
  # retrieve rebuilt the user's fusion with the trained weights: the run's own final test mAP.
  average, protocol = re.search(r"average (\d\.\d{4})  \((\w+) protocol\)",
                                shown.stdout).groups()
  key = "map_average" if protocol == "paired" else f"{protocol}_map_average"
  assert float(average) == pytest.approx(results["final"]["test"][key], abs=1e-4), (
      shown.stdout, results["final"]["test"])


@pytest.mark.slow
def test_a_users_tfds_dataset_trains_by_name(tmp_path):
  env = user_folder(tmp_path, 1)
  proc = subprocess.run([sys.executable, "-m", "dsf3n_jax.main",
                         "--config=my_data_config.py:runlocal,tiny", "--workdir=run",
                         f"--config.data.data_dir={tmp_path / 'tfds'}",
                         "--config.num_epochs=1"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads((tmp_path / "run" / "results.json").read_text())
  assert results["final"]["test"]["num_examples"] == 30
  assert results["data"]["tfds"].startswith("my_pairs/")
  assert results["data"]["sizes"] == {"train": 96, "test": 30}


@pytest.mark.slow
def test_a_loss_term_with_a_learnable_temperature_trains_and_is_read_back(tmp_path):
  train_example(tmp_path, "my_loss_config.py", "--config.num_epochs=1", devices=2)
  env = user_folder(tmp_path, 2)
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["loss_terms"]["infonce"] == "my_loss:infonce"
  train_rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()
                if '"split": "train"' in line]
  assert train_rows and all(row["infonce"] > 0 for row in train_rows)
  # A new process that never imported my_loss reads the run back (the recorded module).
  shown = subprocess.run([sys.executable, "-c", (
      "import json; from dsf3n_jax import train;"  # the checkpoint holds the temperature
      "model, variables, config = train.restore_model('run');"
      "print(json.dumps(dict(config.loss.terms)))")], cwd=tmp_path, env=env,
      capture_output=True, text=True, timeout=600)
  assert shown.returncode == 0, shown.stderr[-3000:]
  assert json.loads(shown.stdout.strip().splitlines()[-1])["infonce"] == 0.1


def _known_flags(tool: str) -> set[str]:
  """The flags of ``python -m dsf3n_jax.<tool>``: its argparse parser's; an absl tool's own,
  with ``main``'s (which it extends) and absl's (``--noX`` of a boolean too); those of the
  ``tfds build`` parser that ``datasets.build`` runs."""
  import importlib

  from absl import flags
  module = importlib.import_module(f"dsf3n_jax.{tool}")
  if hasattr(module, "_parser"):
    return {o for a in module._parser()._actions for o in a.option_strings}
  if tool == "datasets.build":  # its own process: the tfds parser takes absl's flags too
    out = subprocess.run([sys.executable, "-m", "dsf3n_jax.datasets.build", "--help"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    return set(re.findall(r"--[a-z_]+", out.stdout))
  by_module = flags.FLAGS.flags_by_module_dict()
  assert module.__name__ in by_module, f"dsf3n_jax.{tool}: no parser and no absl flags"
  names = set()
  for name, defined in by_module.items():
    if name in (module.__name__, "dsf3n_jax.main") or name.startswith("absl."):
      for f in defined:
        names.update({f.name, f"no{f.name}"} if f.boolean else {f.name})
  return {f"--{n}" for n in names}


def test_every_documented_command_line_uses_flags_its_tool_has():
  """Each ``python -m dsf3n_jax.<tool> --flag`` line of the README and docs names flags that
  the tool has (the README once passed visualize ``--out=`` for ``--out_dir``)."""
  checked, tools = 0, set()
  for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
    for n, line in enumerate(doc.read_text().splitlines(), 1):
      for tool, rest in re.findall(r"python -m dsf3n_jax\.([\w.]+)((?: +[^ #|&;]+)*)", line):
        used = re.findall(r"(?<![\w-])(--[a-z_]+)", rest)
        if not used:
          continue
        known = _known_flags(tool)
        tools.add(tool)
        for flag in used:
          assert flag in known, f"{doc.name}:{n}: dsf3n_jax.{tool} has no {flag} ({line.strip()})"
          checked += 1
  assert {"main", "sweep", "convert", "datasets.build", "retrieve"} <= tools, tools
  assert checked >= 60, checked


def test_the_model_docs_python_api_runs_as_written():
  """docs/model.md's Python API block, run as it is: forward, loss, gradients, conversion."""
  text = (REPO / "docs" / "model.md").read_text()
  block = text[text.index("## Python API"):].split("```python\n", 1)[1].split("```", 1)[0]
  names = {}
  exec(compile(block, "docs/model.md", "exec"), names)  # noqa: S102 - the docs' own code
  assert names["out"].emb_visual.shape == (8, 64)
  assert names["grads_sd"].keys() <= names["sd"].keys() and len(names["grads_sd"]) > 10
