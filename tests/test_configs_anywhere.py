"""Config files load by absolute or relative path from any working directory.

Every subprocess here runs in a temporary directory with no ``PYTHONPATH``: only
``dsf3n_jax.main`` itself can make ``from configs import default`` work there. A whole run
that way (our config by its absolute path, from another directory): test_train.py's
command-line test.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from configs import default
from tests.test_train import _user_env

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.py") if p.name != "__init__.py")


def _main(cwd, *flags):
  return subprocess.run([sys.executable, "-m", "dsf3n_jax.main", *flags], cwd=cwd,
                        env=_user_env(8), capture_output=True, text=True, timeout=120)


def _parse_as_main(cwd, spec):
  """The config ``--config=spec`` gives: main's search path, then ml_collections' loader."""
  code = textwrap.dedent(f"""
      import json, sys
      from ml_collections.config_flags.config_flags import ConfigFileFlagParser
      from dsf3n_jax import main
      main.config_search_path(["--config={spec}"])
      config = ConfigFileFlagParser("config").parse({spec!r})
      print(json.dumps(config.to_dict(), default=str))
  """)
  proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=_user_env(8),
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_loads_by_absolute_path_from_another_directory(tmp_path, name):
  # batch_size 0 stops the run at the config check, after the file and its variant loaded.
  proc = _main(tmp_path, f"--config={REPO / 'configs' / name}:tiny", "--config.batch_size=0",
               f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 2, proc.stderr
  assert "error: config.batch_size=0: expected" in proc.stderr, proc.stderr
  assert "No module named" not in proc.stderr
  assert not (tmp_path / "run").exists()


def test_relative_path_and_variants_from_another_directory(tmp_path):
  rel = os.path.relpath(REPO / "configs" / "paired_features.py", tmp_path)
  assert not rel.startswith("configs")
  config = _parse_as_main(tmp_path, f"{rel}:unimodal,tiny")
  assert config["data"]["name"] == "paired_features"
  assert config["selection_metric"] == "unimodal_map_average"  # :unimodal
  assert config["model"]["embed_dim"] == 16  # :tiny
  assert config["num_epochs"] == 20  # paired_features' 10, doubled by :unimodal


def _user_config(folder, body):
  folder.mkdir(parents=True, exist_ok=True)
  (folder / "my_helpers.py").write_text("EPOCHS = 3\n")  # a module beside the user's config
  path = folder / "my_config.py"
  path.write_text(textwrap.dedent(body))
  return path


USER_CONFIG = """
    from configs import default, paired_features

    import my_helpers


    def get_config(arg=None):
      config = paired_features.get_config()
      config.data.path = "features.npz"
      config.num_epochs = my_helpers.EPOCHS
      config.keep_checkpoints = {keep}
      return default.apply_variants(config, arg)
"""


def test_a_users_config_outside_the_repository_builds_on_ours(tmp_path):
  _user_config(tmp_path, USER_CONFIG.format(keep=1))
  config = _parse_as_main(tmp_path, "my_config.py:runlocal,tiny")
  assert config["data"]["name"] == "paired_features"  # ours
  assert config["optim"]["schedule"] == "cosine"  # ours
  assert config["data"]["path"] == "features.npz"  # the user's
  assert config["model"]["embed_dim"] == 16  # :tiny
  assert config["num_epochs"] == 2  # my_helpers.EPOCHS, then :runlocal


def test_a_users_config_on_the_command_line(tmp_path):
  # The user's config changes a field to a bad value: the one error line shows that main
  # loaded the user's file, and our configs and the module beside it through it.
  folder = tmp_path / "elsewhere"
  _user_config(folder, USER_CONFIG.format(keep=0))
  for cwd, spec in ((folder, "my_config.py:tiny"), (tmp_path, str(folder / "my_config.py"))):
    proc = _main(cwd, f"--config={spec}", f"--workdir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: config.keep_checkpoints=0: expected an int >= 1"], proc.stderr


def test_a_users_configs_folder_adds_to_ours(tmp_path):
  # A `configs` folder in the working directory: its modules join our package.
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "mine.py").write_text(textwrap.dedent("""
      from configs import default, synthetic

      def get_config(arg=None):
        config = synthetic.get_config()
        config.seed = 7
        return default.apply_variants(config, arg)
  """))
  config = _parse_as_main(tmp_path, "configs/mine.py:runlocal")
  assert (config["seed"], config["data"]["name"], config["num_epochs"]) == (7, "synthetic", 2)


@pytest.mark.parametrize("arg, message", [
    ("tiny,small", "--config variants tiny and small exclude each other"),
    ("runlocal=False,runlocal", "--config variant 'runlocal' given twice"),
    ("tiny,tiny", "--config variant 'tiny' given twice"),
])
def test_contradictory_variants_are_refused(arg, message):
  with pytest.raises(ValueError, match=message):
    default.get_config(arg)
  assert default.parse_variants("tiny,small=false,runlocal") == {
      "tiny": True, "small": False, "runlocal": True}
