"""The training loop: epochs, evaluation and selection, checkpoints; every exit path closes.

After every ``eval_every_epochs``-th epoch (1-based) and after the last, each
split is evaluated on every item; its loss is one mean over the whole split
with the trained centres. With ``early_stopping_patience`` = N > 0 the run
stops after N evaluations in a row whose selection-split loss is not strictly
below the best so far (a tie is no improvement). This is our own rule, not the
original's: the original evaluates the test split after 1-based epochs 6, 11,
16, ... (not the last), sums the per-batch losses of its ``drop_last`` test
batches, draws fresh random centres for the centre term at every evaluation
(which no run can reproduce), and counts an equal loss as an improvement.

A checkpoint is saved only when its state is finite and (when it was
evaluated) its evaluation is finite; the best one is the best finite
evaluation of the selection metric. ``results.json`` is written after the
checkpoints it names are complete. Any failure closes the checkpointer, the
metric writer and the workdir lock before it propagates, with the last
intact checkpoint named.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax import input_pipeline, losses
from dsf3n_jax.checkpoints import Checkpointer, abstract_like
from dsf3n_jax.training import run as run_lib
from dsf3n_jax.training import steps as steps_lib
from dsf3n_jax.training import workdir as workdir_lib
from dsf3n_jax.training.state import (
    init_state,
    learning_rate_schedule,
    make_init_fn,
    new_meta,
)
from dsf3n_jax.training.workdir import log

_EVAL_KEYS = ("loss", "map_audio_to_visual", "map_visual_to_audio", "map_average",
              "unimodal_map_average")


def _fmt(values: Mapping[str, Any], keys) -> str:
  return " ".join(f"{k}={float(values[k]):.4f}" for k in keys if k in values)


@jax.jit
def _state_is_finite(state) -> jax.Array:
  leaves = jax.tree.leaves((state.params, state.batch_stats, state.aux, state.opt_state))
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                            if jnp.issubdtype(x.dtype, jnp.inexact)]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, model=None,
                       loss_fn=None) -> dict[str, Any]:
  """Trains DSF3N as ``config`` says, checkpointing and evaluating into ``workdir``.

  Resumes from the latest intact checkpoint in ``workdir`` if there is one.

  Args:
    config: the run's config (``configs/default.py``'s fields).
    workdir: the run's directory (any ``etils.epath`` path, e.g. ``gs://``).
    model: a Flax module to train instead of the one ``config.model`` names;
      it is called as ``DSF3N`` is and must have its fields (``embed_dim``,
      ``visual_dim``, ...) and ``axis_name`` (set to the data axis here).
      Checkpoints record ``config.model``, so a model given here is not
      rebuilt by ``restore_model``: register it to have that.
    loss_fn: ``loss(outputs, batch, aux, *, axis_name=None) -> (total, parts)``
      instead of ``config.loss.terms`` (``losses.LossTerm`` says what each
      argument holds); ``aux`` still holds the parameters of the terms of
      ``config.loss.terms``.

  Returns:
    The ``results.json`` content: final and best metrics, epochs, timing.
  """
  start_time = time.time()
  run = run_lib.prepare_run(config, workdir, model=model, loss_fn=loss_fn)
  with contextlib.ExitStack() as stack:
    _hold_workdir(run, stack)
    checkpointer = Checkpointer(run.workdir, keep=config.keep_checkpoints,
                                optimizer_state=config.get("checkpoint_optimizer_state", True))
    stack.callback(workdir_lib.close_within, checkpointer.close, "the checkpointer")
    try:
      state, meta, resumed = _init_or_resume(run, checkpointer)
      if run.is_main:
        workdir_lib.write_run_config(run.workdir, config, run.mcfg, run.fingerprint)
      writer = workdir_lib.MetricWriter(run.workdir,
                                        resume_step=meta["step"] if resumed else None)
      stack.callback(workdir_lib.close_within, writer.close, "the metric writer")
      results = _Trainer(run, checkpointer, writer).fit(state, meta, start_time)
    except BaseException as e:
      if "checkpoint:" not in str(e):
        e.add_note(f"last intact checkpoint: {_last_intact(checkpointer)}")
      raise
  return results


def _hold_workdir(run: run_lib.Run, stack: contextlib.ExitStack) -> None:
  """Process 0 takes the workdir's lock; every process learns whether it did."""
  error = None
  if run.is_main:
    lock = workdir_lib.WorkdirLock(run.workdir)
    try:
      lock.acquire()
      stack.callback(lock.release)
    except workdir_lib.WorkdirError as e:
      error = e
  if jax.process_count() > 1:
    held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if not held and error is None:
      error = workdir_lib.WorkdirError(f"--workdir={run.workdir}: process 0 could not lock it")
  if error is not None:
    raise error


