"""bort_jax: optimal subarchitecture extraction, distillation and conversion of BERT shapes.

Modules are imported on demand (``from bort_jax.core import model``) so that light uses,
such as ``bort-jax cost``, do not pay for TFDS or orbax.
"""

__version__ = "0.1.0"
