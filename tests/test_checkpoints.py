"""The checkpoints of a run (``dsf3n_jax.checkpoints``): what is kept across managers."""

import numpy as np

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


def _w(checkpointer, step):
  return checkpointer.manager.restore(step)["state"]["w"]


def test_a_checkpoint_saved_anew_is_never_missing(tmp_path):
  """``replace`` sets the old checkpoint aside until the new one is complete: whenever a kill
  lands, the next Checkpointer of the workdir finds one of the two under the step's name."""
  from dsf3n_jax import checkpoints
  first = Checkpointer(tmp_path, keep=2)
  _save(first, 1, best_step=None)
  _save(first, 2, best_step=None)
  first.set_aside(2, checkpoints.REPLACED)  # killed before the new save began
  first.close()
  second = Checkpointer(tmp_path, keep=2)  # the old one is put back
  assert second.steps() == [1, 2] and _w(second, 2).tolist() == [2.0] * 3
  aside = second.set_aside(2, checkpoints.REPLACED)  # killed after the new save was complete
  second.save(2, {"w": np.full((3,), 7.0, np.float32)}, _meta(None))
  second.wait()
  second.close()
  third = Checkpointer(tmp_path, keep=2)  # the old one goes
  assert third.steps() == [1, 2] and _w(third, 2).tolist() == [7.0] * 3
  assert not aside.exists()
  third.replace(2, {"w": np.full((3,), 9.0, np.float32)}, _meta(2))  # not killed
  assert third.steps() == [1, 2] and _w(third, 2).tolist() == [9.0] * 3
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  third.close()
