"""The launch scripts: --dry-run prints the exact commands, a real run executes exactly those.

No JAX and no cloud: each script runs under bash with fake ``gcloud``, ``tar`` and
``bort-jax`` first on PATH. A fake records every call it gets; in a dry run it must get none,
and in a real run it must get exactly the commands the dry run printed, in the same order.
Bad or missing arguments must stop with exit status 2, a usage text and no bash error
("unbound variable") before anything runs.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["tpu_pod.sh", "gpu.sh", "multiprocess_local.sh"]
SEP = "\x1f"  # between the recorded arguments of one call

# Records its name, the BORT_JAX_* variables it sees and its arguments, one call a line; as
# gcloud, answers a queued resource's describe with ACTIVE; fails (status 7) when an argument
# contains $LAUNCH_TEST_FAIL.
FAKE = """#!/bin/sh
{ printf '%s' "$(basename "$0")"
  printf '\\037%s' "env:${BORT_JAX_COORDINATOR:-}|${BORT_JAX_NUM_PROCESSES:-}|${BORT_JAX_PROCESS_ID:-}"
  for a in "$@"; do printf '\\037%s' "$a"; done
  printf '\\n'; } >> "$LAUNCH_TEST_CALLS"
case " $* " in *" describe "*) echo ACTIVE ;; esac
if [ -n "${LAUNCH_TEST_FAIL:-}" ]; then
  case "$*" in *"$LAUNCH_TEST_FAIL"*) exit 7 ;; esac
fi
exit 0
"""

POD = ["--name=bort-test", "--zone=us-east5-a", "--type=v5p-32"]
MODE = ["distill", "--config=configs/pretrain_bort.py", "--workdir=gs://bucket/bort run"]


@pytest.fixture
def env(tmp_path):
  """PATH with the fakes first, a calls file, a scratch TMPDIR."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name in ("gcloud", "tar", "bort-jax"):
    (bin_dir / name).write_text(FAKE)
    (bin_dir / name).chmod(0o755)
  out = {k: v for k, v in os.environ.items()
         if not k.startswith(("BORT_JAX_", "XLA_FLAGS", "TPU_"))}
  out.update(PATH=f"{bin_dir}:/usr/bin:/bin", LAUNCH_TEST_CALLS=str(tmp_path / "calls"),
             TMPDIR=str(tmp_path))
  return out


def _run(script, args, env, cwd, launch=LAUNCH):
  return subprocess.run(["bash", os.path.join(launch, script), *args], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=60)


def _calls(env) -> list[list[str]]:
  """The recorded calls: [program, env-summary, args...] each."""
  path = env["LAUNCH_TEST_CALLS"]
  if not os.path.exists(path):
    return []
  return [line.split(SEP) for line in open(path).read().splitlines()]


def _dry(script, args, env, cwd) -> list[list[str]]:
  result = _run(script, ["--dry-run", *args], env, cwd)
  assert result.returncode == 0, result.stderr
  assert _calls(env) == [], "a dry run executed a command"
  assert not os.listdir(cwd), "a dry run wrote files"
  return [shlex.split(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("script", SCRIPTS + ["lib.sh"])
def test_bash_syntax(script):
  result = subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], capture_output=True,
                          text=True)
  assert result.returncode == 0, result.stderr


