"""Train state, model and optimiser built from a config."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct
from flax.core import FrozenDict

from dsf3n_jax import losses
from dsf3n_jax.fused_draws import fused_draws
from dsf3n_jax.mesh import DATA_AXIS as AXIS
from dsf3n_jax.mesh import replicate
from dsf3n_jax.models import DSF3N, registry
from dsf3n_jax.models.dsf3n import resolved_fields, upgrade_fields

DEFAULT_LOSS_TERMS = ("id", "pair", "center")  # the original's objective
DEFAULT_MODEL = "dsf3n"  # config.model.name of runs (and checkpoints) that do not name one


MODEL_FIELDS = tuple(registry.model_fields(DSF3N))


class TrainState(struct.PyTreeNode):
  """Everything a step changes, in one pytree.

  Attributes:
    step: number of optimiser steps taken.
    params: network parameters.
    batch_stats: BatchNorm running statistics.
    aux: the loss terms' trainable parameters, by term name (trained, not
      part of the net); ``aux["center"]`` are the (C, embed_dim) centres.
    opt_state: optax state of every parameter group (``build_optimizer``).
    rng: raw uint32 key data; dropout keys are ``fold_in(rng, step)``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  aux: Any
  opt_state: Any
  rng: jax.Array

  @property
  def centers(self):
    """The centre loss's (C, embed_dim) centres (None when it is not a term)."""
    return self.aux.get("center")

  @property
  def trainable(self):
    return {"net": self.params, "aux": self.aux}

  @property
  def variables(self):
    return {"params": self.params, "batch_stats": self.batch_stats}


def model_config(config: ml_collections.ConfigDict, *, num_classes: int, visual_dim: int,
                 audio_dim: int) -> dict[str, Any]:
  """The resolved keyword arguments of the model (saved with every checkpoint).

  ``name`` is the registered model (``config.model.name``, default "dsf3n");
  the rest are its fields taken from ``config.model``, with the part names
  (``fusion``, ``head``, ``classifier``) and their complete settings
  (``fusion_kw`` etc.) always present and a preset's settings (e.g.
  "dsf3n_paper": ``fusion_kw.variant="paper"``) applied.

  Raises:
    ValueError: an unregistered name, or a field set against the preset.
  """
  m = config.model
  name = m.get("name", DEFAULT_MODEL)
  model_def = registry.lookup("model", name, where="config.model.name")
  fields = registry.model_fields(model_def)
  kwargs = {k: m[k].to_dict() if isinstance(m[k], ml_collections.ConfigDict) else m[k]
            for k in m.keys() if k in fields}
  _apply_preset(model_def, name, kwargs, fields)
  kwargs.update(num_classes=int(num_classes), visual_dim=int(visual_dim),
                audio_dim=int(audio_dim))
  for key in ("kernel_sizes", "branch_features"):
    kwargs[key] = [int(v) for v in kwargs[key]]
  for part in (p for p in registry.PARTS if p in fields):
    kwargs.setdefault(part, fields[part])
    registry.lookup(part, kwargs[part], where=f"config.model.{part}")
  kwargs["dtype"] = str(m.dtype)
  return {"name": name, **resolved_fields(kwargs)}


