"""The checkpoints of a run (``dsf3n_jax.checkpoints``): what is kept across managers."""

import numpy as np
import pytest

from dsf3n_jax import checkpoints
from dsf3n_jax.checkpoints import Checkpointer


def _meta(best_step):
  best = None if best_step is None else {"epoch": 0, "step": best_step, "checkpoint": best_step,
                                         "value": 0.5}
  return {"epoch": 0, "step": 0, "best": best}


def _save(checkpointer, step, best_step):
  checkpointer.save(step, {"w": np.full((3,), float(step), np.float32)}, _meta(best_step))
  checkpointer.wait()


def test_the_best_checkpoint_outlives_the_manager_that_saved_it(tmp_path):
  """keep=1: the best (step 1) is kept besides the latest, by this manager and by the next one
  (a resumed run's), until a newer best replaces it."""
  first = Checkpointer(tmp_path, keep=1)
  _save(first, 1, best_step=1)
  _save(first, 2, best_step=1)
  assert first.steps() == [1, 2]
  first.close()
  resumed = Checkpointer(tmp_path, keep=1)
  _save(resumed, 3, best_step=1)
  _save(resumed, 4, best_step=1)
  assert resumed.steps() == [1, 4]
  assert resumed.best_step() == 1
  _save(resumed, 5, best_step=5)  # a new best: the old one goes
  assert resumed.steps() == [5]
  resumed.close()


def test_a_save_writes_the_meta_of_its_call(tmp_path, monkeypatch):
  """orbax writes the JSON item in its background thread; the loop goes on changing its meta in
  place (the epoch's metric sums) meanwhile, and a checkpoint must not take those changes."""
  checkpointer = Checkpointer(tmp_path, keep=2)
  handed = []
  real = checkpoints.ocp.args.JsonSave
  monkeypatch.setattr(checkpoints.ocp.args, "JsonSave",
                      lambda item: handed.append(item) or real(item))
  meta = {**_meta(None), "epoch_metrics": {"count": 2, "sums": {"loss": 4.0}}}
  checkpointer.save(1, {"w": np.zeros((3,), np.float32)}, meta)
  meta["epoch_metrics"]["count"] = 3  # the next step's, added in place
  meta["epoch_metrics"]["sums"]["loss"] = 6.0
  checkpointer.wait()
  saved = {"count": 2, "sums": {"loss": 4.0}}
  assert handed[0]["epoch_metrics"] == saved  # what orbax was handed: a copy
  assert checkpointer.read_meta(step=1)["epoch_metrics"] == saved
  checkpointer.close()


def test_a_checkpoints_meta_is_rewritten_whole_and_names_the_best_kept(tmp_path):
  """``rewrite_meta`` (a resume whose best is gone makes the restored checkpoint the best):
  one file replaced, the state untouched, and the named best kept by the next saves."""
  first = Checkpointer(tmp_path, keep=1)
  _save(first, 1, best_step=None)
  _save(first, 2, best_step=None)
  assert first.steps() == [2]
  first.rewrite_meta(2, {**_meta(2), "note": "rewritten"})
  meta = first.read_meta(step=2)
  assert meta["note"] == "rewritten" and meta["best"]["checkpoint"] == 2
  assert first.manager.restore(2)["state"]["w"].tolist() == [2.0] * 3
  assert not [p for p in (tmp_path / "checkpoints" / "2" / "meta").iterdir()
              if p.name.startswith(".")]  # no temporary file left behind
  _save(first, 3, best_step=2)
  assert first.steps() == [2, 3]
  first.close()


def test_a_restore_reads_each_array_once_and_places_it_as_the_target_says(tmp_path, monkeypatch):
  """Into host arrays, then placed: on the target's sharding (8 devices, replicated: one read,
  not one per device), or left on the host for a target without one; the saved values bit for
  bit, in the target's dtype. An array of another shape is refused, naming the checkpoint."""
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from tests.test_train import mesh_of
  rng = np.random.default_rng(0)
  state = {"w": rng.normal(size=(5, 3)).astype(np.float32), "step": np.int32(7),
           "rng": np.arange(2, dtype=np.uint32)}
  checkpointer = Checkpointer(tmp_path, keep=2)
  checkpointer.save(1, state, _meta(None))
  checkpointer.wait()
  reads = []
  real = checkpoints.ocp.RestoreArgs
  monkeypatch.setattr(checkpoints.ocp, "RestoreArgs",
                      lambda **kwargs: reads.append(kwargs) or real(**kwargs))
  mesh = mesh_of(8)
  placed, meta = checkpointer.restore(checkpoints.abstract_like(state, mesh))
  assert meta == {**_meta(None), **meta} and len(reads) == 3
  assert all(r["restore_type"] is np.ndarray for r in reads)
  for key, value in state.items():
    assert isinstance(placed[key], jax.Array), key
    assert placed[key].sharding == NamedSharding(mesh, P()), key
    assert len(placed[key].addressable_shards) == 8, key
    np.testing.assert_array_equal(np.asarray(placed[key]), value, err_msg=key)
    assert placed[key].dtype == value.dtype, key
  host, _ = checkpointer.restore(jax.eval_shape(lambda: state))
  for key, value in state.items():
    assert isinstance(host[key], np.ndarray), key
    np.testing.assert_array_equal(host[key], value, err_msg=key)
  other = {**jax.eval_shape(lambda: state), "w": jax.ShapeDtypeStruct((4, 3), np.float32)}
  with pytest.raises(checkpoints.CheckpointMismatchError) as refused:
    checkpointer.restore(other, step=1)
  assert str(refused.value).startswith(
      f"checkpoint {tmp_path}/checkpoints/1: its arrays do not fit")
  assert "shapes [(5, 3)], expected [(4, 3)]" in str(refused.value)
  checkpointer.close()
