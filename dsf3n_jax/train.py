"""Training and evaluation: config in, checkpoints, metrics and results out.

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

Evaluation and early stopping (``train_and_evaluate``): after every
``eval_every_epochs``-th epoch (1-based) and after the last, each split is
evaluated on every item; its loss is one mean over the whole split with the
trained centres. With ``early_stopping_patience`` = N > 0 the run stops after N
evaluations in a row whose selection-split loss is not strictly below the best
so far (a tie is no improvement). This is our own rule, not the original's: the
original evaluates the test split after 1-based epochs 6, 11, 16, ... (not the
last), sums the per-batch losses of its ``drop_last`` test batches, draws fresh
random centres for the centre term at every evaluation (which no run can
reproduce), and counts an equal loss as an improvement.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dsf3n_jax import config_check, input_pipeline, losses, metrics
from dsf3n_jax.checkpoints import Checkpointer, abstract_like
from dsf3n_jax.models import DSF3N

AXIS = "data"
SELECTION_METRICS = config_check.SELECTION_METRICS  # what a run may select its best on
Batch = Mapping[str, jax.Array]
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(DSF3N)
                     if f.name not in ("parent", "name", "axis_name"))


class TrainState(struct.PyTreeNode):
  """Everything a step changes, in one pytree.

  Attributes:
    step: number of optimiser steps taken.
    params: network parameters.
    batch_stats: BatchNorm running statistics.
    centers: (C, embed_dim) centre-loss centres (trained, not part of the net).
    opt_state: optax state of both optimisers.
    rng: raw uint32 key data; dropout keys are ``fold_in(rng, step)``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  centers: jax.Array
  opt_state: Any
  rng: jax.Array

  @property
  def trainable(self):
    return {"net": self.params, "centers": self.centers}

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


# ----------------------------------------------------------------------------
# Model and optimiser from the config.


def model_config(config: ml_collections.ConfigDict, *, num_classes: int, visual_dim: int,
                 audio_dim: int) -> dict[str, Any]:
  """The resolved keyword arguments of ``DSF3N`` (saved with every checkpoint)."""
  m = config.model
  kwargs = {k: m[k] for k in m.keys() if k in MODEL_FIELDS}
  kwargs.update(num_classes=int(num_classes), visual_dim=int(visual_dim),
                audio_dim=int(audio_dim))
  for key in ("kernel_sizes", "branch_features"):
    kwargs[key] = [int(v) for v in kwargs[key]]
  kwargs["dtype"] = str(m.dtype)
  return kwargs


def build_model(kwargs: Mapping[str, Any], *, axis_name: str | None = AXIS) -> DSF3N:
  """``DSF3N`` from resolved kwargs; computation dtype from its name.

  Parameters (and so the optimiser state and the centres) are float32, or
  float64 for a float64 model: a float64 run is float64 end to end, which needs
  64-bit JAX (``JAX_ENABLE_X64=1``; ``python -m dsf3n_jax.main`` turns it on).
  """
  kw = dict(kwargs)
  dtype = jnp.dtype(kw.pop("dtype", "float32"))
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("config.model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
                     "jax.config.update('jax_enable_x64', True) before training")
  kw["kernel_sizes"] = tuple(kw["kernel_sizes"])
  kw["branch_features"] = tuple(kw["branch_features"])
  param_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return DSF3N(**kw, dtype=dtype, param_dtype=param_dtype, axis_name=axis_name)