def _last_intact(checkpointer: Checkpointer) -> str:
  """The newest finished checkpoint on disk (whatever the manager believes)."""
  with contextlib.suppress(Exception):
    epochs = [int(p.name) for p in checkpointer.directory.iterdir() if p.name.isdigit()]
    if epochs:
      return f"{checkpointer.directory}/{max(epochs)}"
  return "none"


def _init_or_resume(run: run_lib.Run, checkpointer: Checkpointer):
  """The initial state, or the latest intact checkpoint's (checked against the run).

  A resume compiles no initialiser: the checkpoint is restored into the initial
  state's shapes (``jax.eval_shape``), and a checkpoint without optimiser state
  gets a fresh one of its parameters (the same as the initial state's: every
  optimiser here starts from zeros and a count).
  """
  config = run.config
  replicated = NamedSharding(run.mesh, P())
  if checkpointer.latest_epoch() is None:
    init = make_init_fn(run.model, run.tx, num_classes=run.sources.num_classes,
                        loss_terms=config.loss.terms, sharding=replicated)
    return init(config.seed), new_meta(), False
  abstract = jax.eval_shape(functools.partial(
      init_state, run.model, run.tx, seed=config.seed, num_classes=run.sources.num_classes,
      loss_terms=config.loss.terms))
  state, meta = checkpointer.restore(abstract_like(abstract, run.mesh),
                                     model_config=run.mcfg,
                                     on_fallback=lambda msg: log("%s; falling back", msg),
                                     repair=True)
  if not config.get("allow_resume_mismatch", False):
    run_lib.check_resume(meta, fingerprint=run.fingerprint, loss=config.loss.to_dict(),
                         where=f"{checkpointer.directory}/{meta['epoch']}")
  if state.opt_state is None:
    log("checkpoint has no optimiser state (checkpoint_optimizer_state=False): the optimiser "
        "starts afresh")
    state = state.replace(opt_state=jax.jit(run.tx.init, out_shardings=replicated)(
        state.trainable))
  log("resumed from %s/%d (step %d)", checkpointer.directory, meta["epoch"], meta["step"])
  return state, meta, True


def _scheduled(epoch: int, every: int, last: int) -> bool:
  """Whether 1-based ``epoch`` is one of every ``every``-th, or the last."""
  return epoch == last or bool(every and epoch % every == 0)


