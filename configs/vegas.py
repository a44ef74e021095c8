"""VEGAS (10 classes): the original recipe, 40 epochs, batch 128, alpha 1e-4, beta 5e-4.

Build the dataset first (README, "Data"); then
``python -m dsf3n_jax.main --config=configs/vegas.py --workdir=DIR``.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "vegas"
  config.num_epochs = 40
  config.loss.terms.pair = 1e-4
  config.loss.terms.center = 5e-4
  return default.apply_variants(config, arg)
