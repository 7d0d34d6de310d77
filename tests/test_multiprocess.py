"""A real two-process distillation on 127.0.0.1 matches the single-process run.

Two ``bort-jax distill`` processes, each with 4 fake CPU devices, join through
``jax.distributed`` (``BORT_JAX_COORDINATOR`` / ``BORT_JAX_NUM_PROCESSES`` /
``BORT_JAX_PROCESS_ID``; ``sharding.maybe_initialize_distributed`` selects the gloo
collectives). Each loads only its half of every global batch; the mesh spans all 8 devices
with every axis used (data 2 x fsdp 2 x model 2), so parameters are sharded across the two
processes and the checkpoint and the export are written collectively. The exported
parameters must equal those of the same run in this single process on 8 devices (1e-5: the
cross-process reductions may add in another order).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from bort_jax.interop import export
from bort_jax.pipelines import distill

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_distill as helpers  # noqa: E402  (the tiny teacher, corpus and config helpers)

MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.model": 2}
RUN = {"train.total_steps": 6, "train.checkpoint_every": 3, **MESH}
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  out = helpers.make_assets(str(tmp_path_factory.mktemp("mp_assets")))
  out["xla_cache"] = cache
  return out


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _flat(params) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(params)}


def test_two_processes_match_one(assets, tmp_path):
  workdir = str(tmp_path / "two")
  port = _free_port()
  cmd = [sys.executable, "-m", "bort_jax.main", "distill",
         f"--config={os.path.join(helpers.REPO, 'configs', 'pretrain_demo.py')}:tiny",
         f"--workdir={workdir}"] + helpers.flag_args(assets, **RUN)
  procs, logs = [], []
  try:
    for pid in range(2):
      log = open(tmp_path / f"process_{pid}.log", "w")
      logs.append(log)
      env = helpers.subprocess_env(assets, devices=4, BORT_JAX_COORDINATOR=f"127.0.0.1:{port}",
                                   BORT_JAX_NUM_PROCESSES="2", BORT_JAX_PROCESS_ID=str(pid))
      procs.append(subprocess.Popen(cmd, cwd=helpers.REPO, env=env, stdout=log,
                                    stderr=subprocess.STDOUT))
    # Meanwhile the single-process reference (8 devices, the same mesh and global batch).
    ref_result = distill.run(helpers.make_config(assets, **RUN), str(tmp_path / "one"))
    for proc in procs:
      proc.wait(timeout=TIMEOUT_S)
  finally:
    for proc in procs:  # only the processes started here, by their own handles
      if proc.poll() is None:
        proc.kill()
        proc.wait(10)
    for log in logs:
      log.close()
  outputs = [open(tmp_path / f"process_{pid}.log").read() for pid in range(2)]
  for pid, proc in enumerate(procs):
    assert proc.returncode == 0, f"process {pid} failed:\n{outputs[pid][-4000:]}"
  # Process 0 alone reports, prints the result and writes the metrics.
  assert "step 6/6" in outputs[0] and "step 6/6" not in outputs[1]
  printed = json.loads(outputs[0][outputs[0].index("\n{") + 1:])
  assert printed["processes"] == 2 and printed["devices"] == 8 and printed["step"] == 6
  assert '"processes"' not in outputs[1]
  lines = open(os.path.join(workdir, "metrics.jsonl")).read().splitlines()
  assert len(lines) == 6

  cfg_two, two = export.load(os.path.join(workdir, "export"))
  cfg_one, one = export.load(ref_result["export"])
  assert cfg_two == cfg_one
  two, one = _flat(two), _flat(one)
  assert sorted(two) == sorted(one)
  for k in one:
    np.testing.assert_allclose(two[k], one[k], atol=1e-5, rtol=0, err_msg=k)
  print("max |two processes - one process| =",
        max(float(np.max(np.abs(two[k] - one[k]))) for k in one))
  # Training moved the parameters, so equality is not trivial.
  assert np.max(np.abs(one["['mlm_head']['bias']"])) > 0  # zero at init
