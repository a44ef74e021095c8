"""AVE (the authors' 15-class subset): the original recipe, 120 epochs, alpha = beta = 1e-4."""

from configs import default


def get_config(arg=None):
  return default.original_recipe("ave", num_epochs=120, pair=1e-4, center=1e-4, arg=arg)