def learning_rate_schedule(config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> optax.Schedule:
  """The network's learning rate as a function of the step.

  ``constant``: ``optim.lr`` (what the original trained with: its
  ``train_model.py`` has the call of ``adjust_learning_rate`` commented out,
  so the paper's runs used Adam at a constant 1e-4).
  ``warmup_step``: the rate the original's ``adjust_learning_rate(optimizer,
  epoch)`` gives the network, had it been called. That function computes
  ``r`` = lr (e+1)/10 for epochs e < 10 (0-based), lr for e < 20, lr/10 for
  e < 50 and lr/100 after, returns ``r``, but sets ``param_groups[0]``,
  the only group, which holds every network parameter, to ``0.1 * r``; so
  the network trains at ``0.1 * r``, from lr/100 at epoch 0 to lr/10 at
  epochs 9-19. The centres' SGD is a separate optimiser it never touches.
  ``cosine``: from lr down to 0 over ``config.num_epochs``.
  """
  lr = config.optim.lr
  if config.optim.schedule == "constant":
    return optax.constant_schedule(lr)
  if config.optim.schedule == "warmup_step":
    def schedule(step):
      epoch = step // steps_per_epoch
      returned = jnp.where(epoch < 10, lr * (epoch + 1) / 10,
                           jnp.where(epoch < 20, lr, jnp.where(epoch < 50, lr * 0.1, lr * 0.01)))
      return 0.1 * returned  # param_groups[0]['lr'] = 0.1 * lr
    return schedule
  if config.optim.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(config.num_epochs * steps_per_epoch, 1))
  raise ValueError(f"config.optim.schedule: expected 'constant', 'warmup_step' or 'cosine', "
                   f"got {config.optim.schedule!r}")


def build_optimizer(config: ml_collections.ConfigDict,
                    steps_per_epoch: int) -> optax.GradientTransformation:
  """Adam (b1 0.5, b2 0.999) on the network, plain SGD on the centres."""
  o = config.optim
  net = []
  if o.grad_clip_norm > 0:
    net.append(optax.clip_by_global_norm(o.grad_clip_norm))
  schedule = learning_rate_schedule(config, steps_per_epoch)
  # optax.adam / adamw, with the bias corrections computed as PyTorch's Adam does.
  adam = [scale_by_adam(o.b1, o.b2, o.eps)]
  if o.weight_decay > 0:
    adam.append(optax.add_decayed_weights(o.weight_decay))
  net.append(optax.chain(*adam, optax.scale_by_learning_rate(schedule)))
  return optax.multi_transform(
      {"net": optax.chain(*net), "centers": optax.sgd(o.center_lr)}, _labels)


