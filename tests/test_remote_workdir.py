"""A whole run into a ``gs://`` workdir, with the bucket served from local storage.

Every file of the run goes through ``etils.epath`` (its fsspec backend, here a local
filesystem standing in for GCS) and orbax's TensorStore writes a local directory in place of
the bucket; the three patches below are the whole emulation. A workdir access that bypassed
``epath`` (``os.path``, ``open``, ``pathlib``) would create ``gs:/bucket/...`` under the
working directory instead, or fail.
"""

import glob
import os
import pathlib

import pytest
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem
from orbax.checkpoint._src.path import gcs_utils
from orbax.checkpoint._src.serialization import tensorstore_utils

from dsf3n_jax import train
from tests.test_train import tiny_config


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
  """``gs://<name>/...`` is ``<returned folder>/<name>/...`` for epath, fsspec and orbax."""
  root = tmp_path / "buckets"
  root.mkdir()

  def local(path):
    path = os.fspath(path)
    return str(root / path.removeprefix("gs://")) if path.startswith("gs://") else path

  class LocalBucket(LocalFileSystem):
    @classmethod
    def _strip_protocol(cls, path):
      return LocalFileSystem._strip_protocol(local(path))

    def glob(self, path, **kwargs):  # names as GCS gives them: bucket/path
      del kwargs
      return [os.path.relpath(p, root) for p in glob.glob(self._strip_protocol(path))]

  fs = LocalBucket(auto_mkdir=True)
  real_fs = epath_backend._FileSystemSpecBackend.fs
  real_normalize = tensorstore_utils._normalize_path
  monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs", lambda self, p: fs if os.fspath(
      p).startswith("gs://") else real_fs(self, p))
  monkeypatch.setattr(tensorstore_utils, "_use_gcs_driver", lambda directory: False)
  monkeypatch.setattr(tensorstore_utils, "_normalize_path", lambda p: real_normalize(local(p)))
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  return root


def test_a_run_trains_resumes_and_is_restored_in_a_gs_workdir(bucket):
  config = tiny_config(num_epochs=1)
  workdir = "gs://my-bucket/runs/a"
  train.train_and_evaluate(config.copy_and_resolve_references(), workdir)
  config.num_epochs = 2
  results = train.train_and_evaluate(config, workdir)  # resumes from gs://.../checkpoints/6
  assert results["epochs"] == 2
  run = bucket / "my-bucket" / "runs" / "a"
  assert {p.name for p in run.iterdir()} >= {"config.json", "results.json", "metrics.jsonl",
                                             "checkpoints", "tensorboard"}
  assert not (run / "lock").exists()  # released
  assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [6, 12]  # steps
  assert list((run / "tensorboard").glob("events.out.tfevents.*"))
  steps = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line]
  assert len(steps) == 4  # train and test, per epoch; the resumed run appended to the first
  model, variables, saved = train.restore_model(workdir)
  assert saved.num_epochs == 2 and "params" in variables
  assert list(pathlib.Path.cwd().iterdir()) == []  # nothing went to a local "gs:" folder
