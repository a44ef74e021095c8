"""The per-device train step, its mapped forms (a step, a whole epoch) and evaluation.

The per-device ``train_step`` is written in the programming model of
``jax.pmap``: it sees one shard of the global batch and uses explicit
collectives over the ``data`` axis (``lax.pmean`` of gradients and metrics,
BatchNorm statistics synchronised). ``make_train_step`` maps it over a
one-axis ``data`` mesh of every device of every process with
``jax.shard_map`` under ``jax.jit`` (``check_vma=False``, so gradients of
replicated parameters are the per-device ones and the ``pmean`` is the only
reduction, exactly as under ``pmap``). ``make_train_epoch`` runs a whole epoch
as one compiled call (``lax.scan`` over the steps, the epoch's permutation
drawn on device) when the train split is in device memory.

Dropout masks are drawn per example from a key folded with the step and the
example's position in the global batch, so the same global batch gives the
same update on any number of devices.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dsf3n_jax import input_pipeline, losses, metrics
from dsf3n_jax import mesh as mesh_lib
from dsf3n_jax.mesh import DATA_AXIS as AXIS
from dsf3n_jax.models import DSF3N, DSF3NOutput
from dsf3n_jax.training.state import TrainState, build_optimizer, memoized

Batch = Mapping[str, jax.Array]


def _loss_precision(x: jax.Array) -> jax.Array:
  """Outputs below float32 (bfloat16) are promoted for the loss; float32/64 stay as given."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def cast_for_compute(params, dtype):
  """The weight matrices (and convolution kernels) of ``params`` in a compute ``dtype``
  narrower than float32, once per step: a module casts its kernel at every use (the shared
  MFA's bilinear kernel, 16.8 M values, several times a step), and the cast of one copy is
  what the gradient flows back through. Vectors (biases, BatchNorm's scale and bias) and
  float32/float64 compute stay as they are."""
  if dtype is None or jnp.dtype(dtype).itemsize >= 4:
    return params
  return jax.tree.map(lambda p: p.astype(dtype) if p.ndim >= 2 else p, params)


def train_step(state: TrainState, batch: Batch, *, model: DSF3N,
               tx: optax.GradientTransformation, loss_fn: losses.LossFn,
               unimodal_weight: float | jax.Array = 0.0,
               unimodal_loss_fn: losses.LossFn | None = None, unimodal: bool | None = None,
               model_kw: Mapping[str, jax.Array] | None = None, teacher: bool = False,
               axis_name: str = AXIS) -> tuple[TrainState, dict]:
  """One optimiser step on this device's shard of the global batch.

  Must run under a mapping that binds ``axis_name`` (``shard_map`` with
  ``check_vma=False``, or ``pmap``). ``model`` must have ``axis_name`` set
  so that BatchNorm statistics are those of the global batch.

  ``loss_fn(outputs, batch, aux, *, axis_name) -> (total, parts)`` (e.g.
  ``losses.loss_from_config``) returns this device's share of the global
  loss; ``aux`` is ``state.aux``. ``unimodal_weight > 0`` adds that weight
  times ``unimodal_loss_fn`` (None: ``loss_fn``) of the outputs of each
  modality embedded alone (``DSF3N.embed_visual`` / ``embed_audio``); its
  parts are reported as ``unimodal_<part>``. ``unimodal``: whether that term is
  there, when ``unimodal_weight`` is a traced array (a sweep); ``model_kw``: rates of
  the model's call in place of its fields' (``partner_dropout``, ``input_noise``: traced
  arrays in a sweep). ``teacher``: the unimodal loss reads ``batch["teacher"]``
  (``losses.uses_teacher``): the paired outputs with every real partner, from the same
  forward pass (``DSF3N.__call__(..., teacher=True)``); otherwise that key holds the
  paired outputs as the loss sees them.
  """
  labels = batch["label"]
  local = labels.shape[0]
  example_ids = jax.lax.axis_index(axis_name) * local + jnp.arange(local)
  dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  if unimodal is None:
    unimodal = unimodal_weight > 0

  def objective(trainable):
    outputs, mutated = model.apply(
        {"params": cast_for_compute(trainable["net"], getattr(model, "dtype", None)),
         "batch_stats": state.batch_stats},
        batch["visual"], batch["audio"], train=True, example_ids=example_ids,
        rngs={"dropout": dropout_key}, mutable=["batch_stats"], unimodal=unimodal,
        **({"teacher": True} if unimodal and teacher else {}), **(model_kw or {}))
    outputs = jax.tree.map(_loss_precision, outputs)
    paired = outputs[0] if unimodal else outputs
    loss_batch = {"label": labels, "mask": None}
    total, parts = loss_fn(paired, loss_batch, trainable["aux"], axis_name=axis_name)
    if unimodal:  # the paired outputs are the teacher of distillation terms
      taught = outputs[2] if teacher else paired
      alone_total, alone_parts = (unimodal_loss_fn or loss_fn)(
          outputs[1], {**loss_batch, "teacher": jax.lax.stop_gradient(taught)},
          trainable["aux"], axis_name=axis_name)
      total = total + unimodal_weight * alone_total
      parts = {**parts, **{f"unimodal_{k}": v for k, v in alone_parts.items()}}
    return total, (parts, mutated["batch_stats"], paired)

  (total, (parts, batch_stats, outputs)), grads = jax.value_and_grad(
      objective, has_aux=True)(state.trainable)
  grads = mesh_lib.pmean(grads, axis_name)  # no collective on a 1-device mesh
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  _, _, logits_v, logits_a = outputs
  step_metrics = {
      "loss": total, **parts,
      "accuracy_visual": jnp.mean(jnp.argmax(logits_v, -1) == labels),
      "accuracy_audio": jnp.mean(jnp.argmax(logits_a, -1) == labels),
  }
  step_metrics = mesh_lib.pmean(step_metrics, axis_name)
  new_state = state.replace(step=state.step + 1, params=trainable["net"],
                            batch_stats=batch_stats, aux=trainable["aux"], opt_state=opt_state)
  return new_state, step_metrics


