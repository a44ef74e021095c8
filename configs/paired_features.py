"""Any paired-feature file (.h5 or .npz with the six arrays of SPEC.md).

``python -m dsf3n_jax.main --config=configs/paired_features.py
--config.data.path=FILE --workdir=DIR``: feature sizes and the class count are
read from the file. The recipe is VEGAS's.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "paired_features"
  return default.apply_variants(config, arg)