def _listed(settings: Mapping[str, Any]) -> dict[str, Any]:
  """Settings with tuples as lists (as a config holds them), to compare by value."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


def _apply_preset(model_def, name: str, kwargs: dict[str, Any],
                  defaults: Mapping[str, Any]) -> None:
  """Sets a preset's (partial's) keywords in ``kwargs``.

  A field the config changed from the default to another value than the
  preset's is an error rather than silently overridden.
  """
  if not isinstance(model_def, functools.partial):
    return
  for kind in registry.PARTS:  # a preset swapping a part: the config's settings of the part it
    # replaces, left at their defaults, are not settings of the preset's part
    swapped = model_def.keywords.get(kind)
    config_part = kwargs.get(kind, defaults.get(kind))
    if swapped is None or swapped == config_part or not isinstance(config_part, str):
      continue
    stock = {k: v for k, v in (registry.part_settings(kind, config_part) or {}).items()
             if v is not dataclasses.MISSING}
    given = kwargs.get(f"{kind}_kw") or {}
    if not given or _listed(given) == _listed(stock):
      kwargs[f"{kind}_kw"] = {}
      kwargs[kind] = swapped
  for key, value in model_def.keywords.items():
    if key.endswith("_kw") and key[:-3] in registry.PARTS:  # a part's settings, one by one
      kind = key[:-3]
      part_defaults = registry.part_settings(kind, kwargs.get(kind, defaults.get(kind))) or {}
      merged = dict(kwargs.get(key) or {})
      for k, v in value.items():
        if k in merged and merged[k] not in (v, part_defaults.get(k)):
          raise ValueError(f"config.model.{key}.{k}={merged[k]!r} conflicts with "
                           f"config.model.name={name!r}, which sets {key}.{k}={v!r}")
        merged[k] = v
      kwargs[key] = merged
      continue
    if key in kwargs and kwargs[key] not in (value, defaults.get(key)):
      raise ValueError(f"config.model.{key}={kwargs[key]!r} conflicts with "
                       f"config.model.name={name!r}, which sets {key}={value!r}")
    kwargs[key] = value


def build_model(kwargs: Mapping[str, Any], *, axis_name: str | None = AXIS) -> DSF3N:
  """The model of resolved kwargs (``model_config``); model, parts and dtype by name.

  ``name`` absent (a checkpoint written before models had names) is "dsf3n";
  a part name must be registered, i.e. its module imported, before this.

  Parameters (and so the optimiser state and the centres) are float32, or
  float64 for a float64 model: a float64 run is float64 end to end, which needs
  64-bit JAX (``JAX_ENABLE_X64=1``; ``python -m dsf3n_jax.main`` turns it on).
  """
  kw = upgrade_fields(kwargs)
  model_def = registry.lookup("model", kw.pop("name", DEFAULT_MODEL), where="model.name")
  for kind in registry.PARTS:
    if f"{kind}_kw" in kw:
      kw[f"{kind}_kw"] = FrozenDict(kw[f"{kind}_kw"] or {})
  for part in registry.PARTS:
    if isinstance(kw.get(part), str):  # else a ModuleDef, from Python
      registry.lookup(part, kw[part], where=f"model.{part}")
  dtype = jnp.dtype(kw.pop("dtype", "float32"))
  if dtype == jnp.float64 and not jax.config.jax_enable_x64:
    raise ValueError("config.model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 or "
                     "jax.config.update('jax_enable_x64', True) before training")
  kw["kernel_sizes"] = tuple(kw["kernel_sizes"])
  kw["branch_features"] = tuple(kw["branch_features"])
  param_dtype = jnp.float64 if dtype == jnp.float64 else jnp.float32
  return model_def(**kw, dtype=dtype, param_dtype=param_dtype, axis_name=axis_name)


# The schedules (``optim.schedule``) that read ``num_epochs``: under the others, runs that
# differ in their length train with the same program (``training.loop``).
SCHEDULES_READING_NUM_EPOCHS = ("cosine",)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, *,
                           lr=None) -> optax.Schedule:
  """The network's learning rate as a function of the step.

  ``lr``: the base rate in place of ``optim.lr`` (a traced array in a sweep).

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
  lr = config.optim.lr if lr is None else lr
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


