"""Any paired-feature file (.h5 or .npz with the six arrays of docs/data.md): our recipe.

``python -m dsf3n_jax.main --config=configs/paired_features.py
--config.data.path=FILE --workdir=DIR``: feature sizes and the class count are
read from the file. This is the recipe that worked across the real paired-feature
sets we tried (configs/fsdd.py's), not the paper's: features standardised with the
train statistics, lr 1e-3 with a cosine decay, the pair term at 1e-2, 10 epochs,
and the best checkpoint selected on a validation split of 10 % carved from train.
The paper's VEGAS recipe on such a file: ``configs/default.py`` with
``--config.data.name=paired_features``. ``:unimodal`` trains for retrieval from one
modality alone; on new data, ``python -m dsf3n_jax.sweep
--config=configs/paired_features.py:unimodal --config.data.path=FILE --sweep=default
--workdir=DIR`` trains it for 60 epochs (lr 3e-3,
partner dropout 0.75, the alone centre weight 0.1) at three levels of input noise,
picks one on the validation split and trains it again on train + validation
(README, "Sweeps").
"""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "paired_features"
  config.data.normalize = "standardize"
  config.data.validation_fraction = 0.1
  config.optim.lr = 1e-3
  config.optim.schedule = "cosine"
  config.loss.terms.pair = 1e-2
  config.num_epochs = 10
  return default.apply_variants(config, arg)