def per_device_step(config: ml_collections.ConfigDict, model: DSF3N,
                    tx: optax.GradientTransformation, *,
                    loss_fn: losses.LossFn | None = None) -> Callable:
  """``train_step`` with the model, optimiser and loss bound.

  ``loss_fn`` None: the terms of ``config.loss`` (``losses.loss_from_config``),
  and with ``config.loss.unimodal_weight > 0`` their unimodal form; a given
  ``loss_fn`` is used for both.
  """
  unimodal_loss_fn = loss_fn
  if loss_fn is None:  # the config's weights bound as constants
    loss_fn = losses.loss_from_config(config.loss)
    unimodal_loss_fn = losses.loss_from_config(config.loss, unimodal=True)
  return functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                           unimodal_weight=_unimodal_weight(config),
                           unimodal_loss_fn=unimodal_loss_fn,
                           teacher=losses.uses_teacher(config.loss))


# The (section, key) of the config values ``per_device_hyper_step`` traces, besides every loss
# term's weight (``loss.terms``, ``loss.unimodal_terms``); ``hyper_params`` keys them by ``key``.
HYPER_FIELDS = (("optim", "lr"), ("optim", "weight_decay"), ("model", "partner_dropout"),
                ("model", "input_noise"), ("loss", "unimodal_weight"))