def build_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int, *,
                    lr=None, weight_decay=None) -> optax.GradientTransformation:
  """Adam (b1 0.5, b2 0.999) on the network; each loss term's parameters by its own rule.

  One ``optax.multi_transform`` over ``TrainState.trainable``: the group
  ``"net"``, and one group per term of ``config.loss.terms`` that has
  parameters, named after it (the centres: plain SGD at ``optim.center_lr``;
  a term without its own rule: the network's).

  ``lr`` and ``weight_decay`` replace ``optim.lr`` and ``optim.weight_decay``'s value;
  they may be traced arrays (a sweep, ``dsf3n_jax.sweep``). Whether there is weight decay
  at all (the optimiser state's structure) is ``optim.weight_decay > 0``.
  """
  o = config.optim
  net = []
  if o.grad_clip_norm > 0:
    net.append(optax.clip_by_global_norm(o.grad_clip_norm))
  schedule = learning_rate_schedule(config, steps_per_epoch, lr=lr)
  # optax.adam / adamw, with the bias corrections computed as PyTorch's Adam does.
  adam = [scale_by_adam(o.b1, o.b2, o.eps)]
  if o.weight_decay > 0:
    adam.append(optax.add_decayed_weights(o.weight_decay if weight_decay is None
                                          else weight_decay))
  net.append(optax.chain(*adam, optax.scale_by_learning_rate(schedule)))
  groups = {"net": optax.chain(*net)}
  for name in config.loss.terms:
    term = losses.lookup_term(name)
    if term.init is not None:
      groups[name] = groups["net"] if term.optimizer is None else term.optimizer(config)
  return optax.multi_transform(groups, _labels)


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
      if decay == 0:  # 1 - 0 ** t: no correction (b1 = 0, Adam without momentum)
        return moment
      return jax.tree.map(lambda m: m / -jnp.expm1(count * math.log(decay)).astype(m.dtype),
                          moment)

    updates = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), corrected(mu, b1),
                           corrected(nu, b2))
    return updates, optax.ScaleByAdamState(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(base.init, update)


def _labels(trainable):
  return {"net": jax.tree.map(lambda _: "net", trainable["net"]),
          "aux": {name: jax.tree.map(lambda _, n=name: n, params)
                  for name, params in trainable["aux"].items()}}


def init_state(model: DSF3N, tx: optax.GradientTransformation, *, seed: int | jax.Array,
               num_classes: int,
               loss_terms: Iterable[str] = DEFAULT_LOSS_TERMS) -> TrainState:
  """Parameters (PyTorch's init), the loss terms' parameters (``losses.init_aux``: the
  centres standard normal) and the optimisers' state.

  ``seed``: an int, or the key ``jax.random.key(seed)`` (the same state), which lets a
  compiled initialiser take the seed as an argument (``make_init_fn``).
  """
  state = _init_without_optimizer(model, seed, num_classes, tuple(loss_terms))
  return state.replace(opt_state=tx.init(state.trainable))


def _init_without_optimizer(model: DSF3N, seed: int | jax.Array, num_classes: int,
                            loss_terms: tuple[str, ...]) -> TrainState:
  """``init_state`` with ``opt_state=None``: everything a seed draws."""
  key = seed if _is_key(seed) else jax.random.key(seed)
  init_key, aux_key, dropout_key = jax.random.split(key, 3)
  visual = jnp.zeros((2, model.visual_dim), model.param_dtype)
  audio = jnp.zeros((2, model.audio_dim), model.param_dtype)
  unmapped = model.clone(axis_name=None)
  variables = unmapped.init({"params": init_key, "dropout": dropout_key}, visual, audio,
                            train=False)
  aux = losses.init_aux(loss_terms, aux_key, num_classes=num_classes,
                        embed_dim=model.embed_dim, dtype=model.param_dtype)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    batch_stats=variables["batch_stats"], aux=aux, opt_state=None,
                    rng=jax.random.key_data(jax.random.fold_in(key, 1)))


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def make_init_fn(model: DSF3N, tx: optax.GradientTransformation, *, num_classes: int,
                 loss_terms: Iterable[str] = DEFAULT_LOSS_TERMS,
                 sharding: jax.sharding.Sharding | None = None):
  """``seed -> init_state(..., seed=seed)``, compiled once for every seed.

  The seed enters the program as its key, not as a constant: runs of one
  model with different seeds (``training.seeds``, a sweep, a resumed grid)
  share one executable, in memory and in the persistent compilation cache.
  The program draws the parameters and centres on one device (this
  process's first), and equal models (flax modules compare by their fields)
  with the same classes and loss terms get the same jitted program: it is
  traced once per process and compiled once for any number of devices and
  hosts and any optimiser. The optimiser's state is then made from the
  drawn parameters by its own small program, and the state replicated to
  ``sharding`` (None: left on that device).

  The initialiser folds a key and draws an array for every parameter; its
  threefry hashes are made together (``fused_draws``: the same bits, without
  a hash kernel per parameter to compile). It runs once: on CPU it is compiled
  for compile time (``init_compiler_options``). Because of those
  options it must be called at top level: JAX refuses them on a nested jit,
  so under ``jax.eval_shape`` or another ``jit`` call ``init_state`` instead.
  """
  draw = _init_program(model, int(num_classes), tuple(loss_terms))
  optimizer_init = jax.jit(tx.init)
  device = jax.local_devices()[0]

  def init(seed):
    state = draw(jax.device_put(jax.random.key(seed), device))
    state = state.replace(opt_state=optimizer_init(state.trainable))
    return state if sharding is None else replicate(state, sharding)

  return init


