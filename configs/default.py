"""Shared base configuration: the original recipe (SPEC "Optimisation") on VEGAS-shaped data.

Other configs import this and change a few fields. ``get_config(arg)`` takes
comma-separated variant names, e.g. ``--config=configs/vegas.py:runlocal``.
"""

import ml_collections

VARIANTS = ("runlocal", "tiny", "small", "unimodal")
_TRUE, _FALSE = ("", "1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_variants(arg):
  """'a,b=false' -> {'a': True, 'b': False}: each variant is a boolean switch.

  A bare name or ``name=true|1|yes|on`` turns it on, ``name=false|0|no|off``
  off; an unknown name or any other value is a ``ValueError``.
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
    out[key] = value in _TRUE
  return out


def get_config(arg=None):
  """The base config; ``arg`` holds variants (``parse_variants``), e.g. 'runlocal,tiny'."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = _data()
  config.model = _model()
  config.loss = _loss()
  config.optim = _optim()
  _schedule(config)
  config.metric = _metric()
  config.distributed = _distributed()
  apply_variants(config, arg)
  return config


def _data():
  """Data (dsf3n_jax.input_pipeline.load_sources)."""
  c = ml_collections.ConfigDict()
  c.name = "synthetic"  # synthetic | vegas | ave | paired_features
  c.path = ""  # the file, for paired_features
  c.data_dir = ""  # TFDS data_dir ('' = TFDS default)
  c.num_classes = 0  # 0 = from the data; otherwise checked against it
  c.validation_fraction = 0.0  # carved from train, stratified, with validation_seed
  c.validation_seed = 0
  c.shuffle = True  # False = file order, like the original
  # "auto": the whole train split in device memory and one compiled call (lax.scan) per epoch
  # on GPU/TPU; streamed batches on CPU, where XLA runs a step inside a loop several times
  # slower than the same step on its own. True / False force either path.
  c.on_device = "auto"
  c.normalize = "none"  # none | standardize (per feature, train statistics)
  c.synthetic = ml_collections.ConfigDict()  # generator kwargs for synthetic
  return c


def _model():
  """Model: ``DSF3N``'s fields, its defaults (the original's; its docstring says what each is).

  The model and its parts are chosen by registered name (dsf3n_jax.models.registry; a config
  file adds its own by importing the module that registers them):
  ``name`` dsf3n | dsf3n_paper; ``fusion`` "mfa" (from num_fusion_stages, mfa_variant,
  use_mfa); ``head`` "mlp" (from head_hidden, embed_dim, dropout_rate); ``classifier`` "mlp"
  (from classifier_hidden). ``missing_partner`` (self | learned | mean) is what the fusion
  sees in place of the absent modality when one modality is embedded alone (the unimodal
  protocol); ``partner_dropout`` the probability in train mode that an example's fusion sees
  it instead of its partner.
  """
  from dsf3n_jax.models import DSF3N, registry  # pylint: disable=g-import-not-at-top

  c = ml_collections.ConfigDict({k: v for k, v in registry.model_fields(DSF3N).items()
                                 if k not in ("num_classes", "dtype", "param_dtype", "bn_momentum",
                                              "bn_epsilon")})
  c.name = "dsf3n"
  c.visual_dim = 0  # 0: from the data
  c.audio_dim = 0
  c.dtype = "float32"  # bfloat16: bf16 compute, float32 params and optimiser state
  return c


def _loss():
  """Loss: weighted terms by name (dsf3n_jax.losses)."""
  c = ml_collections.ConfigDict()
  # Loss: weighted terms by name (dsf3n_jax.losses; a user registers more with
  # losses.register_loss_term). These three are the original's L_id + alpha L_pair + beta L_center.
  c.terms = ml_collections.ConfigDict()
  c.terms.id = 1.0  # identity (discriminative) loss; 0: the ablation without it
  c.terms.pair = 1e-4  # alpha: pair loss
  c.terms.center = 5e-4  # beta: centre loss
  c.id_form = "ce"  # ce | paper
  # > 0: the same terms on each modality's embedding alone, times this weight, are added.
  c.unimodal_weight = 0.0
  # Weights of that loss that differ from loss.terms (e.g. center). A pair weight of 1 there
  # collapsed the unimodal embeddings to a point on fsdd_digits (mAP 0.12): the Euclidean pair
  # distance is minimised by shrinking.
  c.unimodal_terms = ml_collections.ConfigDict()
  return c


def _optim():
  """Optimisers: Adam on the network, SGD on the centres."""
  c = ml_collections.ConfigDict()
  c.lr = 1e-4
  c.b1 = 0.5
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0  # decoupled (AdamW) when > 0
  c.grad_clip_norm = 0.0  # global-norm clipping when > 0
  # constant: the original's runs (its call of adjust_learning_rate is commented out) |
  # warmup_step: what adjust_learning_rate would give the network, 0.1 x its return value |
  # cosine: to 0 over num_epochs
  c.schedule = "constant"
  c.center_lr = 0.05
  return c


def _schedule(config):
  """Batch sizes, epochs, evaluation, checkpoints and selection (set on ``config``)."""
  config.batch_size = 128  # global
  config.num_epochs = 40
  # After epochs 5, 10, ... (1-based) and the last. The original evaluates after 1-based epochs
  # 6, 11, 16, ... (0-based epoch > 0 and epoch % 5 == 0; VEGAS: up to 36 of 40), not the last.
  config.eval_every_epochs = 5
  # What is evaluated (dsf3n_jax.evaluators): name -> {type, split, every_steps | every_epochs
  # (default eval_every_epochs; 0: only at the end), the evaluator's own settings}. Every
  # evaluator also runs after the last step; one of the validation split is skipped when none
  # is carved. A config adds its own, e.g. config.evals.recall = dict(type="precision_recall",
  # split="test", ks=(1, 5)).
  config.evals = ml_collections.ConfigDict()
  config.evals.validation = dict(type="retrieval", split="validation")
  config.evals.test = dict(type="retrieval", split="test")
  config.checkpoint_every_epochs = 5  # and at the end
  # Also every N global steps (0: off): a preempted run loses at most N steps. A checkpoint
  # holds the data position, so a resume from mid-epoch continues with the same batches.
  config.checkpoint_every_steps = 0
  # With the train split in device memory, at most this many steps per compiled call (0: up to
  # the next action or epoch end); a preemption signal is acted on between calls.
  config.steps_per_call = 0
  # (start, stop): a jax.profiler trace of the steps after the start-th up to the stop-th into
  # workdir/profile (TensorBoard's Profile tab, XProf). (): none.
  config.profile_steps = ()
  config.keep_checkpoints = 2  # the latest ones; the best one is kept besides
  # False: checkpoints hold parameters, BatchNorm statistics, centres, step and key only (about
  # a third of the size); a resume then starts Adam afresh, so it is not bit for bit.
  config.checkpoint_optimizer_state = True
  # A resume refuses a workdir whose checkpoints were trained on other data or another loss
  # config (both named); True resumes anyway, e.g. to fine-tune on new data.
  config.allow_resume_mismatch = False
  config.log_every_steps = 50
  config.selection_split = "validation"  # validation (if carved) | test: picks the best checkpoint
  # map_average (the paper's protocol) | unimodal_map_average (each modality embedded alone), of
  # the evaluator named as selection_split; or "<eval name>/<metric>" of any of config.evals.
  config.selection_metric = "map_average"
  # Stop after this many evaluations in a row whose selection-split loss is not strictly lower
  # than the best so far (a tie counts as no improvement); 0 = off. The loss is one mean over
  # the whole split with the trained centres. Not the original's signal, which cannot be
  # reproduced: a sum of per-batch losses over its drop_last test batches, the centre term
  # against freshly random (unseeded randn) centres at every evaluation, a tie counting as an
  # improvement (4 evaluations without one stop it).
  config.early_stopping_patience = 0
  config.eval_batch_size = 1024


def _metric():
  """The retrieval metric (dsf3n_jax.metrics)."""
  c = ml_collections.ConfigDict()
  c.distance = "cosine"
  c.k = 0  # 0 = all items (the paper's mAP)
  # 0 = every test item (the default). N = the original's protocol: batches of N in file order,
  # the last partial batch dropped, i.e. only the first metrics.original_protocol_count(n, N)
  # items (the paper: N = 128 on VEGAS, 189 on AVE).
  c.original_test_batches = 0
  return c


def _distributed():
  """Multi-host (dsf3n_jax.distributed); empty = automatic or single process."""
  c = ml_collections.ConfigDict()
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1
  c.initialization_timeout = 300
  c.heartbeat_timeout = 100
  return c


def original_recipe(name, *, num_epochs, pair, center, arg=None):
  """The authors' recipe for their dataset ``name``: epochs and the pair and centre weights."""
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
  config.model.head_hidden = 32
  config.model.embed_dim = 16
  config.model.classifier_hidden = 16
  return config


def apply_small(config):
  """The tiny convolutions and fusion with the paper's 64-d embedding and a 128-wide head.

  On fsdd_digits (``configs/fsdd.py:unimodal,small``, 30 epochs, seeds 0-2 trained together
  in 169 s on a 2-core CPU) it reached 0.96-0.97 unimodal and 0.98-0.99 paired test mAP,
  where ``tiny`` (16-d embedding) ranged from 0.52 to 0.85 unimodal: a CPU-sized model for
  grids of runs (``benchmarks/paper.py``) and tests.
  """
  apply_tiny(config)
  config.model.embed_dim = 64
  config.model.head_hidden = 128
  config.model.classifier_hidden = 32
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