class _Trainer:
  """One run's epochs, evaluations, selection and checkpoints."""

  def __init__(self, run: run_lib.Run, checkpointer: Checkpointer,
               writer: workdir_lib.MetricWriter):
    self.run, self.config = run, run.config
    self.checkpointer, self.writer = checkpointer, writer
    self.step_fn = steps_lib.per_device_step(self.config, run.model, run.tx,
                                             loss_fn=run.loss_fn)
    self.embed_fn = steps_lib.make_embed_fn(run.model, run.mesh)
    # One loss function for every evaluation: its compiled form is reused (steps.evaluate).
    self.eval_loss_fn = run.loss_fn or losses.loss_from_config(self.config.loss)
    self.lr = learning_rate_schedule(self.config, run.steps_per_epoch)
    self.on_device = run_lib.resolve_on_device(self.config.data.on_device)
    self.train_time, self.trained_steps, self.eval_time, self.evals = 0.0, 0, 0.0, 0
    self.compiled = False

  # -- epochs ------------------------------------------------------------------------------

  def _start_data(self, meta) -> None:
    config, run = self.config, self.run
    num_train = len(run.sources.train)
    if self.on_device:
      self.arrays = input_pipeline.to_device(
          input_pipeline.load_split_arrays(run.sources.train), run.mesh)
      self.epoch_fn = steps_lib.make_train_epoch(
          self.step_fn, run.mesh, global_batch_size=config.batch_size, num_examples=num_train,
          seed=config.seed, shuffle=config.data.shuffle)
    else:
      self.loader = input_pipeline.TrainLoader(
          run.sources.train, global_batch_size=config.batch_size, mesh=run.mesh,
          seed=config.seed, shuffle=config.data.shuffle)
      if meta["loader"] is not None:
        self.loader.set_state(meta["loader"])
      self.loader_iter = iter(self.loader)
      self.step_jit = steps_lib.make_train_step(self.step_fn, run.mesh)

  def _compiling(self) -> None:
    if not self.compiled:
      log("compiling the train %s", "epoch" if self.on_device else "step")
      self.compiled = True

  def _epoch(self, state, epoch: int):
    """One epoch; returns the state and the per-step metrics (numpy)."""
    t0 = time.time()
    self._compiling()
    if self.on_device:
      state, step_metrics = self.epoch_fn(state, self.arrays, jnp.asarray(epoch, jnp.int32))
      step_metrics = jax.tree.map(np.asarray, step_metrics)
    else:
      state, step_metrics = steps_lib.run_steps(
          self.step_jit, state, self.loader_iter, steps=self.run.steps_per_epoch,
          log_every=self.config.log_every_steps,
          on_log=lambda i, m: self._log_step(epoch, i, m, time.time() - t0))
    self.train_time += time.time() - t0
    self.trained_steps += self.run.steps_per_epoch
    return state, step_metrics

  def _eta(self, steps_left: int, epochs_done: int, *, done: int = 0,
           elapsed: float = 0.0) -> float:
    """Seconds left: the steps at the rate of the finished ones (``done`` more of them,
    ``elapsed`` more seconds, within this epoch), plus the evaluations still to come."""
    rate = (self.trained_steps + done) / max(self.train_time + elapsed, 1e-9)
    evals_left = sum(_scheduled(e, self.config.eval_every_epochs, self.config.num_epochs)
                     for e in range(epochs_done + 1, self.config.num_epochs + 1))
    per_eval = self.eval_time / self.evals if self.evals else 0.0
    return steps_left / rate + evals_left * per_eval

  def _log_step(self, epoch: int, i: int, m, elapsed: float) -> None:
    spe = self.run.steps_per_epoch
    rate = (self.trained_steps + i + 1) * self.config.batch_size / (self.train_time + elapsed)
    eta = self._eta((self.config.num_epochs - epoch) * spe - i - 1, epoch, done=i + 1,
                    elapsed=elapsed)
    log("epoch %d step %d/%d %s %.1f samples/s ETA %.0fs", epoch + 1, i + 1, spe,
        _fmt(m, ("loss", "id", "pair", "center")), rate, eta)

  # -- evaluation and selection ------------------------------------------------------------

  def _evaluate_all(self, state, epoch: int, global_step: int) -> dict[str, dict[str, float]]:
    t0 = time.time()
    results = {}
    for split in ("validation", "test"):
      source = getattr(self.run.sources, split)
      if source is None:
        continue
      values = steps_lib.evaluate(self.embed_fn, state, source, config=self.config,
                                  mesh=self.run.mesh, split=split, loss_fn=self.eval_loss_fn)
      bad = sorted(k for k, v in values.items() if not math.isfinite(v))
      if bad:
        raise FloatingPointError(
            f"non-finite {split} evaluation after epoch {epoch} ({', '.join(bad[:4])}"
            f"{' ...' if len(bad) > 4 else ''}: {values[bad[0]]}); this state is not saved; "
            f"{self._last_good()}")
      results[split] = values
      self.writer.write(global_step, split, values, epoch=epoch)
      log("epoch %d %s %s", epoch, split, _fmt(values, _EVAL_KEYS))
    self.eval_time += time.time() - t0
    self.evals += 1
    return results

  def _select(self, meta, evals, epoch: int) -> bool:
    """Updates the best-so-far and the early-stopping count; True for a new best."""
    chosen = evals[self.run.selection]
    is_best = meta["best"] is None or chosen[self.run.metric] > meta["best"]["value"]
    if is_best:
      meta["best"] = {"epoch": epoch, "selected_on": self.run.selection,
                      "metric": self.run.metric, "value": chosen[self.run.metric], **evals}
    if meta["best_eval_loss"] is None or chosen["loss"] < meta["best_eval_loss"]:
      meta["best_eval_loss"] = chosen["loss"]
      meta["evals_without_improvement"] = 0
    else:
      meta["evals_without_improvement"] += 1
    return is_best

  # -- checkpoints ---------------------------------------------------------------------------

  def _last_good(self) -> str:
    with contextlib.suppress(Exception):  # a failed save is not the error being reported
      self.checkpointer.wait()
    last = _last_intact(self.checkpointer)
    return f"last good checkpoint: {last}{' (kept)' if last != 'none' else ''}"

  def _save(self, state, meta, epoch: int, *, best: bool) -> None:
    if not bool(_state_is_finite(state)):
      raise FloatingPointError(f"non-finite parameters or optimiser state after epoch {epoch}; "
                               f"this state is not saved; {self._last_good()}")
    self.checkpointer.save(epoch, state, {**meta, "model": self.run.mcfg,
                                          "data": self.run.fingerprint,
                                          "loss": self.config.loss.to_dict()}, best=best)

  def _repair_best(self, state, meta) -> None:
    """A resume whose best checkpoint is gone re-evaluates the restored state as the best."""
    best = meta.get("best")
    if not best or best["epoch"] in self.checkpointer.epochs():
      return
    epoch = meta["epoch"]
    log("the best checkpoint (epoch %d) is missing: the restored epoch %d is evaluated and "
        "becomes the best so far", best["epoch"], epoch)
    meta["best"] = None
    evals = self._evaluate_all(state, epoch, meta["step"])
    self._select(meta, evals, epoch)
    self.checkpointer.manager.delete(epoch)
    self._save(state, meta, epoch, best=True)
    self.checkpointer.wait()

  # -- the run -------------------------------------------------------------------------------

  def fit(self, state, meta, start_time: float) -> dict[str, Any]:
    config, run = self.config, self.run
    self._start_data(meta)
    self._repair_best(state, meta)
    log("training %s on %d device(s) of %d process(es): %d examples, %d steps/epoch, %d epochs",
        run.sources.name, jax.device_count(), jax.process_count(), len(run.sources.train),
        run.steps_per_epoch, config.num_epochs)
    final_eval, stopped_early = {}, False
    for epoch in range(meta["epoch"] + 1, config.num_epochs + 1):  # 1-based
      state, stop, evals = self._one_epoch(state, meta, epoch)
      final_eval = evals or final_eval
      if stop:
        stopped_early = True
        log("early stopping after epoch %d: %d evaluations without a lower %s loss", epoch,
            meta["evals_without_improvement"], run.selection)
        break
    self.checkpointer.wait()  # results.json names only complete checkpoints
    if not final_eval:  # resumed a finished run: evaluate what is there
      final_eval = self._evaluate_all(state, meta["epoch"], meta["step"])
    results = self._results(state, meta, final_eval, stopped_early, start_time)
    if run.is_main:
      workdir_lib.write_results(run.workdir, results)
    return results

  def _one_epoch(self, state, meta, epoch: int):
    config, spe = self.config, self.run.steps_per_epoch
    self.checkpointer.check_for_errors()  # a save that failed meanwhile ends the run now
    state, step_metrics = self._epoch(state, epoch - 1)
    global_step = epoch * spe
    bad = np.flatnonzero(~np.isfinite(step_metrics["loss"]))
    if bad.size:
      raise FloatingPointError(f"non-finite loss at step {(epoch - 1) * spe + int(bad[0]) + 1} "
                               f"(epoch {epoch}); {self._last_good()}")
    means = {k: float(np.mean(v)) for k, v in step_metrics.items()}
    rate = self.trained_steps * config.batch_size / max(self.train_time, 1e-9)
    self.writer.write(global_step, "train", means, epoch=epoch, samples_per_second=rate,
                      learning_rate=float(self.lr(global_step - 1)))
    evals, is_best, stop = None, False, False
    if _scheduled(epoch, config.eval_every_epochs, config.num_epochs):
      evals = self._evaluate_all(state, epoch, global_step)
      is_best = self._select(meta, evals, epoch)
      stop = bool(config.early_stopping_patience and
                  meta["evals_without_improvement"] >= config.early_stopping_patience)
    log("epoch %d/%d train %s %.1f samples/s ETA %.0fs", epoch, config.num_epochs,
        _fmt(means, ("loss", "id", "pair", "center", "accuracy_visual", "accuracy_audio")),
        rate, 0.0 if stop else self._eta((config.num_epochs - epoch) * spe, epoch))
    meta["epoch"], meta["step"] = epoch, global_step
    if not self.on_device:
      meta["loader"] = self.loader.get_state()
    if stop or is_best or _scheduled(epoch, config.checkpoint_every_epochs, config.num_epochs):
      self.checkpointer.check_for_errors()
      self._save(state, meta, epoch, best=is_best)
    return state, stop, evals

  def _results(self, state, meta, final_eval, stopped_early, start_time) -> dict[str, Any]:
    config = self.config
    return {
        "dataset": self.run.sources.name, "epochs": meta["epoch"], "steps": meta["step"],
        "final": final_eval, "best": meta["best"], "selected_on": self.run.selection,
        "selection_metric": self.run.metric, "stopped_early": stopped_early,
        "wall_time_s": time.time() - start_time, "train_time_s": self.train_time,
        "samples_per_second": (self.trained_steps * config.batch_size / self.train_time
                               if self.train_time else None),
        "device_count": jax.device_count(), "process_count": jax.process_count(),
        "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
        "data": self.run.fingerprint,
    }
