"""The whole demo pipeline: fetch, teacher-adapt, extract, distil (``bort-jax demo``).

    bort-jax demo --workdir=runs/demo [--cache-dir=DIR] [--quick]

Holds the three step configs (``adapt``, ``extract``, ``distill``) as they come from
``pretrain_demo.py:adapt``, ``extract_demo.py`` and ``pretrain_demo.py``; the pipeline points
their data at the cache and their teacher at the workdir's adapted one, so any of their fields
can be overridden here (``--config.distill.train.total_steps=400``). Args: ``quick`` (the same
as ``--quick``: every step shortened, a smoke run of the same path); ``tiny`` (every stage on
the tiny synthetic suite of ``data/tiny_suite.py`` with the steps' own ``tiny`` configs: about
a minute on a CPU, no network; the notebook's test mode).
"""

import ml_collections

from configs import common
from configs import extract_demo
from configs import pretrain_demo


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"quick": common.FLAG, "tiny": common.FLAG}, "demo.py")
  tiny = ",tiny" if args.get("tiny") else ""
  config = ml_collections.ConfigDict()
  config.cache_dir = ""                # "" = $BORT_JAX_CACHE or ~/.cache/bort_jax
  config.quick = bool(args.get("quick"))  # shorten every step (a smoke run)
  config.tiny = bool(tiny)             # synthetic suite in cache_dir ("" = WORKDIR/tiny_suite)
  config.adapt = pretrain_demo.get_config("adapt" + tiny)
  config.extract = extract_demo.get_config(tiny[1:] or None)
  config.distill = pretrain_demo.get_config(tiny[1:] or None)
  if tiny:  # one compiled proxy bucket: the extraction's code path, not a search worth reading
    config.extract.space.hidden = (32,)
    config.extract.space.heads = (2,)
  return config
