"""Shared base configuration: the original recipe (SPEC "Optimisation") on VEGAS-shaped data.

Other configs import this and change a few fields. ``get_config(arg)`` takes
comma-separated variant names, e.g. ``--config=configs/vegas.py:runlocal``.
"""

import ml_collections


def parse_variants(arg):
  """'a,b=c' -> {'a': True, 'b': 'c'}."""
  out = {}
  for item in (arg or "").split(","):
    item = item.strip()
    if not item:
      continue
    key, _, value = item.partition("=")
    out[key] = value if value else True
  return out


def get_config(arg=None):
  """The base config; ``arg`` may hold 'runlocal' to shrink the run to seconds."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data (dsf3n_jax.input_pipeline.load_sources).
  config.data = ml_collections.ConfigDict()
  config.data.name = "synthetic"  # synthetic | vegas | ave | paired_features
  config.data.path = ""  # the file, for paired_features
  config.data.data_dir = ""  # TFDS data_dir ('' = TFDS default)
  config.data.num_classes = 0  # 0 = from the data; otherwise checked against it
  config.data.validation_fraction = 0.0  # carved from train, stratified, with validation_seed
  config.data.validation_seed = 0
  config.data.shuffle = True  # False = file order, like the original
  # "auto": the whole train split in device memory and one compiled call (lax.scan) per epoch
  # on GPU/TPU; streamed batches on CPU, where XLA runs a step inside a loop several times
  # slower than the same step on its own. True / False force either path.
  config.data.on_device = "auto"
  config.data.normalize = "none"  # none | standardize (per feature, train statistics)
  config.data.synthetic = ml_collections.ConfigDict()  # generator kwargs for synthetic

  # Model (dsf3n_jax.models.DSF3N). Input dims 0 = from the data.
  config.model = ml_collections.ConfigDict()
  config.model.visual_dim = 0
  config.model.audio_dim = 0
  config.model.encoder_features = 1024
  config.model.kernel_sizes = (3, 5, 7)
  config.model.stem_features = 64
  config.model.stem_kernel = 32
  config.model.stem_stride = 8
  config.model.stem_padding = 12
  config.model.branch_features = (64, 128, 256)
  config.model.num_fusion_stages = 2
  config.model.mfa_variant = "reference"
  config.model.use_mfa = True
  config.model.head_hidden = 512
  config.model.embed_dim = 64
  config.model.classifier_hidden = 32
  config.model.dropout_rate = 0.5
  config.model.dtype = "float32"  # bfloat16: bf16 compute, float32 params and optimiser state

  # Loss (dsf3n_jax.losses.dsf3n_loss).
  config.loss = ml_collections.ConfigDict()
  config.loss.alpha = 1e-4  # pair loss
  config.loss.beta = 5e-4  # centre loss
  config.loss.id_form = "ce"  # ce | paper

  # Optimisers: Adam on the network, SGD on the centres.
  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 1e-4
  config.optim.b1 = 0.5
  config.optim.b2 = 0.999
  config.optim.eps = 1e-8
  config.optim.weight_decay = 0.0  # decoupled (AdamW) when > 0
  config.optim.grad_clip_norm = 0.0  # global-norm clipping when > 0
  # constant | warmup_step (the original's adjust_learning_rate) | cosine (to 0 over num_epochs)
  config.optim.schedule = "constant"
  config.optim.center_lr = 0.05

  config.batch_size = 128  # global
  config.num_epochs = 40
  config.eval_every_epochs = 5  # and at the end
  config.checkpoint_every_epochs = 5  # and at the end
  config.keep_checkpoints = 2
  config.log_every_steps = 50
  config.selection_split = "validation"  # validation (if carved) | test: picks the best checkpoint
  config.early_stopping_patience = 0  # evaluations without a lower loss; 0 = off
  config.eval_batch_size = 1024
  config.metric = ml_collections.ConfigDict()
  config.metric.distance = "cosine"
  config.metric.k = 0  # 0 = all items (the paper's mAP)

  # Multi-host (dsf3n_jax.distributed); empty = automatic or single process.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  config.distributed.initialization_timeout = 300
  config.distributed.heartbeat_timeout = 100

  apply_variants(config, arg)
  return config


def apply_variants(config, arg):
  """Applies the variants named in ``arg`` (see ``parse_variants``)."""
  variants = parse_variants(arg)
  unknown = set(variants) - {"runlocal", "tiny"}
  if unknown:
    raise ValueError(f"--config variant(s) {sorted(unknown)} unknown; known: runlocal, tiny")
  if variants.get("runlocal"):
    apply_runlocal(config)
  if variants.get("tiny"):
    apply_tiny(config)
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