_MEMOIZED: list[Callable] = []  # the caches of ``memoized`` functions (``forget_programs``)


def memoized(build: Callable) -> Callable:
  """``build`` remembered for its last 16 argument tuples (so equal arguments get the same
  jitted function, traced and compiled once); unhashable arguments build anew.

  A registration that gives a registered name another object (``registry.replacements``:
  a user's module reloaded after an edit) makes every later call build anew: a model
  names its parts, so equal models may stand for other code then.
  """
  cached = functools.lru_cache(maxsize=16)(lambda replaced, *args: build(*args))
  _MEMOIZED.append(cached.cache_clear)

  @functools.wraps(build)
  def get(*args):
    try:
      hash(args)
    except TypeError:  # e.g. an instance of an unfrozen dataclass
      return build(*args)
    return cached(registry.replacements(), *args)

  return get


def forget_programs() -> None:
  """Forgets what every ``memoized`` function built: later runs of this process trace and
  compile their programs anew. Needed only after changing a setting that JAX compiles
  with but does not key its jitted functions on (``jax_disable_most_optimizations``)."""
  for clear in _MEMOIZED:
    clear()


def abstract_state(model: DSF3N, tx: optax.GradientTransformation, *, num_classes: int,
                   loss_terms: Iterable[str] = DEFAULT_LOSS_TERMS) -> TrainState:
  """``init_state``'s shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), which do not depend
  on the seed: a checkpoint's restore target. What the model draws is traced once per equal
  model, classes and loss terms (``memoized``); the optimiser's state is traced from it."""
  drawn = _abstract_draws(model, int(num_classes), tuple(loss_terms), jax.config.jax_enable_x64)
  return drawn.replace(opt_state=jax.eval_shape(tx.init, drawn.trainable))


@memoized
def _abstract_draws(model: DSF3N, num_classes: int, loss_terms: tuple[str, ...],
                    x64: bool) -> TrainState:
  del x64  # in the key: the dtypes JAX gives depend on it
  return jax.eval_shape(lambda: _init_without_optimizer(model, 0, num_classes, loss_terms))


@memoized
def _init_program(model: DSF3N, num_classes: int, loss_terms: tuple[str, ...]) -> Callable:
  return jax.jit(fused_draws(lambda key: _init_without_optimizer(model, key, num_classes,
                                                                 loss_terms)),
                 compiler_options=init_compiler_options(jax.default_backend()))


# LLVM at -O1 instead of XLA:CPU's -O2 compiled the initialiser in 25-50 % less time (5.5-6 s
# against 8-11.6 s for the models of configs/ on 8 host devices of 2 cores, before its hashes
# were fused) and gave the same bits in float32, bfloat16 and float64 (jax 0.10.2): its
# arithmetic is integer hashing and exact conversions. XLA:CPU's loop emitters for its fusions
# instead of the MLIR fusion emitters halved that again in CPU time (1.8-2.4 s against 3.5-5.1 s
# for the tiny and the full model, fused hashes, 2 cores; 1.1-1.5 s against 2.0-3.0 s of wall
# time), again with the same bits in the three dtypes (two seeds each). Not for the train step:
# -O1 changes its float32 rounding, and the loop emitters compile it slower at -O2.
INIT_COMPILER_OPTIONS = {"cpu": {"xla_backend_optimization_level": 1,
                                 "xla_cpu_use_fusion_emitters": False}}


@functools.cache
def init_compiler_options(backend: str) -> dict[str, Any] | None:
  """``INIT_COMPILER_OPTIONS`` of ``backend`` (JAX's default backend) that this XLA has (None:
  none). An option only makes the initialiser compile faster: one a later XLA drops ("No such
  compile option") is left out rather than failing the run. Tried on an empty program once
  per process."""
  options = dict(INIT_COMPILER_OPTIONS.get(backend, {}))
  for name, value in list(options.items()):
    try:
      jax.jit(lambda: 0, compiler_options={name: value}).lower().compile()
    except jax.errors.JaxRuntimeError as e:
      if "No such compile option" not in str(e):
        raise
      del options[name]
  return options or None


def new_meta() -> dict[str, Any]:
  """The bookkeeping a run starts with (saved beside the state in every checkpoint)."""
  return {"epoch": 0, "step": 0, "best": None, "evals_without_improvement": 0,
          "best_eval_loss": None, "loader": None}