def hyper_params(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The values of ``config`` that ``per_device_hyper_step`` takes as (traced) arguments:
  the network's learning rate and weight decay, the partner-dropout rate, the input
  noise, the unimodal loss's weight (``HYPER_FIELDS``) and every term's weight of both
  losses."""
  values = {key: float(config[section].get(key, 0.0)) for section, key in HYPER_FIELDS}
  values["unimodal_weight"] = _unimodal_weight(config)
  return {**values, "weights": {"paired": losses.term_weights(config.loss),
                                "unimodal": losses.term_weights(config.loss, unimodal=True)}}


def per_device_hyper_step(config: ml_collections.ConfigDict, model: DSF3N, *,
                          steps_per_epoch: int) -> Callable:
  """``(state, batch, hyper) -> (state, metrics)`` with ``hyper_params`` an argument.

  Passed as arrays, the hyper-parameters are traced: configs that differ only in
  their values share one compiled step, and a sweep stacks them (``training.seeds``).
  What shapes the program stays the config's: whether there is weight decay, a unimodal
  loss, partner dropout, input noise, and which loss terms.
  """
  unimodal = _unimodal_weight(config) > 0
  teacher = losses.uses_teacher(config.loss)
  rates = [k for k in ("partner_dropout", "input_noise") if float(getattr(model, k, 0.0)) > 0]

  def step(state: TrainState, batch: Batch, hyper) -> tuple[TrainState, dict]:
    tx = build_optimizer(config, steps_per_epoch, lr=hyper["lr"],
                         weight_decay=hyper["weight_decay"])
    return train_step(
        state, batch, model=model, tx=tx,
        loss_fn=losses.loss_from_config(config.loss, weights=hyper["weights"]["paired"]),
        unimodal_weight=hyper["unimodal_weight"], unimodal=unimodal,
        unimodal_loss_fn=losses.loss_from_config(config.loss,
                                                 weights=hyper["weights"]["unimodal"]),
        model_kw={k: hyper[k] for k in rates}, teacher=teacher)

  return step


def _unimodal_weight(config: ml_collections.ConfigDict) -> float:
  return max(float(config.loss.get("unimodal_weight", 0.0)), 0.0)


def make_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """``(state, global_batch) -> (state, metrics)`` over every device of ``mesh``."""
  mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))


def _device_batches(seed, epoch, *, num_examples: int, steps: int, n_dev: int, local: int,
                    shuffle: bool) -> jax.Array:
  """(steps, n_dev, local) rows of the epoch's global batches (the streaming loader's order)."""
  if shuffle:
    order = input_pipeline.epoch_permutation(seed, epoch, num_examples)
  else:
    order = jnp.arange(num_examples)
  return order[:steps * n_dev * local].reshape(steps, n_dev, local)


def _gather_batch(arrays, rows) -> dict[str, jax.Array]:
  return {k: arrays[k][rows] for k in ("visual", "audio", "label")}


def make_train_epoch(step_fn: Callable, mesh: Mesh, *, global_batch_size: int,
                     num_examples: int, seed: int, shuffle: bool,
                     unroll: int | bool = 1) -> Callable:
  """``(state, arrays, epoch) -> (state, per-step metrics)``: one epoch, one call.

  ``arrays`` is the whole train split, replicated on every device. The
  epoch's order is ``input_pipeline.epoch_permutation`` (the streaming
  loader's), drawn on device; each device gathers its slice of each global
  batch.
  """
  steps = num_examples // global_batch_size
  n_dev = mesh.shape[AXIS]
  local = global_batch_size // n_dev

  def epoch_fn(state, arrays, epoch):
    order = _device_batches(seed, epoch, num_examples=num_examples, steps=steps, n_dev=n_dev,
                            local=local, shuffle=shuffle)
    device = jax.lax.axis_index(AXIS)

    def body(state, idx):
      return step_fn(state, _gather_batch(arrays, idx[device]))

    return jax.lax.scan(body, state, order, unroll=unroll)

  mapped = jax.shard_map(epoch_fn, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P()),
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))


def make_train_chunk(step_fn: Callable, mesh: Mesh, *, global_batch_size: int,
                     num_examples: int, seed: int, shuffle: bool) -> Callable:
  """``(state, arrays, epoch, start, stop) -> (state, metrics)``: steps ``start..stop-1`` of
  0-based ``epoch``, one call, the train split in device memory (as ``make_train_epoch``).

  ``start`` and ``stop`` are traced: one compiled program runs a chunk of any
  length (a ``fori_loop`` of unknown trip count), so a run that stops inside an
  epoch (a checkpoint, an evaluation, a preemption) and a run that does not
  execute the same step program, bit for bit. ``metrics`` holds one row per
  step of the epoch; rows ``start..stop-1`` are this chunk's, the rest zeros.
  """
  steps = num_examples // global_batch_size
  n_dev = mesh.shape[AXIS]
  local = global_batch_size // n_dev

  def chunk_fn(state, arrays, epoch, start, stop):
    order = _device_batches(seed, epoch, num_examples=num_examples, steps=steps, n_dev=n_dev,
                            local=local, shuffle=shuffle)
    device = jax.lax.axis_index(AXIS)
    shapes = jax.eval_shape(step_fn, state, _gather_batch(arrays, order[0, 0]))[1]
    table = jax.tree.map(lambda s: jnp.zeros((steps, *s.shape), s.dtype), shapes)

    def body(i, carry):
      state, table = carry
      state, m = step_fn(state, _gather_batch(arrays, order[i, device]))
      return state, jax.tree.map(lambda t, v: t.at[i].set(v), table, m)

    return jax.lax.fori_loop(start, stop, body, (state, table))

  mapped = jax.shard_map(chunk_fn, mesh=mesh, in_specs=(P(),) * 5, out_specs=(P(), P()),
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))


def run_steps(step: Callable, state: TrainState, batches, *, steps: int, log_every: int = 0,
              on_log: Callable[[int, dict], None] | None = None,
              stop: Callable[[], bool] | None = None):
  """Up to ``steps`` calls of a jitted ``step`` on ``next(batches)``: streamed steps, as the
  training loop runs them.

  Every ``log_every``-th step (1-based) its metrics are fetched to the host (a
  sync) and passed to ``on_log(i, metrics)`` with ``i`` the 0-based step.
  ``stop()``, asked after each step (a host check, no sync), ends the run of
  steps early when True (a preemption).

  Returns:
    ``(state, per-step metrics)``, the metrics of the steps taken stacked as numpy.
  """
  collected = []
  for i in range(steps):
    state, m = step(state, next(batches))
    collected.append(m)
    if log_every and (i + 1) % log_every == 0:
      m = jax.device_get(m)
      if on_log is not None:
        on_log(i, m)
    if stop is not None and stop():
      break
  return state, jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *collected)


# The outputs of each retrieval protocol: the paired pass (the paper's: each item with its
# partner; the loss and the classifiers' accuracy need it too) and each modality alone.
PROTOCOL_KEYS = {"paired": ("emb_visual", "emb_audio", "logits_visual", "logits_audio"),
                 "unimodal": ("unimodal_emb_visual", "unimodal_emb_audio")}
PROTOCOLS = ("paired", "unimodal", "both")
PREFIXES = {"paired": "", "unimodal": "unimodal_"}  # of each protocol's keys and metrics
MAP_KEYS = ("audio_to_visual", "visual_to_audio", "average")  # each protocol's map_<key>
EMBED_KEYS = PROTOCOL_KEYS["paired"] + PROTOCOL_KEYS["unimodal"]


def protocols_of(protocol: str) -> tuple[str, ...]:
  """``"both"`` -> ``("paired", "unimodal")``; one protocol -> itself."""
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol: expected one of {', '.join(PROTOCOLS)}, got {protocol!r}")
  return ("paired", "unimodal") if protocol == "both" else (protocol,)


def make_embed_fn(model: DSF3N, mesh: Mesh, *, unimodal: bool = True,
                  protocol: str | None = None) -> Callable:
  """Eval-mode forward of a batch sharded over ``data`` (same sharding).

  Returns the outputs of ``protocol`` (``PROTOCOL_KEYS``), in at least float32:
  ``"paired"`` one fusion pass per pair (``DSF3N.__call__``); ``"unimodal"``
  each modality's embedding alone (``embed_visual`` / ``embed_audio``: one
  fusion pass per item, no paired outputs); ``"both"`` the two from one pass of
  the encoders. ``protocol`` None: ``"both"``, or ``"paired"`` with
  ``unimodal=False``. Equal models (flax modules compare by their fields) on
  the same mesh get the same jitted function, so a grid of runs or repeated
  evaluations trace and compile it once.
  """
  if protocol is None:
    protocol = "both" if unimodal else "paired"
  protocols_of(protocol)
  return _embed_fn(model, mesh, protocol)


@memoized
def _embed_fn(model: DSF3N, mesh: Mesh, protocol: str) -> Callable:
  def embed(variables, visual, audio):
    if protocol == "paired":
      out = model.apply(variables, visual, audio, train=False)
    elif protocol == "unimodal":
      out = (model.apply(variables, visual, train=False, method="embed_visual"),
             model.apply(variables, audio, train=False, method="embed_audio"))
    else:
      paired, alone = model.apply(variables, visual, audio, train=False, unimodal=True)
      out = (*paired, alone.emb_visual, alone.emb_audio)
    keys = sum((PROTOCOL_KEYS[p] for p in protocols_of(protocol)), ())
    return {k: _loss_precision(x) for k, x in zip(keys, out)}
  mapped = jax.shard_map(embed, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(AXIS),
                         check_vma=False)
  return jax.jit(mapped)


def _gather(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_split(embed_fn: Callable, variables, source, *, mesh: Mesh,
                batch_size: int) -> dict[str, np.ndarray]:
  """Eval-mode outputs for every item of ``source``, in order, padding removed.

  Overlapped: batch i+1 is put on the devices and its forward dispatched
  while batch i's outputs travel to the host (``copy_to_host_async``).
  """
  parts: dict[str, list[np.ndarray]] = {}

  def collect(out):
    keep = _gather(out.pop("mask")) > 0
    for key, value in out.items():
      parts.setdefault(key, []).append(_gather(value)[keep])

  pending = None
  for batch in input_pipeline.eval_batches(source, global_batch_size=batch_size, mesh=mesh):
    out = {**embed_fn(variables, batch["visual"], batch["audio"]),
           **{k: batch[k] for k in ("label", "index", "mask")}}
    for value in out.values():
      if value.is_fully_addressable:
        value.copy_to_host_async()
    if pending is not None:
      collect(pending)
    pending = out
  if pending is not None:
    collect(pending)
  return {k: np.concatenate(v) for k, v in parts.items()}


@memoized
def _split_loss(loss_fn: losses.LossFn) -> Callable:
  """``loss_fn`` on a whole split, compiled (once per function and split size): one program
  instead of an op-by-op run that compiles each of its dozens of operations."""
  return jax.jit(lambda outputs, labels, aux: loss_fn(outputs, {"label": labels, "mask": None},
                                                      aux))


def loss_metrics(out: Mapping[str, np.ndarray], state: TrainState, *,
                 loss_fn: losses.LossFn) -> dict[str, float]:
  """The loss (and its parts) of the paired outputs on the whole split, and the accuracies."""
  outputs = DSF3NOutput(*(jnp.asarray(out[k]) for k in DSF3NOutput._fields))
  total, parts = _split_loss(loss_fn)(
      outputs, jnp.asarray(out["label"]), jax.tree.map(jnp.asarray, state.aux))
  return {"loss": float(total), **{k: float(v) for k, v in parts.items()},
          "accuracy_visual": float(np.mean(out["logits_visual"].argmax(-1) == out["label"])),
          "accuracy_audio": float(np.mean(out["logits_audio"].argmax(-1) == out["label"]))}


def evaluated_items(out: Mapping[str, np.ndarray], config: ml_collections.ConfigDict,
                    split: str) -> Mapping[str, np.ndarray]:
  """The items of a split's outputs an evaluation counts: every one, except on the test split
  with ``config.metric.original_test_batches = N > 0``: the items the original's evaluation
  saw (batches of N in file order, the last partial one dropped). Applied twice, the same."""
  test_batches = config.metric.get("original_test_batches", 0)
  if split != "test" or not test_batches:
    return out
  count = metrics.original_protocol_count(len(out["label"]), test_batches)
  if not count:
    raise ValueError(f"config.metric.original_test_batches={test_batches} exceeds the "
                     f"{len(out['label'])} test items: the original would evaluate none")
  return {k: v[:count] for k, v in out.items()}


def evaluate(embed_fn: Callable | None, state: TrainState, source, *,
             config: ml_collections.ConfigDict, mesh: Mesh, split: str = "test",
             loss_fn: losses.LossFn | None = None,
             outputs: Mapping[str, np.ndarray] | None = None,
             protocol: str = "both") -> dict[str, float]:
  """Loss parts, accuracy and mAP (A->V, V->A, average) on every item of a split.

  The retrieval protocols of ``protocol`` (paired, unimodal or both):
  ``map_*`` embeds each item with its paired item of the other modality (the
  paper's), with the loss parts and accuracies of those outputs;
  ``unimodal_map_*`` embeds each item from its own modality alone
  (``DSF3N.embed_visual`` / ``embed_audio``).
  The loss (of the paired outputs) is computed on the whole split at once
  (centre-loss class counts over the split), with the current centres;
  ``loss_fn`` None: the terms of ``config.loss`` (pass one function to every call: its
  compiled form is reused). ``outputs``: the split's ``embed_split`` outputs,
  when computed already (``embed_fn`` is then not used).
  Every item counts, except on the test split with
  ``config.metric.original_test_batches = N > 0``: then only the items the
  original's evaluation saw (batches of N in file order, the last partial one
  dropped; ``metrics.original_protocol_count``).
  """
  out = outputs if outputs is not None else embed_split(
      embed_fn, state.variables, source, mesh=mesh, batch_size=config.eval_batch_size)
  out = evaluated_items(out, config, split)
  wanted = protocols_of(protocol)
  result = {}
  if "paired" in wanted:
    result = loss_metrics(out, state, loss_fn=loss_fn or losses.loss_from_config(config.loss))
  for prefix in (PREFIXES[p] for p in wanted):
    visual, audio = out[f"{prefix}emb_visual"], out[f"{prefix}emb_audio"]
    if not (np.isfinite(visual).all() and np.isfinite(audio).all()):
      # A diverged state: NaN scores, which the loop and a sweep handle as non-finite (the
      # metric itself refuses non-finite embeddings).
      maps = dict.fromkeys(MAP_KEYS, float("nan"))
    else:
      maps = metrics.cross_modal_map(visual, audio, out["label"],
                                     distance=config.metric.distance, k=config.metric.k or None)
    result.update({f"{prefix}map_{key}": float(maps[key]) for key in MAP_KEYS})
  result["num_examples"] = int(out["label"].shape[0])
  return result
