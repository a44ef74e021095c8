"""AVE (the authors' 15-class subset): the original recipe, 120 epochs, alpha = beta = 1e-4."""

from configs import default


def get_config(arg=None):
  config = default.get_config()
  config.data.name = "ave"
  config.num_epochs = 120
  config.loss.terms.pair = 1e-4
  config.loss.terms.center = 1e-4
  return default.apply_variants(config, arg)
