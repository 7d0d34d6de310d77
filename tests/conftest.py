"""Test set-up: eight fake CPU devices for mesh tests, float32 everywhere, CPU only.

The flags must be set before JAX initialises, so this file sets them at import time.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (after the flags)

jax.config.update("jax_default_matmul_precision", "highest")

# The same small programs recur in many tests (a tiny model's steps under new closures): JAX's
# persistent compilation cache, in a folder of this session only, loads a program compiled
# once instead of compiling it again (about a tenth of the suite's time).
_XLA_CACHE = tempfile.mkdtemp(prefix="bort_jax_tests_xla_")
atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _XLA_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
