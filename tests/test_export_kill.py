"""A kill in the middle of writing an export leaves nothing that counts as finished.

``export.save`` builds the folder under a temporary name and renames it into place
(``fileio.atomic_dir``). Here a real ``bort-jax teacher-adapt`` run is SIGKILLed after the
parameters of its export are written and before the folder is complete; the demo must not take
the teacher as done, and the next run must write the export again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from bort_jax import main as cli_main
from bort_jax.interop import export
from bort_jax.pipelines import demo

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_distill as helpers  # noqa: E402  (the tiny teacher, corpus and config helpers)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  out = helpers.make_assets(str(tmp_path_factory.mktemp("export_assets")))
  out["xla_cache"] = str(tmp_path_factory.mktemp("xla_cache"))
  return out


# Runs bort-jax in this interpreter with safetensors' writer replaced by one that writes the
# parameters and then kills the process: a SIGKILL in the middle of writing the export.
_DIE_IN_EXPORT = """
import os, signal, sys
import safetensors.numpy
real = safetensors.numpy.save_file
def save_then_die(*args, **kwargs):
  real(*args, **kwargs)
  os.kill(os.getpid(), signal.SIGKILL)
safetensors.numpy.save_file = save_then_die
from bort_jax import main
sys.exit(main.main(sys.argv[1:]))
"""


def test_export_killed_midway_is_redone(assets, tmp_path):
  demo_dir = str(tmp_path / "demo")
  workdir = os.path.join(demo_dir, "teacher")
  config = os.path.join(helpers.REPO, "configs", "pretrain_demo.py")
  argv = ["teacher-adapt", f"--config={config}:tiny,adapt",
          f"--workdir={workdir}"] + helpers.flag_args(assets, **{
              "teacher.kind": "none", "teacher.path": "", "student.kind": "params",
              "student.path": assets["body"], "train.total_steps": 4})
  proc = subprocess.run([sys.executable, "-c", _DIE_IN_EXPORT] + argv, cwd=helpers.REPO,
                        env=helpers.subprocess_env(assets), capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stdout[-2000:] + proc.stderr[-2000:]
  # Trained to the end, killed inside the export: only a hidden temporary folder holds the
  # half-written export, and the demo does not take the teacher as done.
  leftovers = [n for n in os.listdir(workdir) if n.startswith(".export-")]
  assert leftovers and os.listdir(os.path.join(workdir, leftovers[0])) == [export.PARAMS_FILE]
  assert not os.path.exists(os.path.join(workdir, "export"))
  assert not demo.teacher_done(demo_dir)
  # The next run finds the final checkpoint, trains nothing and writes the export again.
  assert cli_main.main(argv) == 0
  assert demo.teacher_done(demo_dir)
  assert not [n for n in os.listdir(workdir) if n.startswith(".export-")]
  step, params = helpers.final_params(workdir)
  assert step == 4
  _, exported = export.load(os.path.join(workdir, "export"))
  flat = {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(exported)}
  helpers.assert_trees_equal(flat, params)  # adapt.trainable="all": the whole model is trained
