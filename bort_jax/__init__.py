"""bort_jax: optimal subarchitecture extraction, distillation and conversion of BERT shapes.

Modules are imported on demand (``from bort_jax.core import model``) so that light uses,
such as ``bort-jax cost``, do not pay for TFDS or orbax.
"""

import glob as _glob
import os as _os

__version__ = "0.1.0"

# libtpu (the plan extra: the TPU compiler for --dry-run) on a machine without TPUs: when JAX
# probes its backends, libtpu asks the TPU VM's metadata server and prints warnings to stderr
# when there is none. Off a TPU VM (no /dev/accel* or /dev/vfio/N devices) the answers it would
# look up are given, so it stays quiet and JAX falls back to the CPU as before; on a TPU VM, or
# where the variables are already set, nothing changes. Without TPUs there is no chip to guard,
# so libtpu's one-process lock is lifted too: a dry run next to another JAX process (a
# notebook, a CPU training run) would otherwise fail on "libtpu multi-process lockfile".
TPU_QUIET_ENV = (("TPU_SKIP_MDS_QUERY", "1"), ("TPU_ACCELERATOR_TYPE", "v5litepod-4"),
                 ("TPU_WORKER_HOSTNAMES", "localhost"), ("TPU_WORKER_ID", "0"),
                 ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"))
if not (_glob.glob("/dev/accel*") or _glob.glob("/dev/vfio/[0-9]*")):
  for _key, _value in TPU_QUIET_ENV:
    _os.environ.setdefault(_key, _value)