def test_tpu_pod_dry_run_prints_the_lifecycle_in_order(env, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  lines = _dry("tpu_pod.sh", [*POD, "--", *MODE], env, str(cwd))
  kinds = [" ".join(line[:5]) for line in lines]
  create = kinds.index("gcloud compute tpus tpu-vm create")
  setup = [i for i, line in enumerate(lines) if line[:5] == ["gcloud", "compute", "tpus",
                                                                "tpu-vm", "ssh"]]
  scp = [i for i, line in enumerate(lines) if line[:5] == ["gcloud", "compute", "tpus",
                                                              "tpu-vm", "scp"]]
  delete = kinds.index("gcloud compute tpus tpu-vm delete")
  assert "--spot" in lines[create] and "--accelerator-type=v5p-32" in lines[create]
  assert "--version=v2-alpha-tpuv5" in lines[create]
  # setup: the checkout packed, copied and installed on every worker; then the run.
  assert len(setup) == 2 and lines[create + 1][0] == "tar"
  install, run = lines[setup[0]], lines[setup[1]]
  assert "--worker=all" in install and "--worker=all" in run
  assert "jax[tpu]==0.10.2" in install[-1] and "pip install" in install[-1]
  remote = run[-1]
  assert remote.startswith("--command=")
  assert shlex.split(remote[len("--command="):].split(" > ")[0])[-3:] == MODE
  # collect: one copy per host of the 4-host v5p-32, after the run; delete last.
  collect = [i for i in scp if "bort_jax.log" in " ".join(lines[i])]
  assert [lines[i][-2] for i in collect] == [f"--worker={w}" for w in range(4)]
  assert create < setup[0] < setup[1] < collect[0] and collect[-1] < delete == len(lines) - 1
  assert all("--zone=us-east5-a" in line for line in lines if line[0] == "gcloud")


def test_tpu_pod_queued_git_source(env, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  lines = _dry("tpu_pod.sh", ["--name=q1", "--zone=europe-west4-a", "--type=v6e-8", "--queued",
                              "--capacity=on-demand", "--source=https://example.com/b.git",
                              "--ref=v1", "--", *MODE], env, str(cwd))
  create, describe = lines[0], lines[1]
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert "--runtime-version=v2-alpha-tpuv6e" in create and "--spot" not in create
  assert describe[4] == "describe"
  assert not any(line[0] == "tar" for line in lines)
  assert "git clone --quiet https://example.com/b.git" in lines[2][-1] and "checkout" in lines[2][-1]
  assert lines[-1][:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
  assert sum("bort_jax.log" in " ".join(line) for line in lines) == 2  # run + one host


def test_tpu_pod_real_run_executes_what_dry_run_printed(env, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  args = [*POD, "--queued", "--", *MODE]
  printed = [line for line in _dry("tpu_pod.sh", args, env, str(cwd)) if line[0] != "mkdir"]
  result = _run("tpu_pod.sh", args, env, str(cwd))
  assert result.returncode == 0, result.stderr
  called = [[call[0], *call[2:]] for call in _calls(env)]
  assert called == printed


def test_tpu_pod_failed_run_still_collects_and_deletes(env, tmp_path):
  env["LAUNCH_TEST_FAIL"] = "nohup"
  result = _run("tpu_pod.sh", [*POD, "--", *MODE], env, str(tmp_path))
  assert result.returncode == 7
  called = [" ".join(call[2:7]) for call in _calls(env)]
  assert called[-1] == "compute tpus tpu-vm delete bort-test"
  assert sum(c == "compute tpus tpu-vm scp bort-test:bort_jax.log" for c in called) == 4
  assert "still up" not in result.stderr


def test_tpu_pod_failed_setup_leaves_the_slice_and_says_so(env, tmp_path):
  env["LAUNCH_TEST_FAIL"] = "uv venv"
  result = _run("tpu_pod.sh", [*POD, "--", *MODE], env, str(tmp_path))
  assert result.returncode == 7
  assert not any("delete" in call for call in _calls(env))
  assert "TPU bort-test may still be up" in result.stderr and "--steps=delete" in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "--name is missing"),
    (["--name=ok", "--", *MODE], "--zone is missing"),
    (["--name=ok", "--zone=us-east5-a", "--", *MODE], "needs --type"),
    (["--name=Bad_Name", "--zone=us-east5-a", "--type=v4-8", "--", *MODE], "--name='Bad_Name'"),
    (["--name=ok", "--zone=nowhere", "--type=v4-8", "--", *MODE], "--zone='nowhere'"),
    (["--name=ok", "--zone=us-east5-a", "--type=tpu9", "--", *MODE], "--type='tpu9'"),
    (["--name=ok", "--zone=us-east5-a", "--type=v9-8", "--", *MODE], "pass --runtime"),
    (["--name=ok", "--zone=us-east5-a", "--type=v4-8"], "no bort-jax mode"),
    ([*POD, "--capacity=cheap", "--", *MODE], "--capacity='cheap'"),
    ([*POD, "--steps=create,launch", "--", *MODE], "'launch' is not a step"),
    ([*POD, "--steps=delete", "--", *MODE], "has no run step"),
    ([*POD, "--source=/no/such/dir", "--", *MODE], "--source='/no/such/dir'"),
    ([*POD, "--workers=two", "--", *MODE], "--workers=two"),
    ([*POD, "--name", "x", "--", *MODE], "write --name=VALUE"),
    ([*POD, "distill"], "unknown option 'distill'"),
    (["--name=ok", "--zone=us-east5-a", "--steps=collect"], "--workers=N"),
])
def test_tpu_pod_bad_arguments(env, tmp_path, args, message):
  _assert_usage_error("tpu_pod.sh", args, message, env, tmp_path)


def _assert_usage_error(script, args, message, env, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  for extra in ([], ["--dry-run"]):
    result = _run(script, [*extra, *args], env, str(cwd))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert message in result.stderr and "usage: launch/" in result.stderr
    assert "unbound variable" not in result.stderr
    assert not re.search(r": line \d+: ", result.stderr), result.stderr  # no bash error
    assert result.stdout == "" and _calls(env) == [] and not os.listdir(cwd)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(env, tmp_path, script):
  result = _run(script, ["--help"], env, str(tmp_path))
  assert result.returncode == 0 and result.stdout.startswith(f"usage: launch/{script}")
  assert "--dry-run" in result.stdout and _calls(env) == []


def test_gpu_dry_run_and_real_run(env, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  args = ["--gpus=0,1", "--coordinator=10.0.0.2:8476", "--num-processes=2", "--process-id=1",
          "--", *MODE]
  (line,) = _dry("gpu.sh", args, env, str(cwd))
  assert line[:3] == ["env", "CUDA_VISIBLE_DEVICES=0,1", "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"]
  assert line[-4:] == ["bort-jax", *MODE]
  assert "BORT_JAX_PROCESS_ID=1" in line and "BORT_JAX_COORDINATOR=10.0.0.2:8476" in line
  result = _run("gpu.sh", args, env, str(cwd))
  assert result.returncode == 0, result.stderr
  assert _calls(env) == [["bort-jax", "env:10.0.0.2:8476|2|1", *MODE]]


@pytest.mark.parametrize("args, message", [
    ([], "no bort-jax mode"),
    (["--gpus=all", "distill"], "--gpus='all'"),
    (["--mem-fraction=1.5", "distill"], "--mem-fraction='1.5'"),
    (["--mem-fraction=0", "distill"], "--mem-fraction='0'"),
    (["--coordinator=h:1", "distill"], "together"),
    (["--coordinator=h:1", "--num-processes=2", "--process-id=2", "distill"], "out of range"),
    (["--coordinator=h", "--num-processes=2", "--process-id=0", "distill"], "HOST:PORT"),
    (["--num-processes=x", "distill"], "--num-processes=x"),
    (["--workdir=x", "distill"], "unknown option '--workdir=x'"),
])
def test_gpu_bad_arguments(env, tmp_path, args, message):
  _assert_usage_error("gpu.sh", args, message, env, tmp_path)


def test_multiprocess_dry_run_and_real_run(env, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  args = ["--processes=3", "--devices=2", "--port=23456", "--logs=mp logs", "--", *MODE]
  lines = _dry("multiprocess_local.sh", args, env, str(cwd))
  assert lines[0] == ["mkdir", "-p", "mp logs"] and lines[-1] == ["wait"]
  starts = lines[1:-1]
  assert len(starts) == 3
  for pid, line in enumerate(starts):
    assert line[:3] == ["env", "JAX_PLATFORMS=cpu", "XLA_FLAGS=--xla_force_host_platform_device_count=2"]
    assert line[3:6] == ["BORT_JAX_COORDINATOR=127.0.0.1:23456", "BORT_JAX_NUM_PROCESSES=3",
                         f"BORT_JAX_PROCESS_ID={pid}"]
    assert line[6:] == ["bort-jax", *MODE, ">", f"mp logs/process_{pid}.log", "2>&1", "&"]
  result = _run("multiprocess_local.sh", args, env, str(cwd))
  assert result.returncode == 0, result.stderr
  assert sorted(_calls(env)) == [["bort-jax", f"env:127.0.0.1:23456|3|{pid}", *MODE]
                                 for pid in range(3)]
  assert sorted(os.listdir(cwd / "mp logs")) == [f"process_{p}.log" for p in range(3)]


def test_multiprocess_a_failing_process_fails_the_run(env, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  failing = tmp_path / "bin" / "bort-jax"
  failing.write_text('#!/bin/sh\necho "process $BORT_JAX_PROCESS_ID broke"\n'
                     '[ "$BORT_JAX_PROCESS_ID" = 1 ] && exit 3\nexit 0\n')
  result = _run("multiprocess_local.sh", ["--", *MODE], env, str(cwd))
  assert result.returncode == 3
  assert "process 1 failed with status 3" in result.stderr and "process 1 broke" in result.stderr


@pytest.mark.parametrize("args, message", [
    ([], "no bort-jax mode"),
    (["--processes=0", "distill"], "--processes=0 is too small"),
    (["--devices=", "distill"], "--devices= is not a whole number"),
    (["--port=99999", "distill"], "--port=99999 is out of range"),
    (["--port", "1", "distill"], "write --port=VALUE"),
    (["--", "--config=x"], "must come first"),
])
def test_multiprocess_bad_arguments(env, tmp_path, args, message):
  _assert_usage_error("multiprocess_local.sh", args, message, env, tmp_path)


def _checkout_without_bort_jax_on_path(env, tmp_path, venv: bool):
  """A copy of launch/ in a checkout, with (or without) the README's .venv/bin/bort-jax, and
  PATH holding no bort-jax; returns the copy's launch folder and the venv program's path."""
  os.remove(tmp_path / "bin" / "bort-jax")
  repo = tmp_path / "checkout"
  shutil.copytree(LAUNCH, repo / "launch")
  program = repo / ".venv" / "bin" / "bort-jax"
  if venv:
    program.parent.mkdir(parents=True)
    program.write_text(FAKE)
    program.chmod(0o755)
  return str(repo / "launch"), str(program)


@pytest.mark.parametrize("script, args, runs", [
    ("multiprocess_local.sh", ["--processes=2", "--", *MODE], 2),
    ("gpu.sh", ["--", *MODE], 1)])
def test_bort_jax_from_the_readme_venv_when_not_on_path(env, tmp_path, script, args, runs):
  launch, program = _checkout_without_bort_jax_on_path(env, tmp_path, venv=True)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  printed = _run(script, ["--dry-run", *args], env, str(cwd), launch)
  assert printed.returncode == 0, printed.stderr
  starts = [shlex.split(line) for line in printed.stdout.splitlines() if program in line]
  assert len(starts) == runs
  for line in starts:  # the venv's bort-jax runs the mode
    assert line[line.index(program) + 1:][:len(MODE)] == MODE
  result = _run(script, args, env, str(cwd), launch)
  assert result.returncode == 0, result.stderr
  assert [call[0] for call in _calls(env)] == ["bort-jax"] * runs
  assert all(call[-len(MODE):] == MODE for call in _calls(env))


@pytest.mark.parametrize("script, pip_extra", [("multiprocess_local.sh", ""),
                                               ("gpu.sh", " 'jax[cuda12]==0.10.2'")])
def test_missing_bort_jax_says_how_to_install_it(env, tmp_path, script, pip_extra):
  launch, program = _checkout_without_bort_jax_on_path(env, tmp_path, venv=False)
  checkout = os.path.dirname(launch)
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  result = _run(script, ["--", *MODE], env, str(cwd), launch)
  assert result.returncode == 2 and _calls(env) == [] and not os.listdir(cwd)
  assert f"bort-jax is not on PATH and {program} does not exist" in result.stderr
  assert (f"  cd {checkout} && python3 -m venv .venv && .venv/bin/pip install -e .{pip_extra}\n"
          in result.stderr)
  assert f"  source {checkout}/.venv/bin/activate\n" in result.stderr
  assert "unbound variable" not in result.stderr


def test_tpu_pod_dry_run_plans_the_mode_for_its_slice_first(env, tmp_path):
  """--dry-run on a slice the planner knows: one call, the mode's own dry run for it."""
  args = ["--name=plan1", "--zone=us-east5-a", "--type=v5litepod-8", "--dry-run", "--", *MODE]
  result = _run("tpu_pod.sh", args, env, str(tmp_path))
  assert result.returncode == 0, result.stderr
  assert _calls(env) == [["bort-jax", "env:||", *MODE, "--dry-run", "--target=v5e-8"]]
  assert "the plan, on stderr" in result.stderr
  assert result.stdout.splitlines()[0].startswith("gcloud compute tpus tpu-vm create plan1")


def test_tpu_pod_plan_that_does_not_fit_stops_before_create(env, tmp_path):
  env = dict(env, LAUNCH_TEST_FAIL="--target=v5e-8")
  args = ["--name=plan2", "--zone=us-east5-a", "--type=v5litepod-8", "--dry-run", "--", *MODE]
  result = _run("tpu_pod.sh", args, env, str(tmp_path))
  assert result.returncode == 2
  assert result.stdout == "" and "does not fit v5litepod-8" in result.stderr
  no_plan = _run("tpu_pod.sh", args[:-len(MODE) - 1] + ["--no-plan", "--", *MODE], env,
                 str(tmp_path))
  assert no_plan.returncode == 0 and "create plan2" in no_plan.stdout


def test_tpu_pod_planned_slices_are_planner_targets():
  from bort_jax.plan import targets  # pylint: disable=import-outside-toplevel
  text = open(os.path.join(LAUNCH, "tpu_pod.sh")).read()
  pairs = re.search(r'^PLANNED="([^"]+)"', text, re.M).group(1).split()
  tpu = {name for name, t in targets.TARGETS.items() if t.platform == "tpu"}
  assert {p.split(":")[1] for p in pairs} == tpu