def scale_by_adam(b1: float, b2: float, eps: float) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` (same state) with bias corrections exact in any precision.

  optax computes ``1 - b ** t`` in the moments' dtype: in float32 that is up to
  2e-5 (relative) too small for ``b2 = 0.999``, every step is that much shorter
  than PyTorch's (which computes it in float64), and after 50 steps this model's
  parameters were up to 100 % apart. ``-expm1(t log b)`` is exact to float32
  rounding.
  """
  base = optax.scale_by_adam(b1, b2, eps)

  def update(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count = optax.safe_increment(state.count)

    def corrected(moment, decay):
      return jax.tree.map(lambda m: m / -jnp.expm1(count * math.log(decay)).astype(m.dtype),
                          moment)

    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), corrected(mu, b1),
                           corrected(nu, b2))
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(base.init, update)


def _labels(trainable):
  return {"net": jax.tree.map(lambda _: "net", trainable["net"]), "centers": "centers"}


def init_state(model: DSF3N, tx: optax.GradientTransformation, *, seed: int,
               num_classes: int) -> TrainState:
  """Initialises parameters (PyTorch's init), centres (standard normal) and optimisers."""
  init_key, center_key, dropout_key = jax.random.split(jax.random.key(seed), 3)
  visual = jnp.zeros((2, model.visual_dim), model.param_dtype)
  audio = jnp.zeros((2, model.audio_dim), model.param_dtype)
  unmapped = model.clone(axis_name=None)
  variables = unmapped.init({"params": init_key, "dropout": dropout_key}, visual, audio,
                            train=False)
  centers = jax.random.normal(center_key, (num_classes, model.embed_dim), model.param_dtype)
  trainable = {"net": variables["params"], "centers": centers}
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], centers=centers,
                    opt_state=tx.init(trainable),
                    rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)))


# ----------------------------------------------------------------------------
# The per-device step and its mapped forms.


def _loss_precision(x: jax.Array) -> jax.Array:
  """Outputs below float32 (bfloat16) are promoted for the loss; float32/64 stay as given."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def train_step(state: TrainState, batch: Batch, *, model: DSF3N,
               tx: optax.GradientTransformation, alpha: float, beta: float,
               id_form: str = "ce", unimodal_weight: float = 0.0,
               unimodal_alpha: float | None = None, unimodal_beta: float | None = None,
               axis_name: str = AXIS) -> tuple[TrainState, dict]:
  """One optimiser step on this device's shard of the global batch.

  Must run under a mapping that binds ``axis_name`` (``shard_map`` with
  ``check_vma=False``, or ``pmap``). ``model`` must have ``axis_name`` set
  so that BatchNorm statistics are those of the global batch.

  ``unimodal_weight > 0`` adds ``unimodal_weight`` times the same loss on the
  outputs of each modality embedded alone (``DSF3N.embed_visual`` /
  ``embed_audio``), with the pair and centre terms weighted by
  ``unimodal_alpha`` and ``unimodal_beta`` (None: ``alpha``, ``beta``); its
  parts are reported as ``unimodal_<part>``.
  """
  labels = batch["label"]
  local = labels.shape[0]
  example_ids = jax.lax.axis_index(axis_name) * local + jnp.arange(local)
  dropout_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(trainable):
    outputs, mutated = model.apply(
        {"params": trainable["net"], "batch_stats": state.batch_stats},
        batch["visual"], batch["audio"], train=True, example_ids=example_ids,
        rngs={"dropout": dropout_key}, mutable=["batch_stats"], unimodal=unimodal_weight > 0)
    outputs = jax.tree.map(_loss_precision, tuple(outputs))
    paired = outputs[0] if unimodal_weight > 0 else outputs
    loss = functools.partial(losses.dsf3n_loss, labels=labels, centers=trainable["centers"],
                             alpha=alpha, beta=beta, id_form=id_form, axis_name=axis_name)
    total, parts = loss(paired)
    if unimodal_weight > 0:
      alone_total, alone_parts = loss(
          outputs[1], alpha=alpha if unimodal_alpha is None else unimodal_alpha,
          beta=beta if unimodal_beta is None else unimodal_beta)
      total = total + unimodal_weight * alone_total
      parts = {**parts, **{f"unimodal_{k}": v for k, v in alone_parts.items()}}
    return total, (parts, mutated["batch_stats"], paired)

  (total, (parts, batch_stats, outputs)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.trainable)
  grads = jax.lax.pmean(grads, axis_name)
  updates, opt_state = tx.update(grads, state.opt_state, state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  _, _, logits_v, logits_a = outputs
  step_metrics = {
      "loss": total, **parts,
      "accuracy_visual": jnp.mean(jnp.argmax(logits_v, -1) == labels),
      "accuracy_audio": jnp.mean(jnp.argmax(logits_a, -1) == labels),
  }
  step_metrics = jax.lax.pmean(step_metrics, axis_name)
  new_state = state.replace(step=state.step + 1, params=trainable["net"],
                            batch_stats=batch_stats, centers=trainable["centers"],
                            opt_state=opt_state)
  return new_state, step_metrics


def per_device_step(config: ml_collections.ConfigDict, model: DSF3N,
                    tx: optax.GradientTransformation) -> Callable:
  """``train_step`` with the model, optimiser and loss weights bound."""
  return functools.partial(train_step, model=model, tx=tx, alpha=config.loss.alpha,
                           beta=config.loss.beta, id_form=config.loss.id_form,
                           **_unimodal_loss_weights(config.loss))


def _unimodal_loss_weights(loss_config) -> dict[str, float | None]:
  """``config.loss.unimodal_*`` as ``train_step`` keywords (a negative alpha/beta: None)."""
  get = lambda key: float(loss_config.get(key, -1.0))  # noqa: E731
  return {"unimodal_weight": max(get("unimodal_weight"), 0.0),
          "unimodal_alpha": get("unimodal_alpha") if get("unimodal_alpha") >= 0 else None,
          "unimodal_beta": get("unimodal_beta") if get("unimodal_beta") >= 0 else None}


def make_train_step(step_fn: Callable, mesh: Mesh) -> Callable:
  """``(state, global_batch) -> (state, metrics)`` over every device of ``mesh``."""
  mapped = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))


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
    if shuffle:
      order = input_pipeline.epoch_permutation(seed, epoch, num_examples)
    else:
      order = jnp.arange(num_examples)
    order = order[:steps * global_batch_size].reshape(steps, n_dev, local)
    device = jax.lax.axis_index(AXIS)

    def body(state, idx):
      rows = idx[device]
      batch = {k: arrays[k][rows] for k in ("visual", "audio", "label")}
      return step_fn(state, batch)

    return jax.lax.scan(body, state, order, unroll=unroll)

  mapped = jax.shard_map(epoch_fn, mesh=mesh, in_specs=(P(), P(), P()), out_specs=(P(), P()),
                         check_vma=False)
  return jax.jit(mapped, donate_argnums=(0,))


EMBED_KEYS = ("emb_visual", "emb_audio", "logits_visual", "logits_audio",
              "unimodal_emb_visual", "unimodal_emb_audio")


def make_embed_fn(model: DSF3N, mesh: Mesh, *, unimodal: bool = True) -> Callable:
  """Eval-mode forward of a batch sharded over ``data`` (same sharding).

  Returns ``{EMBED_KEYS}``: the paired outputs and (``unimodal``) each
  modality's embedding alone, in at least float32.
  """
  def embed(variables, visual, audio):
    if not unimodal:
      out = model.apply(variables, visual, audio, train=False)
    else:
      paired, alone = model.apply(variables, visual, audio, train=False, unimodal=True)
      out = (*paired, alone.emb_visual, alone.emb_audio)
    return {k: _loss_precision(x) for k, x in zip(EMBED_KEYS, out)}
  mapped = jax.shard_map(embed, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=P(AXIS),
                         check_vma=False)
  return jax.jit(mapped)


# ----------------------------------------------------------------------------
# Evaluation.


def _gather(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def embed_split(embed_fn: Callable, variables, source, *, mesh: Mesh,
                batch_size: int) -> dict[str, np.ndarray]:
  """Eval-mode outputs for every item of ``source``, in order, padding removed."""
  parts: dict[str, list[np.ndarray]] = {}
  for batch in input_pipeline.eval_batches(source, global_batch_size=batch_size, mesh=mesh):
    out = embed_fn(variables, batch["visual"], batch["audio"])
    keep = _gather(batch["mask"]) > 0
    for key, value in (*out.items(), ("label", batch["label"]), ("index", batch["index"])):
      parts.setdefault(key, []).append(_gather(value)[keep])
  return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate(embed_fn: Callable, state: TrainState, source, *, config: ml_collections.ConfigDict,
             mesh: Mesh, split: str = "test") -> dict[str, float]:
  """Loss parts, accuracy and mAP (A->V, V->A, average) on every item of a split.

  Both retrieval protocols: ``map_*`` embeds each item with its paired item
  of the other modality (the paper's); ``unimodal_map_*`` embeds each item
  from its own modality alone (``DSF3N.embed_visual`` / ``embed_audio``).
  The loss (of the paired outputs) is computed on the whole split at once
  (centre-loss class counts over the split), with the current centres.
  Every item counts, except on the test split with
  ``config.metric.original_test_batches = N > 0``: then only the items the
  original's evaluation saw (batches of N in file order, the last partial one
  dropped; ``metrics.original_protocol_count``).
  """
  out = embed_split(embed_fn, state.variables, source, mesh=mesh,
                    batch_size=config.eval_batch_size)
  test_batches = config.metric.get("original_test_batches", 0)
  if split == "test" and test_batches:
    count = metrics.original_protocol_count(len(out["label"]), test_batches)
    if not count:
      raise ValueError(f"config.metric.original_test_batches={test_batches} exceeds the "
                       f"{len(out['label'])} test items: the original would evaluate none")
    out = {k: v[:count] for k, v in out.items()}
  outputs = tuple(jnp.asarray(out[k]) for k in ("emb_visual", "emb_audio", "logits_visual",
                                                  "logits_audio"))
  labels = jnp.asarray(out["label"])
  total, parts = losses.dsf3n_loss(outputs, labels, jnp.asarray(state.centers),
                                   alpha=config.loss.alpha, beta=config.loss.beta,
                                   id_form=config.loss.id_form)
  result = {"loss": float(total), **{k: float(v) for k, v in parts.items()},
            "accuracy_visual": float(np.mean(out["logits_visual"].argmax(-1) == out["label"])),
            "accuracy_audio": float(np.mean(out["logits_audio"].argmax(-1) == out["label"]))}
  for prefix in ("", "unimodal_"):
    maps = metrics.cross_modal_map(out[f"{prefix}emb_visual"], out[f"{prefix}emb_audio"],
                                   out["label"], distance=config.metric.distance,
                                   k=config.metric.k or None)
    result.update({f"{prefix}map_{direction}": float(maps[direction]) for direction in (
        "audio_to_visual", "visual_to_audio", "average")})
  result["num_examples"] = int(out["label"].shape[0])
  return result


# ----------------------------------------------------------------------------
# The run.


class MetricWriter:
  """Console, ``metrics.jsonl`` and TensorBoard; only process 0 writes files.

  On resume, ``metrics.jsonl`` is cut back to the restored step so that it
  never holds records of steps that are replayed.
  """

  def __init__(self, workdir: str, *, resume_step: int | None):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tb = None
    if not self.active:
      return
    if os.path.exists(self.path):
      keep = []
      if resume_step is not None:
        with open(self.path) as f:
          keep = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
      _atomic_write(self.path, "".join(keep))
    from tensorboardX import SummaryWriter  # no TensorFlow import
    self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, values: Mapping[str, Any], **extra) -> None:
    if not self.active:
      return
    record = {"step": int(step), "split": split, **extra,
              **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in values.items():
      self.tb.add_scalar(f"{split}/{key}", float(value), int(step))
    self.tb.flush()

  def close(self) -> None:
    if self.tb is not None:
      self.tb.close()


def log(msg: str, *args) -> None:
  """Console progress (stderr), from process 0 only."""
  if jax.process_index() == 0:
    print(time.strftime("%H:%M:%S ") + (msg % args if args else msg), file=sys.stderr,
          flush=True)


def _atomic_write(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def _new_meta() -> dict[str, Any]:
  """The bookkeeping a run starts with (saved beside the state in every checkpoint)."""
  return {"epoch": 0, "step": 0, "best": None, "evals_without_improvement": 0,
          "best_eval_loss": None, "loader": None}


def _write_run_config(workdir: str, config: ml_collections.ConfigDict,
                      mcfg: Mapping[str, Any]) -> None:
  """``config.json``: the resolved config and model, read by ``restore_model``."""
  _atomic_write(os.path.join(workdir, "config.json"),
                json.dumps({"config": config.to_dict(), "model": mcfg}, indent=2, default=str))


def _check_workdir(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise PermissionError(f"--workdir={workdir}: not writable ({e})") from e


def load_data(config: ml_collections.ConfigDict) -> input_pipeline.Sources:
  """The run's sources, checked against the model config."""
  d = config.data
  sources = input_pipeline.load_sources(
      d.name, data_dir=d.data_dir or None, path=d.path or None,
      num_classes=d.num_classes or None, visual_dim=config.model.visual_dim or None,
      audio_dim=config.model.audio_dim or None, validation_fraction=d.validation_fraction,
      validation_seed=d.validation_seed, synthetic=dict(d.synthetic))
  if d.normalize == "standardize":
    sources = input_pipeline.standardize(sources)
  elif d.normalize != "none":
    raise ValueError(f"config.data.normalize: expected 'none' or 'standardize', got "
                     f"{d.normalize!r}")
  return sources


def _resolve_on_device(value) -> bool:
  """``config.data.on_device``: "auto" (on device except on CPU), "true" or "false"."""
  v = str(value).lower()
  if v == "auto":
    return jax.default_backend() != "cpu"
  if v in ("true", "false"):
    return v == "true"
  raise ValueError(f"config.data.on_device: expected 'auto', 'true' or 'false', got {value!r}")


def make_mesh() -> Mesh:
  """A one-axis ``data`` mesh over every device of every process."""
  return jax.make_mesh((jax.device_count(),), (AXIS,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def _fmt(values: Mapping[str, Any], keys) -> str:
  return " ".join(f"{k}={float(values[k]):.4f}" for k in keys if k in values)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains DSF3N as ``config`` says, checkpointing and evaluating into ``workdir``.

  Resumes from the latest checkpoint in ``workdir`` if there is one.

  Returns:
    The ``results.json`` content: final and best metrics, epochs, timing.
  """
  start_time = time.time()
  # Guards that need no compile: every config problem at once (config_check.ConfigError),
  # then the workdir, then the data.
  n_dev = jax.device_count()
  config_check.validate(config, num_devices=n_dev)
  _check_workdir(workdir)
  sources = load_data(config)
  num_train = len(sources.train)
  if config.batch_size > num_train:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {num_train} training "
                     f"examples of {sources.name}")
  steps_per_epoch = num_train // config.batch_size
  mcfg = model_config(config, num_classes=sources.num_classes, visual_dim=sources.visual_dim,
                      audio_dim=sources.audio_dim)
  model = build_model(mcfg)
  tx = build_optimizer(config, steps_per_epoch)
  mesh = make_mesh()
  log("topology: %d process(es), %d local / %d global device(s) (%s), mesh %s",
      jax.process_count(), jax.local_device_count(), n_dev, jax.default_backend(),
      " ".join(f"{k}={v}" for k, v in mesh.shape.items()))
  selection = config.selection_split
  metric = config.get("selection_metric", "map_average")
  if selection == "validation" and sources.validation is None:
    selection = "test"
    log("warning: no validation split (config.data.validation_fraction=0): the best "
                    "checkpoint is selected on the test split")

  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
  state = jax.jit(functools.partial(init_state, model, tx, seed=config.seed,
                                    num_classes=sources.num_classes),
                  out_shardings=NamedSharding(mesh, P()))()
  meta = _new_meta()
  resume_epoch = checkpointer.latest_epoch()
  if resume_epoch is not None:
    state, meta = checkpointer.restore(abstract_like(state, mesh), model_config=mcfg)
    log("resumed from %s/checkpoints/%d (step %d)", workdir, resume_epoch,
                 meta["step"])
  if jax.process_index() == 0:
    _write_run_config(workdir, config, mcfg)
  writer = MetricWriter(workdir, resume_step=meta["step"] if resume_epoch is not None else None)

  step_fn = per_device_step(config, model, tx)
  embed_fn = make_embed_fn(model, mesh)
  on_device = _resolve_on_device(config.data.on_device)
  if on_device:
    arrays = input_pipeline.to_device(input_pipeline.load_split_arrays(sources.train), mesh)
    epoch_fn = make_train_epoch(step_fn, mesh, global_batch_size=config.batch_size,
                                num_examples=num_train, seed=config.seed,
                                shuffle=config.data.shuffle)
  else:
    loader = input_pipeline.TrainLoader(sources.train, global_batch_size=config.batch_size,
                                        mesh=mesh, seed=config.seed,
                                        shuffle=config.data.shuffle)
    if meta["loader"] is not None:
      loader.set_state(meta["loader"])
    loader_iter = iter(loader)
    step_jit = make_train_step(step_fn, mesh)

  log("training %s on %d device(s) of %d process(es): %d examples, %d steps/epoch, "
               "%d epochs", sources.name, n_dev, jax.process_count(), num_train,
               steps_per_epoch, config.num_epochs)
  first_epoch = meta["epoch"]
  train_time, trained_steps = 0.0, 0
  final_eval: dict[str, dict[str, float]] = {}
  stopped_early = False
  for epoch in range(first_epoch, config.num_epochs):
    t0 = time.time()
    if on_device:
      state, step_metrics = epoch_fn(state, arrays, jnp.asarray(epoch, jnp.int32))
      step_metrics = jax.tree.map(np.asarray, step_metrics)
    else:
      collected = []
      for i in range(steps_per_epoch):
        state, m = step_jit(state, next(loader_iter))
        collected.append(m)
        if config.log_every_steps and (i + 1) % config.log_every_steps == 0:
          done = (epoch - first_epoch) * steps_per_epoch + i + 1
          rate = done * config.batch_size / (train_time + time.time() - t0)
          left = (config.num_epochs - epoch) * steps_per_epoch - i - 1
          log("epoch %d step %d/%d %s %.1f samples/s ETA %.0fs", epoch + 1, i + 1,
                       steps_per_epoch, _fmt(jax.device_get(m), ("loss", "id", "pair",
                                                                 "center")),
                       rate, left * config.batch_size / rate)
      step_metrics = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]),
                                  *collected)
    train_time += time.time() - t0
    trained_steps += steps_per_epoch
    global_step = (epoch + 1) * steps_per_epoch
    bad = np.flatnonzero(~np.isfinite(step_metrics["loss"]))
    if bad.size:
      checkpointer.wait()
      last = checkpointer.latest_epoch()
      where = (f"{workdir}/checkpoints/{last} (kept)" if last is not None else "none")
      raise FloatingPointError(
          f"non-finite loss at step {epoch * steps_per_epoch + int(bad[0]) + 1} (epoch "
          f"{epoch + 1}); last good checkpoint: {where}")
    epoch_means = {k: float(np.mean(v)) for k, v in step_metrics.items()}
    rate = trained_steps * config.batch_size / max(train_time, 1e-9)
    writer.write(global_step, "train", epoch_means, epoch=epoch + 1,
                 samples_per_second=rate)
    log("epoch %d/%d train %s %.1f samples/s ETA %.0fs", epoch + 1, config.num_epochs,
                 _fmt(epoch_means, ("loss", "id", "pair", "center", "accuracy_visual",
                                    "accuracy_audio")),
                 rate, (config.num_epochs - epoch - 1) * steps_per_epoch * config.batch_size / rate)

    last_epoch = epoch + 1 == config.num_epochs
    is_best = False
    if last_epoch or (config.eval_every_epochs and (epoch + 1) % config.eval_every_epochs == 0):
      final_eval = {}
      for split in ("validation", "test"):
        source = getattr(sources, split)
        if source is None:
          continue
        final_eval[split] = evaluate(embed_fn, state, source, config=config, mesh=mesh,
                                     split=split)
        writer.write(global_step, split, final_eval[split], epoch=epoch + 1)
        log("epoch %d %s %s", epoch + 1, split, _fmt(final_eval[split], (
            "loss", "map_audio_to_visual", "map_visual_to_audio", "map_average",
            "unimodal_map_average")))
      chosen = final_eval[selection]
      if meta["best"] is None or chosen[metric] > meta["best"]["value"]:
        is_best = True
        meta["best"] = {"epoch": epoch + 1, "selected_on": selection, "metric": metric,
                        "value": chosen[metric],
                        **{s: v for s, v in final_eval.items()}}
      if meta["best_eval_loss"] is None or chosen["loss"] < meta["best_eval_loss"]:
        meta["best_eval_loss"] = chosen["loss"]
        meta["evals_without_improvement"] = 0
      else:
        meta["evals_without_improvement"] += 1
      if (config.early_stopping_patience
          and meta["evals_without_improvement"] >= config.early_stopping_patience):
        stopped_early = True
    meta["epoch"], meta["step"] = epoch + 1, global_step
    if not on_device:
      meta["loader"] = loader.get_state()
    if (last_epoch or stopped_early or is_best
        or (config.checkpoint_every_epochs and (epoch + 1) % config.checkpoint_every_epochs == 0)):
      checkpointer.save(epoch + 1, state, {**meta, "model": mcfg}, best=is_best)
    if stopped_early:
      log("early stopping after epoch %d: %d evaluations without a lower %s loss",
                   epoch + 1, meta["evals_without_improvement"], selection)
      break

  checkpointer.wait()
  if not final_eval:  # resumed a finished run: evaluate what is there
    for split in ("validation", "test"):
      source = getattr(sources, split)
      if source is not None:
        final_eval[split] = evaluate(embed_fn, state, source, config=config, mesh=mesh,
                                     split=split)
  results = {
      "dataset": sources.name, "epochs": meta["epoch"], "steps": meta["step"],
      "final": final_eval, "best": meta["best"], "selected_on": selection,
      "selection_metric": metric,
      "stopped_early": stopped_early, "wall_time_s": time.time() - start_time,
      "train_time_s": train_time,
      "samples_per_second": (trained_steps * config.batch_size / train_time
                             if train_time else None),
      "device_count": n_dev, "process_count": jax.process_count(),
      "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
  }
  if jax.process_index() == 0:
    _atomic_write(os.path.join(workdir, "results.json"), json.dumps(results, indent=2))
  writer.close()
  checkpointer.close()
  return results


def format_results(results: Mapping[str, Any]) -> str:
  """The final mAP table, as printed at the end of a run: both protocols side by side."""
  directions = ("map_audio_to_visual", "map_visual_to_audio", "map_average")
  rows = [("split", "A->V", "V->A", "average", "A->V", "V->A", "average")]

  def row(label, values):
    cells = [f"{values[p + k]:.4f}" if p + k in values else "-"
             for p in ("", "unimodal_") for k in directions]
    rows.append((label, *cells))

  for split, values in results["final"].items():
    row(f"final {split}", values)
  best = results.get("best")
  if best:
    metric = best.get("metric", "map_average")
    for split in ("validation", "test"):
      if split in best:
        row(f"best {split} (epoch {best['epoch']}, {metric} on {best['selected_on']})",
            best[split])
  width = max(len(r[0]) for r in rows)
  lines = [f"{'':<{width}}  {'paired (paper)':^23}   {'unimodal (deployable)':^23}"]
  lines += [f"{r[0]:<{width}}  " + " ".join(f"{c:>7}" for c in r[1:4]) + "   "
            + " ".join(f"{c:>7}" for c in r[4:]) for r in rows]
  return "\n".join(lines)


def restore_model(workdir: str, *, which: str = "latest"):
  """Model, variables and config of the run in ``workdir`` (for retrieval and figures).

  Args:
    workdir: a training run's directory.
    which: "latest" or "best".

  Returns:
    ``(model, {"params", "batch_stats"}, config)`` with ``config`` the run's
    saved ``ConfigDict``.
  """
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  config = ml_collections.ConfigDict(saved["config"])
  mcfg = saved["model"]
  model = build_model(mcfg, axis_name=None)
  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
  meta = checkpointer.read_meta(which=which)
  steps_per_epoch = max(meta["step"] // max(meta["epoch"], 1), 1)
  tx = build_optimizer(config, steps_per_epoch)
  mesh = make_mesh()
  abstract = abstract_like(jax.eval_shape(
      lambda: init_state(model, tx, seed=config.seed, num_classes=mcfg["num_classes"])), mesh)
  state, _ = checkpointer.restore(abstract, which=which, model_config=mcfg)
  checkpointer.close()
  return model, jax.device_get(state.variables), config


def save_variables_as_run(workdir: str, variables: Mapping[str, Any], *,
                          config: ml_collections.ConfigDict) -> str:
  """Writes ``variables`` as epoch 0 of a run in ``workdir`` (e.g. converted weights).

  Input sizes and the class count are read off the variables. The result is a
  workdir that ``restore_model`` (retrieval, figures) reads and that
  ``train_and_evaluate`` resumes from, i.e. fine-tunes; the optimiser state is
  fresh and the centres are drawn as at initialisation.

  Returns:
    The checkpoint directory written.
  """
  params = variables["params"]
  mcfg = model_config(config,
                      num_classes=np.shape(params["visual_classifier"]["logits"]["kernel"])[1],
                      visual_dim=np.shape(params["visual_encoder"]["dense"]["kernel"])[0],
                      audio_dim=np.shape(params["audio_encoder"]["dense"]["kernel"])[0])
  model = build_model(mcfg)
  tx = build_optimizer(config, 1)
  state = init_state(model, tx, seed=config.seed, num_classes=mcfg["num_classes"])
  template = jax.tree.structure(state.variables)
  given = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  if jax.tree.structure(given) != template:
    raise ValueError("variables do not fit the model config: "
                     f"{jax.tree.structure(given)} vs {template}")
  state = state.replace(params=jax.tree.map(jnp.asarray, given["params"]),
                        batch_stats=jax.tree.map(jnp.asarray, given["batch_stats"]))
  _check_workdir(workdir)
  _write_run_config(workdir, config, mcfg)
  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints)
  checkpointer.save(0, state, {**_new_meta(), "model": mcfg})
  checkpointer.wait()
  checkpointer.close()
  return os.path.join(workdir, "checkpoints", "0")


def default_config() -> ml_collections.ConfigDict:
  """``configs/default.py``'s config, loaded from the source tree."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: the configs/ folder of the source tree is "
                            "needed (install with `pip install -e .`)")
  spec = importlib.util.spec_from_file_location("dsf3n_default_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()
