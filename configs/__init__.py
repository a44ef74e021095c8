"""The training configurations: ``--config=configs/<name>.py[:variants]``.

A package, so that ``from configs import default`` means these configs from any
working directory: ``python -m dsf3n_jax.main`` puts the source root on
``sys.path`` first. A ``configs`` folder elsewhere on ``sys.path`` (say, in the
working directory) adds its modules to this package (``pkgutil.extend_path``);
ours win a name both have.
"""

import pkgutil

__path__ = pkgutil.extend_path(__path__, __name__)
