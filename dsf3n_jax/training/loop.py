"""The training loop: train steps in chunks, periodic actions between them; every exit path closes.

The body of the loop is the train step. It runs in chunks that end where
some periodic action (``training.actions``) is due: a checkpoint
(``checkpoint_every_steps``, ``checkpoint_every_epochs``), an evaluator of
``config.evals``, a progress line, an epoch's end, a profile's start or stop.
With the train split in device memory a chunk is one compiled call
(``steps.make_train_chunk``, at most ``steps_per_call`` steps when > 0);
streamed, one jitted step per batch. The global step (steps taken) is the
clock: a checkpoint holds the data position (epoch, step within it, the
streaming loader's state) and the sums of the current epoch's train metrics,
so a run resumed from any checkpoint, mid-epoch too, continues with the same
batches and ends bit for bit as an uninterrupted run on the same machine.

Evaluation: every evaluator runs at its interval and after the last step; the
final evaluations (the last step's, or an early stop's) are made before the checkpoint of
their step, which records them, so a rerun of a finished run trains and evaluates
nothing: it says so and returns its results (writing only a ``results.json`` that a kill
after that checkpoint left unwritten), and ``metrics.jsonl`` holds each evaluation once (an
evaluator added since, or whose settings changed, ``eval_settings``, evaluates again; a final
evaluation's record is marked with its settings, ``final_mark``, and one made again after a
kill that its checkpoint's record missed replaces the record it left). The
selection metric (``selection_metric``, ``"<eval>/<metric>"`` or a metric of
the ``selection_split`` evaluator) picks the best checkpoint; ``selection_split="last"``
makes the final state the best (a refit on train + validation has nothing to select on). With
``early_stopping_patience`` = N > 0 the run stops after N evaluations in a row
whose selection evaluator's loss is not strictly below the best so far (a tie
is no improvement). This is our own rule, not the original's: the original
evaluates the test split after 1-based epochs 6, 11, 16, ... (not the last),
sums the per-batch losses of its ``drop_last`` test batches, draws fresh
random centres for the centre term at every evaluation (which no run can
reproduce), and counts an equal loss as an improvement.

Preemption (``training.preemption``): SIGTERM or SIGINT (several processes:
JAX's preemption notice, agreed by all) makes the loop save a checkpoint at
the next step boundary and stop with ``Preempted`` (exit status 75 from the
command line); rerunning the same command resumes.

A checkpoint is saved only when its state is finite and (when it was
evaluated) its evaluation is finite; the best one is the best finite
evaluation of the selection metric. ``results.json`` is written after the
checkpoints it names are complete. Any failure closes the profiler, the
checkpointer, the metric writer and the workdir lock before it propagates,
with the last intact checkpoint named.

Another run that took the workdir over (this run's lock lease lapsed: its process was
frozen longer than ``workdir.LEASE_S``; ``workdir.WorkdirLock``) stops the run with a
``WorkdirError`` naming that run, before the next write of a step boundary: an evaluation's
record, a checkpoint, a checkpoint's rewritten meta, ``results.json``. Two writers would
corrupt each other's checkpoints; that run's lock is left as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax import config_check, input_pipeline
from dsf3n_jax import evaluators as evaluators_lib
from dsf3n_jax.checkpoints import FOLDER as CHECKPOINTS
from dsf3n_jax.checkpoints import (
    Checkpointer,
    StateStructureError,
    abstract_like,
    best_checkpoint,
)
from dsf3n_jax.models.dsf3n import DSF3NOutput
from dsf3n_jax.training import actions as actions_lib
from dsf3n_jax.training import run as run_lib
from dsf3n_jax.training import steps as steps_lib
from dsf3n_jax.training import workdir as workdir_lib
from dsf3n_jax.training.preemption import Preempted, PreemptionWatch
from dsf3n_jax.training.state import (
    SCHEDULES_READING_NUM_EPOCHS,
    abstract_state,
    learning_rate_schedule,
    make_init_fn,
    memoized,
    new_meta,
)
from dsf3n_jax.training.workdir import log

EVAL_KEYS = ("loss", "map_audio_to_visual", "map_visual_to_audio", "map_average",
             "unimodal_map_average")


# The config fields that only the loop reads: when it evaluates, checkpoints, logs and
# profiles, what it evaluates and how it selects. Runs of one process whose configs differ
# only in them (and in ``num_epochs`` under a schedule that does not read it) train with the
# same compiled programs (``_run_programs``).
LOOP_FIELDS = ("eval_every_epochs", "evals", "checkpoint_every_epochs", "checkpoint_every_steps",
               "profile_steps", "keep_checkpoints", "checkpoint_optimizer_state",
               "allow_resume_mismatch", "log_every_steps", "selection_split",
               "selection_metric", "selection_mode", "early_stopping_patience", "distributed",
               "metric")


def programs_key(config: ml_collections.ConfigDict) -> str:
  """What of ``config`` the train programs are made of: all of it but ``LOOP_FIELDS`` (and
  ``num_epochs`` where the schedule does not read it), as sorted JSON."""
  c = json.loads(config.to_json_best_effort())
  for field in LOOP_FIELDS:
    c.pop(field, None)
  if config.optim.schedule not in SCHEDULES_READING_NUM_EPOCHS:
    c.pop("num_epochs", None)
  return json.dumps(c, sort_keys=True)


@memoized
def _run_programs(key: str, model, loss_fn, mesh, steps_per_epoch: int) -> dict[str, Any]:
  """The train programs of runs with these arguments, by name: empty until the first such
  run of this process builds them (``Loop``); later ones reuse them, so they neither trace
  nor compile them again (a sweep written as a loop, a notebook, a test suite). The model
  compares by its fields, a given ``loss_fn`` by identity; the embedding and init programs
  are memoized by the model already (``steps.make_embed_fn``, ``state.make_init_fn``)."""
  del key, model, loss_fn, mesh, steps_per_epoch
  return {}


@jax.jit
def _state_is_finite(state) -> jax.Array:
  leaves = jax.tree.leaves((state.params, state.batch_stats, state.aux, state.opt_state))
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves
                            if jnp.issubdtype(x.dtype, jnp.inexact)]))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *, model=None,
                       loss_fn=None,
                       actions: Sequence[actions_lib.PeriodicAction] = ()) -> dict[str, Any]:
  """Trains DSF3N as ``config`` says, checkpointing and evaluating into ``workdir``.

  Resumes from the latest intact checkpoint in ``workdir`` if there is one; a run already
  complete there (its last step or an early stop, and its final evaluations) is not trained or
  evaluated again: its results are returned. A start that fails before it wrote anything
  leaves no folder it made behind (the workdir, its parents, ``checkpoints/``; only empty ones).

  Args:
    config: the run's config (``configs/default.py``'s fields).
    workdir: the run's directory (any ``etils.epath`` path, e.g. ``gs://``).
    model: a Flax module to train instead of the one ``config.model`` names;
      it is called as ``DSF3N`` is and must have its fields (``embed_dim``,
      ``visual_dim``, ...) and ``axis_name`` (set to the data axis here).
      Checkpoints record ``config.model``, so a model given here is not
      rebuilt by ``restore_model`` (which refuses the run, as ``retrieve`` and
      ``visualize`` do): register it and name it in ``config.model`` to have that.
    loss_fn: ``loss(outputs, batch, aux, *, axis_name=None) -> (total, parts)``
      instead of ``config.loss.terms`` (``losses.LossTerm`` says what each
      argument holds); ``aux`` still holds the parameters of the terms of
      ``config.loss.terms``.
    actions: more ``training.actions.PeriodicAction``s, called at the steps where
      they are due after the evaluations and the selection of the best, before the
      checkpoint of the step (state they keep in ``loop.meta``, JSON values, is in it).

  Returns:
    The ``results.json`` content: final and best metrics, epochs, timing.

  Raises:
    Preempted: SIGTERM / SIGINT (or JAX's preemption notice) arrived; a
      checkpoint of the step named was saved, and a rerun resumes from it.
    workdir.WorkdirError: the workdir is another run's: at the start, or taken over
      while this run's lease had lapsed (nothing more was written then).
  """
  start_time = time.time()
  with contextlib.ExitStack() as stack:
    # First (closed last), before the data is read: a signal while starting stops the run
    # before its first step (Loop.fit).
    watch = stack.enter_context(PreemptionWatch())
    # Closed after everything else: a start that ends by an exception before it wrote
    # anything leaves no folder it made (the workdir, its parents, checkpoints/) behind.
    new_folders = workdir_lib.new_folders(workdir)

    def remove_new_folders_if_empty(kind, *_) -> bool:
      if kind is not None:
        workdir_lib.remove_empty(new_folders)
      return False  # the exception propagates

    stack.push(remove_new_folders_if_empty)
    run = run_lib.prepare_run(config, workdir, model=model, loss_fn=loss_fn)
    evaluations = _build_evaluations(run)  # a bad setting fails before anything compiles
    lock = _hold_workdir(run, stack)
    new_folders[:0] = workdir_lib.new_folders(run.workdir / CHECKPOINTS)  # the lock is held
    checkpointer = Checkpointer(run.workdir, keep=config.keep_checkpoints,
                                optimizer_state=config.get("checkpoint_optimizer_state", True))
    stack.callback(workdir_lib.close_within, checkpointer.close, "the checkpointer")
    try:
      state, meta, resumed = _init_or_resume(run, checkpointer)
      _check_selection_metric(run, evaluations, state)  # before the step compiles
      # The final evaluations the checkpoint records, whatever their settings (None: a
      # checkpoint of a version that recorded none).
      recorded = dict(meta["final_evals"] or {}) if "final_evals" in meta else None
      if resumed:
        meta["final_evals"] = _final_evals_done(run, meta, evaluations)
        if recorded is None:  # its results.json's: taken as made with these settings
          meta["final_eval_settings"] = {e.name: eval_settings(e.spec, config)
                                         for e in evaluations if e.name in meta["final_evals"]}
        done = _finished_results(run, evaluations, checkpointer, state, meta, start_time)
        if done is not None:  # nothing to train or evaluate: nothing is written again
          return done
      if run.is_main:
        workdir_lib.write_run_config(run.workdir, config, run.mcfg, run.fingerprint,
                                     model_given=run.model_given)
        if isinstance(stats := getattr(run.sources.train, "stats", None), Mapping):
          workdir_lib.write_feature_stats(run.workdir, stats)
      writer = workdir_lib.MetricWriter(run.workdir,
                                        resume_step=meta["step"] if resumed else None)
      stack.callback(workdir_lib.close_within, writer.close, "the metric writer")
      if resumed:
        _adopt_unmarked_finals(run, writer, evaluations, meta, recorded or {})
      loop = Loop(run, checkpointer, writer, watch, evaluations, extra_actions=actions,
                  lock=lock)
      stack.callback(loop.close_actions)
      results = loop.fit(state, meta, start_time)
    except Preempted:
      raise
    except BaseException as e:
      if "checkpoint:" not in str(e):
        # A save in flight, once done, is the last intact one (waited for a bounded time: a
        # peer process that died would hold it at its barrier).
        workdir_lib.close_within(checkpointer.wait, "the checkpoint save in flight")
        e.add_note(f"last intact checkpoint: {_last_intact(checkpointer)}")
      raise
  return results


def _build_evaluations(run: run_lib.Run) -> list[actions_lib.Evaluate]:
  """One ``Evaluate`` action per evaluator of ``config.evals`` whose split the run has."""
  config, spe = run.config, run.steps_per_epoch
  out, problems = [], []
  for spec in evaluators_lib.specs(config):
    if getattr(run.sources, spec.split) is None:  # no validation split carved
      continue
    try:
      evaluator = evaluators_lib.build(spec, run)
    except ValueError as e:
      problems.append(str(e))
      continue
    every = spec.every_steps or spec.every_epochs * spe
    out.append(actions_lib.Evaluate(spec, evaluator, every_steps=every))
  if problems:
    raise config_check.ConfigError(problems)
  if run.selection != run_lib.LAST and run.selection not in {e.name for e in out}:
    raise config_check.ConfigError([
        f"config.selection_metric={config.get('selection_metric')!r}: the evaluator "
        f"{run.selection!r} is not run (evaluators: {', '.join(e.name for e in out)})"])
  return out


def _check_selection_metric(run: run_lib.Run, evaluations: Sequence[actions_lib.Evaluate],
                            state) -> None:
  """``config.selection_metric`` is a metric its evaluator reports, known before training
  where the evaluator says what it reports (``reports(loss_parts)``, the built-in ones; a
  user's evaluator is checked at its first evaluation). The loss parts' names are read off
  the run's loss function, traced on stand-in outputs (nothing runs)."""
  if run.selection == run_lib.LAST:
    return
  chosen = next((e for e in evaluations if e.name == run.selection), None)
  reports = getattr(getattr(chosen, "evaluator", None), "reports", None)
  if reports is None:
    return
  n, embed, classes = 2, int(run.mcfg["embed_dim"]), int(run.mcfg["num_classes"])
  outputs = DSF3NOutput(*(jax.ShapeDtypeStruct((n, d), jnp.float32)
                          for d in (embed, embed, classes, classes)))
  try:
    parts = jax.eval_shape(
        lambda o, a: run.eval_loss_fn(o, {"label": jnp.zeros(n, jnp.int32), "mask": None},
                                      a)[1], outputs, state.aux)
  except Exception:  # pylint: disable=broad-except - a loss this cannot trace: checked later
    return
  names = reports(set(parts))
  if run.metric not in names:
    raise config_check.ConfigError([
        f"config.selection_metric={run.config.get('selection_metric')!r}: the evaluator "
        f"{run.selection!r} ({chosen.spec.type}) reports no {run.metric!r}; it reports "
        f"{', '.join(sorted(names))}"])


def _hold_workdir(run: run_lib.Run,
                  stack: contextlib.ExitStack) -> workdir_lib.WorkdirLock | None:
  """Process 0 takes the workdir's lock (returned; None on the other processes); every process
  learns whether it did."""
  error, lock = None, None
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
  return lock


def _last_intact(checkpointer: Checkpointer) -> str:
  """The newest finished checkpoint on disk (whatever the manager believes)."""
  with contextlib.suppress(Exception):
    numbers = [int(p.name) for p in checkpointer.directory.iterdir() if p.name.isdigit()]
    if numbers:
      return f"{checkpointer.directory}/{max(numbers)}"
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
  if checkpointer.latest_step() is None:
    init = make_init_fn(run.model, run.tx, num_classes=run.sources.num_classes,
                        loss_terms=config.loss.terms, sharding=replicated)
    return init(config.seed), new_meta(), False
  abstract = abstract_state(run.model, run.tx, num_classes=run.sources.num_classes,
                            loss_terms=config.loss.terms)
  try:
    state, meta = checkpointer.restore(abstract_like(abstract, run.mesh),
                                       model_config=run.mcfg, on_fallback=log, repair=True)
  except StateStructureError as e:
    raise _structure_mismatch(run, e) from e
  where = f"{checkpointer.directory}/{meta.get('checkpoint', meta['epoch'])}"
  if not config.get("allow_resume_mismatch", False):
    run_lib.check_resume(meta, fingerprint=run.fingerprint, loss=config.loss.to_dict(),
                         where=where)
  changed = run_lib.check_schedule(run_lib.saved_schedule(meta), config, where=where)
  if changed:
    log("resuming %s with a changed schedule: %s", where, "; ".join(changed))
  if state.opt_state is None:
    log("checkpoint has no optimiser state (checkpoint_optimizer_state=False): the optimiser "
        "starts afresh")
    state = state.replace(opt_state=jax.jit(run.tx.init, out_shardings=replicated)(
        state.trainable))
  log("resumed from %s at %s", where, _where(meta["step"], run.steps_per_epoch))
  return state, meta, True


def _structure_mismatch(run: run_lib.Run, error: StateStructureError) -> Exception:
  """Why a checkpoint's state does not fit the config's, as far as its records say."""
  saved, config, where = error.meta, run.config, error.path
  if not config.get("allow_resume_mismatch", False):
    run_lib.check_resume(saved, fingerprint=run.fingerprint, loss=config.loss.to_dict(),
                         where=where)  # a changed loss is said as such
  changed = run_lib.check_schedule(run_lib.saved_schedule(saved), config, where=where)
  return run_lib.ResumeMismatchError(
      f"cannot resume {where}: its state has another structure than the config makes "
      f"({error.cause}); changed since it was saved: "
      f"{'; '.join(changed) or 'no setting the checkpoint records'} (an optimiser "
      "transformation added or removed, e.g. by optim.grad_clip_norm or optim.weight_decay, "
      "or a loss term with parameters, changes the state; the checkpoint's settings resume "
      "it, a new --workdir starts afresh)")


def _where(step: int, steps_per_epoch: int) -> str:
  """'epoch 2' at an epoch's end, else 'step 11 (epoch 2, step 3/8)'."""
  epoch, within = divmod(step, steps_per_epoch)
  if within == 0:
    return f"epoch {epoch}"
  return f"step {step} (epoch {epoch + 1}, step {within}/{steps_per_epoch})"


def eval_settings(spec: evaluators_lib.Spec, config: ml_collections.ConfigDict) -> str:
  """What an evaluation's values depend on besides the state: the evaluator's type, split and
  settings, and ``config.metric`` (one JSON string, recorded with a final evaluation)."""
  metric = config.get("metric")
  return json.dumps({"type": spec.type, "split": spec.split, "settings": dict(spec.settings),
                     "metric": metric.to_dict() if metric is not None else None},
                    sort_keys=True, default=repr)


# In a checkpoint's meta: saved by a version that marks final evaluations' records
# (``final_mark``), so the unmarked records of its step are periodic ones.
FINALS_MARKED = "final_records_marked"


def final_mark(spec: evaluators_lib.Spec, config: ml_collections.ConfigDict) -> str:
  """A final evaluation's mark, ``"final"`` in its ``metrics.jsonl`` record: a digest of its
  ``eval_settings``. The same evaluation made again (after a kill before its checkpoint's
  record) rewrites that record; one made with other settings is a record beside it."""
  return hashlib.sha256(eval_settings(spec, config).encode()).hexdigest()[:12]


def _final_evals_done(run: run_lib.Run, meta: Mapping[str, Any],
                      evaluations: Sequence[actions_lib.Evaluate]) -> dict[str, Any]:
  """The final evaluations made at the checkpoint's step that hold for this config, by
  evaluator name: its record (``meta["final_evals"]``) less those made with other settings
  (``eval_settings``: a changed evaluator is evaluated again), or, in a checkpoint of a
  version without the record, the ``results.json`` of that step (the run finished there),
  else none."""
  if "final_evals" in meta:
    made = meta.get("final_eval_settings") or {}
    return {e.name: meta["final_evals"][e.name] for e in evaluations
            if e.name in (meta["final_evals"] or {})
            and made.get(e.name) == eval_settings(e.spec, run.config)}
  results = workdir_lib.read_results(run.workdir)
  if results and results.get("steps") == meta["step"] and results.get("data") == \
      run.fingerprint:
    return dict(results.get("final") or {})
  return {}


def _adopt_unmarked_finals(run: run_lib.Run, writer: workdir_lib.MetricWriter,
                           evaluations: Sequence[actions_lib.Evaluate], meta: Mapping[str, Any],
                           recorded: Mapping[str, Any]) -> None:
  """The rows a version that did not mark final evaluations (``final_mark``) left in
  ``metrics.jsonl`` of the final evaluation of an evaluator that the checkpoint of the step
  its run finished at does not record (``recorded``): a kill between the two, or a version
  before the record (without a ``results.json`` of that step). A final evaluation made now
  replaces them (``MetricWriter.adopt_final``), not writes beside them. At the run's last step
  every row of an evaluator is a final one; at an early stop, those after its periodic one
  (when it was due there): the last step of the schedule the checkpoint was saved with. A
  checkpoint of this version (``FINALS_MARKED``) has none: its unmarked rows are periodic."""
  if meta.get(FINALS_MARKED):
    return
  config, step = run.config, meta["step"]
  epochs = (run_lib.saved_schedule(meta) or {}).get("num_epochs", config.num_epochs)
  total = int(epochs) * run.steps_per_epoch
  if step < total and not _stopped_early(config, meta):
    return
  for e in evaluations:
    if e.name not in meta["final_evals"] and e.name not in recorded:
      periodic = step < total and e.due(step, total)
      writer.adopt_final(step, e.name, final_mark(e.spec, config), after=int(periodic))


def _stopped_early(config: ml_collections.ConfigDict, meta: Mapping[str, Any]) -> bool:
  """Whether the run of ``meta`` stopped early (``early_stopping_patience`` evaluations
  without improvement): it stays stopped when rerun or resumed."""
  patience = config.early_stopping_patience
  return bool(patience) and meta.get("evals_without_improvement", 0) >= patience


def _finished_results(run: run_lib.Run, evaluations: Sequence[actions_lib.Evaluate],
                      checkpointer: Checkpointer, state, meta: Mapping[str, Any],
                      start_time: float) -> dict[str, Any] | None:
  """The results of a run that is already complete, else None.

  Complete: its last step trained (or it stopped early), the final evaluation of every
  evaluator of ``config.evals`` done (``meta["final_evals"]``) and its best checkpoint
  present (a missing one is repaired by the loop). Its ``results.json`` is returned as it
  is; one a kill left unwritten (after the final checkpoint) is written from the checkpoint.
  Nothing is trained, evaluated or written again, so ``metrics.jsonl`` keeps one record of
  each evaluation.
  """
  config, spe = run.config, run.steps_per_epoch
  total, step = config.num_epochs * spe, meta["step"]
  stopped = _stopped_early(config, meta)
  final, best = meta["final_evals"], meta.get("best")
  if (step < total and not stopped) or any(e.name not in final for e in evaluations) or (
      best and best_checkpoint(best) not in checkpointer.steps()):
    return None
  final = {e.name: final[e.name] for e in evaluations}
  results = workdir_lib.read_results(run.workdir)
  if not (results and results.get("steps") == step and all(
      (results.get("final") or {}).get(name) == values for name, values in final.items())):
    results = _results(run, meta, state, final, stopped=stopped, start_time=start_time)
    if run.is_main:
      workdir_lib.write_results(run.workdir, results)
    log("%s/%s was missing (the run stopped after its final checkpoint, before writing it): "
        "written from that checkpoint", run.workdir, workdir_lib.RESULTS_FILE)
  log("the run in %s is already complete at %s (%d of %d steps%s): nothing is trained or "
      "evaluated again (%sa new --workdir trains afresh)", run.workdir, _where(step, spe), step,
      total, ", stopped early" if stopped else "",
      "" if stopped else "a larger config.num_epochs resumes it, ")
  for name, values in final.items():
    shown = [k for k in EVAL_KEYS if k in values] or list(values)[:6]
    log("final %s %s", name, actions_lib.fmt(values, shown))
  return results


def _results(run: run_lib.Run, meta: Mapping[str, Any], state, final_eval, *, stopped: bool,
             start_time: float, train_time: float = 0.0, trained_steps: int = 0,
             first_step_s: float | None = None) -> dict[str, Any]:
  """The ``results.json`` content: final and best metrics, epochs, timing."""
  return {
      "dataset": run.sources.name, "epochs": meta["epoch"], "steps": meta["step"],
      "final": final_eval, "best": meta["best"], "selected_on": run.selection,
      "selection_metric": run.metric, "selection_mode": run.mode,
      "stopped_early": bool(stopped),
      # This process's time in train steps; its first step (with its compile) apart, and the
      # rate of the steps after it (of that step when it is the only one).
      "wall_time_s": time.time() - start_time, "train_time_s": train_time + (first_step_s or 0),
      "first_step_s": first_step_s,
      "samples_per_second": (trained_steps * run.config.batch_size / train_time if train_time
                             else run.config.batch_size / first_step_s if first_step_s
                             else None),
      "device_count": jax.device_count(), "process_count": jax.process_count(),
      "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "data": run.fingerprint,
  }


class Loop:
  """One run's steps and periodic actions: evaluations, selection, checkpoints, progress.

  What actions read: ``run``, ``config``, ``state`` (after the last step),
  ``meta`` (the checkpoint's bookkeeping), ``writer``, ``last_evals`` (this
  step's evaluations), ``last_step_metrics``.
  """

  def __init__(self, run: run_lib.Run, checkpointer: Checkpointer,
               writer: workdir_lib.MetricWriter, watch: PreemptionWatch,
               evaluations: Sequence[actions_lib.Evaluate], *,
               extra_actions: Sequence[actions_lib.PeriodicAction] = (),
               lock: workdir_lib.WorkdirLock | None = None):
    self.run, self.config = run, run.config
    self.lock = lock  # the workdir's, on process 0 (``_stop_if_workdir_taken``)
    self.checkpointer, self.writer, self.watch = checkpointer, writer, watch
    config, spe = self.config, run.steps_per_epoch
    self.total = config.num_epochs * spe
    self.programs = _run_programs(programs_key(config), run.model, run.loss_fn, run.mesh, spe)
    self.step_fn = self._program("step_fn", lambda: steps_lib.per_device_step(
        config, run.model, run.tx, loss_fn=run.loss_fn))
    self.embed_fns = {protocol: steps_lib.make_embed_fn(run.model, run.mesh, protocol=protocol)
                      for protocol in steps_lib.PROTOCOLS}
    self.lr = learning_rate_schedule(config, spe)
    self.on_device = run_lib.resolve_on_device(config.data.on_device)
    self.evaluations = list(evaluations)
    self.actions: list[actions_lib.PeriodicAction] = [
        actions_lib.ReportProgress(every_steps=config.log_every_steps),
        actions_lib.EpochSummary(every_steps=spe, at_end=True),
        *self.evaluations,
        actions_lib.SelectBest(),
        actions_lib.FinalEvaluations(),
        # A user's actions before the checkpoint of their step: what they keep in ``meta`` is
        # in that checkpoint, so it survives a resume from it. Those that act on the saved
        # checkpoint (``after_checkpoint``) after it.
        *[a for a in extra_actions if not a.after_checkpoint],
        actions_lib.Checkpoint(every=(config.get("checkpoint_every_steps", 0),
                                      config.checkpoint_every_epochs * spe)),
        *[a for a in extra_actions if a.after_checkpoint],
        *_profile_actions(config, run.workdir),
    ]
    self.state, self.meta = None, None
    self.train_time, self.trained_steps = 0.0, 0
    self.last_step_metrics: dict[str, float] = {}
    self.last_evals: dict[str, dict[str, float]] = {}
    self.new_best = self.stopping = False
    self.stopping_for: str | None = None
    self.saved_at: int | None = None
    self._output_cache: dict[str, tuple[set[str], dict[str, np.ndarray]]] = {}
    self.final = False  # the boundary being run (or last run) is the run's last evaluation
    self.compiled = False
    self.first_step_s: float | None = None  # this process's first step, compile included
    self._rate_marks: dict[str, tuple[float, int]] = {}  # rates(): (train_time, steps) by window
    self.loader: input_pipeline.TrainLoader | None = None  # streamed data (_start_data)

  # -- data and steps ------------------------------------------------------------------------

  def _start_data(self) -> None:
    config, run = self.config, self.run
    num_train = len(run.sources.train)
    spe = run.steps_per_epoch
    if self.on_device:
      self.arrays = input_pipeline.to_device(
          input_pipeline.load_split_arrays(run.sources.train), run.mesh)
      self.chunk_fn = self._program(("chunk", num_train), lambda: steps_lib.make_train_chunk(
          self.step_fn, run.mesh, global_batch_size=config.batch_size, num_examples=num_train,
          seed=config.seed, shuffle=config.data.shuffle))
      return
    self.loader = input_pipeline.TrainLoader(
        run.sources.train, global_batch_size=config.batch_size, mesh=run.mesh,
        seed=config.seed, shuffle=config.data.shuffle)
    position = self.meta.get("loader")
    if position is None or int(position["epoch"]) * spe + int(position["step"]) != \
        self.meta["step"]:  # a checkpoint of an on-device run: its position is its step
      position = {"epoch": self.meta["step"] // spe, "step": self.meta["step"] % spe}
    # The order is the config's seed and shuffle, as on device (a resume that changes them is
    # refused unless allow_resume_mismatch: run_lib.check_schedule).
    self.loader.set_state({"epoch": position["epoch"], "step": position["step"]})
    self.loader_iter = iter(self.loader)
    self.step_jit = self._program("step", lambda: steps_lib.make_train_step(self.step_fn,
                                                                             run.mesh))

  def _program(self, name, build: Callable[[], Callable]) -> Callable:
    """The run's program ``name``: the one an earlier run of this process built with the same
    config, model and loss (``_run_programs``), else ``build()``'s."""
    self.reused = name in self.programs
    if not self.reused:
      self.programs[name] = build()
    return self.programs[name]

  def _next_boundary(self, step: int) -> int:
    spe = self.run.steps_per_epoch
    candidates = [(step // spe + 1) * spe, self.total]
    candidates += [n for a in self.actions if (n := a.next_due(step)) is not None]
    if self.on_device and self.config.get("steps_per_call", 0):
      candidates.append(step + self.config.steps_per_call)
    return min(c for c in candidates if c > step)

  def _train(self, step: int, stop: int) -> int:
    """Steps ``step..stop-1`` (fewer when a preemption is seen); returns the step reached.

    This process's first step runs alone: it compiles (unless an earlier run of this process
    compiled the same program), and its time (``first_step_s``) is left out of the rates
    (``rates``) and the ETA, which time the steps after it.
    """
    if not self.compiled:
      log("%s the train %s", "reusing (compiled by an earlier run of this process)"
          if self.reused else "compiling", "chunk" if self.on_device else "step")
      self.compiled = True
      t0 = time.time()
      reached = self._steps(step, step + 1)
      self.first_step_s = time.time() - t0
      if reached == stop or self.stopping_for is not None:  # that step was all, or a signal
        return reached  # came during it (it stops at the next boundary, not a step later)
      step = reached
    t0 = time.time()
    reached = self._steps(step, stop)
    self.train_time += time.time() - t0
    self.trained_steps += reached - step
    return reached

  def _steps(self, step: int, stop: int) -> int:
    """``_train``'s steps, untimed: one compiled call (on device) or one call per step."""
    spe = self.run.steps_per_epoch
    if self.on_device:
      epoch, start = divmod(step, spe)
      self.state, table = self.chunk_fn(self.state, self.arrays, jnp.int32(epoch),
                                         jnp.int32(start), jnp.int32(start + stop - step))
      rows = jax.tree.map(lambda t: np.asarray(t)[start:start + stop - step], table)
    else:
      self.state, rows = steps_lib.run_steps(self.step_jit, self.state, self.loader_iter,
                                             steps=stop - step, stop=self._preemption_seen)
    done = len(rows["loss"])
    self._accumulate(step, rows)
    return step + done

  def _preemption_seen(self) -> bool:
    """Asked at every step boundary, by every process alike (``PreemptionWatch.requested``)."""
    if self.stopping_for is None and self.watch.requested():
      self.stopping_for = self.watch.signal_name
    return self.stopping_for is not None

  def _accumulate(self, step: int, rows: Mapping[str, np.ndarray]) -> None:
    """Adds the steps' metrics to the epoch's sums (float64, in step order: resumable)."""
    bad = np.flatnonzero(~np.isfinite(rows["loss"]))
    if bad.size:
      at = step + int(bad[0]) + 1
      raise FloatingPointError(f"non-finite loss at step {at} (epoch "
                               f"{math.ceil(at / self.run.steps_per_epoch)}); "
                               f"{self._last_good()}")
    sums = self.meta.setdefault("epoch_metrics", {"count": 0, "sums": {}})
    for i in range(len(rows["loss"])):
      for key, values in rows.items():
        sums["sums"][key] = sums["sums"].get(key, 0.0) + float(values[i])
      sums["count"] += 1
    self.last_step_metrics = {k: float(v[-1]) for k, v in rows.items()}

  def epoch_means(self) -> dict[str, float]:
    sums = self.meta.get("epoch_metrics") or {"count": 0, "sums": {}}
    return {k: v / max(sums["count"], 1) for k, v in sums["sums"].items()}

  def reset_epoch_metrics(self) -> None:
    self.meta["epoch_metrics"] = {"count": 0, "sums": {}}

  def seconds_per_step(self) -> float:
    """Seconds per step since this process's first (compiling) step: that step's time when it
    is the only one yet."""
    if self.trained_steps:
      return self.train_time / self.trained_steps
    return self.first_step_s or 0.0

  def samples_per_second(self) -> float:
    """The rate since this process's first (compiling) step (``seconds_per_step``)."""
    per_step = self.seconds_per_step()
    return self.config.batch_size / per_step if per_step else 0.0

  def rates(self, window: str) -> tuple[float, float]:
    """``(samples per second, seconds per step)`` of the steps since the last call with the
    same ``window`` (e.g. one epoch's), the first (compiling) step left out; the overall rate
    when the window holds no other step."""
    time0, steps0 = self._rate_marks.get(window, (0.0, 0))
    self._rate_marks[window] = (self.train_time, self.trained_steps)
    steps, seconds = self.trained_steps - steps0, self.train_time - time0
    per_step = seconds / steps if steps else self.seconds_per_step()
    return (self.config.batch_size / per_step if per_step else 0.0), per_step

  def eta(self, step: int) -> float | None:
    """Seconds left: the steps at the rate so far, plus the evaluations still to come; None
    before a step after this process's first (whose time is mostly its compile)."""
    if self.stopping:
      return 0.0
    if not self.trained_steps:
      return None
    evals = sum(e.firings(step, self.total) * (e.seconds / e.count)
                for e in self.evaluations if e.count)
    return (self.total - step) * self.seconds_per_step() + evals

  # -- evaluation and selection ----------------------------------------------------------------

  def evaluate(self, action: actions_lib.Evaluate, step: int) -> None:
    """Runs one evaluator (the split's outputs shared at this step); its values are checked,
    written and kept in ``last_evals``."""
    spec = action.spec
    # Made and recorded before this step's checkpoint (a record only the state of that
    # checkpoint has: a trained step clears it); the repair of a missing best takes it too.
    done = self.meta.get("final_evals") or {}
    if spec.name in done:
      self.last_evals[spec.name] = done[spec.name]
      return
    ctx = evaluators_lib.EvalContext(run=self.run, state=self.state, step=step,
                                     split=spec.split, _outputs=self._outputs, final=self.final)
    values = action.evaluator(ctx)
    try:
      values = {k: float(v) for k, v in values.items()}
    except (TypeError, ValueError, AttributeError) as e:
      raise TypeError(f"config.evals.{spec.name} (evaluator {spec.type!r}): expected a mapping "
                      f"of metric names to numbers, got {type(values).__name__} ({e})") from e
    where = _where(step, self.run.steps_per_epoch)
    bad = sorted(k for k, v in values.items() if not math.isfinite(v))
    if bad:
      raise FloatingPointError(
          f"non-finite {spec.name} evaluation after {where} ({', '.join(bad[:4])}"
          f"{' ...' if len(bad) > 4 else ''}: {values[bad[0]]}); this state is not saved; "
          f"{self._last_good()}")
    self.last_evals[spec.name] = values
    epoch = math.ceil(step / self.run.steps_per_epoch)
    self._stop_if_workdir_taken(step)  # an evaluation may take longer than a lease
    self.writer.write(step, spec.name, values, epoch=epoch,
                      final=final_mark(spec, self.config) if self.final else None)
    if self.final:  # the checkpoint of this step records that it is done (not made again)
      self.meta.setdefault("final_evals", {})[spec.name] = values
      self.meta.setdefault("final_eval_settings", {})[spec.name] = eval_settings(
          spec, self.config)
    shown = [k for k in EVAL_KEYS if k in values] or list(values)[:6]
    log("%s %s %s", where, spec.name, actions_lib.fmt(values, shown))

  def _outputs(self, split: str, protocol: str = "both") -> dict[str, np.ndarray]:
    """The split's eval-mode outputs of ``protocol``, each protocol embedded once per step."""
    done, out = self._output_cache.setdefault(split, (set(), {}))
    missing = [p for p in steps_lib.protocols_of(protocol) if p not in done]
    if missing:
      out.update(steps_lib.embed_split(
          self.embed_fns["both" if len(missing) == 2 else missing[0]], self.state.variables,
          getattr(self.run.sources, split), mesh=self.run.mesh,
          batch_size=self.config.eval_batch_size))
      done.update(missing)
    return out

  def select(self, step: int, *, early_stopping: bool = True) -> None:
    """Updates the best-so-far and (``early_stopping``) the early-stopping count from this
    step's evaluations."""
    meta, run = self.meta, self.run
    if run.selection == run_lib.LAST:  # nothing to select on: the latest state is the best
      meta["best"] = {"epoch": step // run.steps_per_epoch, "step": step, "checkpoint": step,
                      "selected_on": run_lib.LAST, "metric": "step", "value": float(step),
                      **self.last_evals}
      self.new_best = True
      return
    chosen = self.last_evals[run.selection]
    if run.metric not in chosen:
      raise KeyError(f"config.selection_metric: evaluator {run.selection!r} reports no "
                     f"{run.metric!r} (it reports {', '.join(sorted(chosen))})")
    value = chosen[run.metric]
    if meta["best"] is None or (value > meta["best"]["value"] if run.mode == "max"
                                else value < meta["best"]["value"]):
      meta["best"] = {"epoch": step // run.steps_per_epoch, "step": step, "checkpoint": step,
                      "selected_on": run.selection, "metric": run.metric, "mode": run.mode,
                      "value": value, **self.last_evals}
      self.new_best = True
    patience = self.config.early_stopping_patience
    if not patience or not early_stopping:
      return
    if "loss" not in chosen:
      raise KeyError(f"config.early_stopping_patience={patience}: evaluator {run.selection!r} "
                     "reports no loss")
    if meta["best_eval_loss"] is None or chosen["loss"] < meta["best_eval_loss"]:
      meta["best_eval_loss"] = chosen["loss"]
      meta["evals_without_improvement"] = 0
    else:
      meta["evals_without_improvement"] += 1
    self.stopping = meta["evals_without_improvement"] >= patience

  # -- checkpoints ---------------------------------------------------------------------------

  def _last_good(self) -> str:
    with contextlib.suppress(Exception):  # a failed save is not the error being reported
      self.checkpointer.wait()
    last = _last_intact(self.checkpointer)
    return f"last good checkpoint: {last}{' (kept)' if last != 'none' else ''}"

  def save(self, step: int) -> None:
    """Saves ``checkpoints/<step>``; the state must be finite, the workdir still this run's."""
    self._stop_if_workdir_taken(step)
    self.checkpointer.check_for_errors()
    if not bool(_state_is_finite(self.state)):
      raise FloatingPointError(
          f"non-finite parameters or optimiser state after {_where(step, self.run.steps_per_epoch)}"
          f"; this state is not saved; {self._last_good()}")
    self.checkpointer.save(step, self.state, self._checkpoint_meta(step))
    self.saved_at = step

  def _checkpoint_meta(self, step: int) -> dict[str, Any]:
    """What a checkpoint of ``step`` records beside the state."""
    return {**self.meta, FINALS_MARKED: True, "checkpoint": step, "model": self.run.mcfg,
            "data": self.run.fingerprint, "loss": self.config.loss.to_dict(),
            "schedule": run_lib.schedule_record(self.config)}

  def _repair_best(self) -> None:
    """A resume whose best checkpoint is gone re-evaluates the restored state as the best (a
    finished run's recorded final evaluations are taken as they are); the rows of that step
    already in ``metrics.jsonl`` are rewritten, not written twice (``MetricWriter``)."""
    best = self.meta.get("best")
    if not best or best_checkpoint(best) in self.checkpointer.steps():
      return
    step = self.meta["step"]
    number = int(self.meta.get("checkpoint", self.meta["epoch"]))  # older runs: by epoch
    log("the best checkpoint (%s) is missing: the restored %s is evaluated and becomes the "
        "best so far", _where(best["step"], self.run.steps_per_epoch) if "step" in best
        else f"epoch {best['epoch']}", _where(step, self.run.steps_per_epoch))
    self.meta["best"] = None
    # Only the best changes: early stopping counts the evaluations the run did, not this one.
    self._at_boundary(step, only=[*self.evaluations,
                                  actions_lib.SelectBest(early_stopping=False)])
    if self.meta["best"] is not None:
      self.meta["best"]["checkpoint"] = number
    # The restored checkpoint's state is this state: only its meta changes (one file).
    self._stop_if_workdir_taken(step)
    self.checkpointer.rewrite_meta(number, {**self._checkpoint_meta(step), "checkpoint": number})

  # -- the run -------------------------------------------------------------------------------

  def _at_boundary(self, step: int, *, only=None, final: bool | None = None) -> None:
    """Calls every action due at ``step`` (``only``: those, due or not), in order.

    ``final``: the evaluations are the run's last (default: at its last step).
    """
    self._stop_if_workdir_taken(step)  # before any action writes
    self.last_evals, self.new_best, self._output_cache = {}, False, {}
    self.final = step >= self.total if final is None else final
    self.saved_at = None
    self.meta["step"], self.meta["epoch"] = step, step // self.run.steps_per_epoch
    for action in (only if only is not None else self.actions):
      # An early stop (known once SelectBest ran) makes this step the run's last: the actions
      # after it that fire ``at_end`` fire here.
      if only is not None or action.due(step, step if self.stopping else self.total):
        action(self, step)
    self._output_cache = {}

  def fit(self, state, meta, start_time: float) -> dict[str, Any]:
    config, run = self.config, self.run
    self.state, self.meta = state, meta
    self.meta.setdefault("epoch_metrics", {"count": 0, "sums": {}})
    best = meta.get("best") or {}
    if best.get("selected_on", run.selection) != run_lib.LAST and best.get("metric") == \
        run.metric and best.get("mode", "max") != run.mode:
      log("the best so far (%s %s %.6g) was the %s; later evaluations are compared by the %s "
          "(config.selection_mode)", best["selected_on"], run.metric, best["value"],
          "highest" if best.get("mode", "max") == "max" else "lowest",
          "highest" if run.mode == "max" else "lowest")
    # A run that stopped early (and was preempted or rerun after) stays stopped.
    self.stopping = _stopped_early(config, meta)
    step = meta["step"]
    self._stop_if_signalled_while_starting(step)
    self._start_data()
    self._repair_best()
    self._stop_if_signalled_while_starting(step)  # during the data's copy or the repair
    log("training %s on %d device(s) of %d process(es): %d examples, %d steps/epoch, %d epochs",
        run.sources.name, jax.device_count(), jax.process_count(), len(run.sources.train),
        run.steps_per_epoch, config.num_epochs)
    for action in self.actions:  # a profile that starts before the first step
      if isinstance(action, actions_lib.Profile):
        action.begin(self, step)
    while step < self.total and not self.stopping:
      # a step trained: a final evaluation of an earlier one is not
      self.meta["final_evals"], self.meta["final_eval_settings"] = {}, {}
      step = self._train(step, self._next_boundary(step))
      self.meta["step"] = step
      if not self.on_device:
        self.meta["loader"] = self.loader.get_state()
      self._at_boundary(step)
      if self._signalled_with_steps_left(step):
        self._preempted(step)
    if self.stopping:
      log("early stopping after %s: %d evaluations without a lower %s loss",
          _where(step, run.steps_per_epoch), meta["evals_without_improvement"], run.selection)
    self.checkpointer.wait()  # results.json names only complete checkpoints
    done = self.meta.setdefault("final_evals", {})  # made before the checkpoint of their step
    missing = [e for e in self.evaluations if e.name not in done]
    if missing:  # a finished run resumed with an evaluator it has not run (or with other
      # settings), or a checkpoint of a version that did not record them: made once, and
      # recorded in the checkpoint (a row a kill before that record left is rewritten)
      self._at_boundary(step, only=missing, final=True)
      self._record_final_evals()
    final_eval = {e.name: done[e.name] for e in self.evaluations}
    results = _results(run, self.meta, self.state, final_eval, stopped=self.stopping,
                       start_time=start_time, train_time=self.train_time,
                       trained_steps=self.trained_steps, first_step_s=self.first_step_s)
    self._stop_if_workdir_taken(step)
    if run.is_main:
      workdir_lib.write_results(run.workdir, results)
    return results

  def finish_early(self, step: int) -> None:
    """An early stop's final evaluations, at the step it stopped at (``FinalEvaluations``):
    every evaluator, as at the run's last step (both protocols); the checkpoint of that step,
    saved after them, records them."""
    self.final = True
    for action in self.evaluations:
      action(self, step)

  def _record_final_evals(self) -> None:
    """Adds the final evaluations made after the restored checkpoint was saved to its meta
    (one file, written whole), so that a rerun does not make them again."""
    number = int(self.meta.get("checkpoint", self.meta["epoch"]))  # older runs: by epoch
    self._stop_if_workdir_taken(self.meta["step"])
    saved = self.checkpointer.read_meta(step=number)
    self.checkpointer.rewrite_meta(number, {
        **saved, "final_evals": self.meta["final_evals"],
        "final_eval_settings": self.meta.get("final_eval_settings", {})})

  def _stop_if_workdir_taken(self, step: int) -> None:
    """A ``WorkdirError`` when another run took the workdir over (``WorkdirLock.lost_to``):
    asked before each write of a step boundary, so that nothing more is written into a workdir
    that run owns now (the error path writes nothing either, and leaves its lock as it is).

    Only process 0 holds the lock; its answer is broadcast so that every process stops at the
    same place (a process that went on alone would hang in the next collective). One process
    asks only the lock's record of what its renewer saw.
    """
    owner = None
    if self.lock is not None:
      try:
        owner = self.lock.lost_to()
      except Exception as e:  # pylint: disable=broad-except
        # Not evidence of a takeover (and process 0 alone raising would leave the others
        # waiting in the broadcast): asked again at the next write.
        log("warning: could not read %s: %s", self.lock.path, e)
    taken = owner is not None
    if jax.process_count() > 1:
      taken = bool(multihost_utils.broadcast_one_to_all(np.int32(taken)))
    if not taken:
      return
    lease_s = self.lock.lease_s if self.lock is not None else workdir_lib.LEASE_S
    raise workdir_lib.taken_over(
        "--workdir", self.run.workdir / workdir_lib.LOCK_NAME, owner, lease_s=lease_s,
        stopped=f"at {_where(step, self.run.steps_per_epoch)}, wrote nothing more and saved no "
        "checkpoint after it found the lock lost")

  def _signalled_with_steps_left(self, step: int) -> bool:
    """A signal came (every process alike) and steps are left to train: at the last step (or
    an early stop) only the final evaluations are left, and they run."""
    return step < self.total and not self.stopping and self._preemption_seen()

  def _stop_if_signalled_while_starting(self, step: int) -> None:
    """``Preempted`` before the first step when a signal came (every process alike)."""
    if self._signalled_with_steps_left(step):
      raise Preempted(f"{self.stopping_for} while starting, before the first step: nothing new "
                      f"to save; rerun the same command to resume from "
                      f"{_where(step, self.run.steps_per_epoch) if step else 'the start'}",
                      step=step)

  def _preempted(self, step: int) -> None:
    """Saves this step (unless just saved), waits for it, and stops the run."""
    self.watch.saving = True
    if self.saved_at != step:
      self.save(step)
    self.checkpointer.wait()
    where = _where(step, self.run.steps_per_epoch)
    raise Preempted(f"{self.stopping_for}: saved {self.checkpointer.directory}/{step} at "
                    f"{where} of {self.total} steps; rerun the same command to resume",
                    step=step)

  def close_actions(self) -> None:
    """Closes the actions (a profile's trace) and stops the loader's prefetch thread, on every
    exit path."""
    for action in self.actions:
      with contextlib.suppress(Exception):  # the error that ended the run is what is raised
        action.close(self)
    if self.loader is not None:
      with contextlib.suppress(Exception):
        self.loader.close()


def _profile_actions(config: ml_collections.ConfigDict, workdir) -> list[actions_lib.Profile]:
  steps = tuple(config.get("profile_steps", ()) or ())
  if not steps or workdir is None:
    return []
  # Every process traces; JAX names a trace file by the host, so several processes of one
  # host each get their own folder (TensorBoard shows each as a run).
  directory = workdir / "profile"
  if jax.process_count() > 1:
    directory = directory / f"process_{jax.process_index()}"
  return [actions_lib.Profile(steps[0], steps[1], directory)]
