"""Shared base configuration: the original recipe (optimisers, batches, evaluations).

Other configs import this and change a few fields. ``get_config(arg)`` takes
comma-separated variant names, e.g. ``--config=configs/vegas.py:runlocal``.
The fields themselves are declared in ``dsf3n_jax.config_schema``.
"""

VARIANTS = ("runlocal", "tiny", "small", "unimodal")
EXCLUSIVE = (("tiny", "small"),)  # variants that set the same fields to other values
_TRUE, _FALSE = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_variants(arg):
  """'a,b=false' -> {'a': True, 'b': False}: each variant is a boolean switch.

  A bare name or ``name=true|1|yes|on`` turns it on, ``name=false|0|no|off``
  off; an unknown name, any other value, a variant given twice or two exclusive
  ones (``EXCLUSIVE``) is a ``ValueError``.
  """
  out = {}
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    key, value = key.strip(), value.strip().lower()
    if key not in VARIANTS:
      raise ValueError(f"--config variant {key!r} unknown; known: {', '.join(VARIANTS)}")
    if value not in _TRUE + _FALSE:
      raise ValueError(f"--config variant {key}={value!r}: expected true or false")
    if key in out:
      raise ValueError(f"--config variant {key!r} given twice in {arg!r}: give it once")
    out[key] = value in _TRUE
  for group in EXCLUSIVE:
    on = [k for k in group if out.get(k)]
    if len(on) > 1:
      raise ValueError(f"--config variants {' and '.join(on)} exclude each other (each sets "
                       f"the model's sizes): choose one")
  return out


def get_config(arg=None):
  """The base config; ``arg`` holds variants (``parse_variants``), e.g. 'runlocal,tiny'.

  Every field, its default, what it accepts and what it does is declared once,
  in ``dsf3n_jax.config_schema`` (``python -m dsf3n_jax.config_schema`` lists
  them); the model's fields and defaults are ``DSF3N``'s own. Parts are chosen
  by registered name (``config.model.fusion`` etc.: dsf3n_jax.models.registry;
  a config file adds its own by importing the module that registers them).
  """
  from dsf3n_jax import config_schema  # pylint: disable=g-import-not-at-top
  config = config_schema.defaults()
  apply_variants(config, arg)
  return config


def original_recipe(name, *, num_epochs, pair, center, arg=None):
  """The authors' recipe for their dataset ``name``: epochs and the pair and centre weights.

  Batches are shuffled each epoch, as every config here; the original read its file in order:
  ``--config.data.shuffle=False`` does that too.
  """
  config = get_config()
  config.data.name = name
  config.num_epochs = num_epochs
  config.loss.terms.pair = pair
  config.loss.terms.center = center
  return apply_variants(config, arg)


def apply_variants(config, arg):
  """Applies the variants switched on in ``arg`` (see ``parse_variants``)."""
  variants = parse_variants(arg)
  if variants.get("unimodal"):
    apply_unimodal(config)
  if variants.get("runlocal"):
    apply_runlocal(config)
  if variants.get("tiny"):
    apply_tiny(config)
  if variants.get("small"):
    apply_small(config)
  return config


def apply_unimodal(config):
  """Trains for the deployable protocol: each modality embedded alone (README, "Protocols").

  The architecture is unchanged. The same loss is also applied to each
  modality's embedding alone, with the centre term at 0.3 (shared centres on
  L2-normalised embeddings pull the two modalities' classes together in the
  cosine geometry retrieval uses; at the original's 5e-4 they hardly move,
  at 3 they swamp the classifiers),
  the fusion sees the stand-in instead of the partner for half of the
  examples, training runs twice as many epochs (each modality alone learns
  without its partner's help), and the best checkpoint is the one with the
  best ``unimodal_map_average`` on a validation split carved from train (10 %
  unless the config carves one already).
  """
  config.model.missing_partner = "self"
  config.model.partner_dropout = 0.5
  config.loss.unimodal_weight = 1.0
  # Centre term of the alone outputs. Measured on fsdd_digits (seed 0, validation unimodal
  # mAP, selected on: validation; test in brackets): 0.3 -> 0.980 (0.978), 1.0 -> 0.972
  # (0.954), 3.0 -> 0.431 (0.422); unimodal_weight 2 with 1.0 -> 0.758 (0.738).
  config.loss.unimodal_terms.center = 0.3
  config.num_epochs *= 2
  config.selection_metric = "unimodal_map_average"
  if not config.data.validation_fraction:
    config.data.validation_fraction = 0.1
  return config


def apply_tiny(config):
  """A narrow model of the same structure (for tests and smoke runs)."""
  config.model.encoder_features = 128
  config.model.stem_features = 16
  config.model.stem_kernel = 8
  config.model.stem_stride = 2
  config.model.stem_padding = 3
  config.model.branch_features = (16, 16, 32)
  config.model.head_kw.hidden = 32
  config.model.embed_dim = 16
  config.model.classifier_kw.hidden = 16
  return config


def apply_small(config):
  """The tiny convolutions and fusion with the paper's 64-d embedding and a 128-wide head.

  On fsdd_digits (``configs/fsdd.py:unimodal,small``, 30 epochs, seeds 0-4,
  ``benchmarks/results/paper-fsdd.md``) it reached 0.957 ± 0.009 unimodal and 0.982 ± 0.003
  paired test mAP at the last epoch,
  where ``tiny`` (16-d embedding) ranged from 0.52 to 0.85 unimodal: a CPU-sized model for
  grids of runs (``benchmarks/paper.py``) and tests.
  """
  apply_tiny(config)
  config.model.embed_dim = 64
  config.model.head_kw.hidden = 128
  config.model.classifier_kw.hidden = 32
  return config


def apply_runlocal(config):
  """Shrinks a run to seconds on a laptop CPU."""
  config.num_epochs = 2
  config.eval_every_epochs = 1
  config.checkpoint_every_epochs = 1
  config.log_every_steps = 5
  config.batch_size = 32
  config.eval_batch_size = 128
  config.data.synthetic.num_train = 256
  config.data.synthetic.num_test = 128
  return config
