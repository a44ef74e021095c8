"""VEGAS (10 classes): the original recipe, 40 epochs, batch 128, alpha 1e-4, beta 5e-4.

Build the dataset first (README, "Data"); then
``python -m dsf3n_jax.main --config=configs/vegas.py --workdir=DIR``.
"""

from configs import default


def get_config(arg=None):
  return default.original_recipe("vegas", num_epochs=40, pair=1e-4, center=5e-4, arg=arg)
