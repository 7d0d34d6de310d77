"""``--dry-run --target``: the real programs compiled for a target without its devices.

The TPU rows compile with libtpu's compile-only devices (the plan extra, in the test extra):
a tiny config fits a v5e 2x2 slice and prints its memory; an absurd batch is refused by the
TPU compiler itself, exit 2 with its verdict. Every plannable mode is planned on the simulated
8-device CPU mesh, and on a GPU target (an estimate). Nothing is ever written to the workdir.
"""

from __future__ import annotations

import importlib.util
import os

import jax
import pytest

from bort_jax import main as cli_main
from bort_jax.core import arch as arch_lib
from bort_jax.core import model
from bort_jax.interop import export
from bort_jax.plan import dry_run, programs, targets

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TINY_DISTILL = ["distill", "--config=configs/pretrain_bort.py:tiny", "--shapes",
                "teacher=D2-A2-H64-I128"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
  """The persistent compilation cache under the test's folder, never the user's."""
  monkeypatch.setenv("BORT_JAX_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> str:
  path = str(tmp_path_factory.mktemp("plan") / "model")
  config = arch_lib.get_model_config("D2-A2-H32-I64", family="bert", vocab_size=128,
                                     max_positions=64)
  export.save(path, jax.device_get(model.init(jax.random.key(0), config)), config)
  return path


def _dry(argv, workdir, capsys):
  status = cli_main.main(argv + ["--dry-run", f"--workdir={workdir}"])
  out, err = capsys.readouterr()
  assert not os.path.exists(workdir), "a dry run wrote to the workdir"
  assert "Traceback" not in err
  return status, out, err


def test_target_table_is_complete():
  for target in targets.TARGETS.values():
    assert target.devices > 0 and target.chips > 0 and target.memory_per_device > 0
    assert target.peak_flops_per_device > 1e12 and target.interconnect and target.source
    assert (target.platform == "tpu") == bool(target.topology)
  assert targets.CHECKED
  with pytest.raises(ValueError, match="known: v5e-4"):
    targets.resolve("v3-8")


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (the plan extra) is not installed")
def test_every_tpu_target_has_its_devices_one_per_chip():
  for target in targets.TARGETS.values():
    if target.platform == "tpu":
      devices = targets.devices_of(target)
      assert len(devices) == target.devices == target.chips, target.name
      assert len({d.id for d in devices}) == target.devices


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (the plan extra) is not installed")
def test_tiny_config_fits_v5e_2x2_and_prints_memory(tmp_path, capsys):
  # A small student: the TPU compile of Bort's shape took 58 s of the default suite.
  argv = TINY_DISTILL + ["--target=v5e-4", "--config.student.arch=D2-A4-H128-I256"]
  status, out, _ = _dry(argv, str(tmp_path / "run"), capsys)
  assert status == 0, out
  assert "dry run of distill on v5e-4: 4 devices" in out
  line = next(l for l in out.splitlines() if "distill train step" in l)
  for part in ("arguments", "temporaries", "output", "headroom", "GFLOP per device"):
    assert part in line, line
  assert "x 4 runs" in line  # the tiny config's 4 steps


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu (the plan extra) is not installed")
def test_absurd_batch_is_refused_by_the_tpu_compiler(tmp_path, capsys):
  status, out, err = _dry(TINY_DISTILL + ["--target=v5e-4",
                                          "--config.data.global_batch_size=1048576"],
                          str(tmp_path / "run"), capsys)
  assert status == 2
  last = err.strip().splitlines()[-1]
  assert last.startswith("bort-jax distill: --dry-run --target=v5e-4: ")
  assert "RESOURCE_EXHAUSTED" in last and "exceeds available HBM" in last, last
  assert "--max-batch" in last and "fsdp" in last
  assert "DOES NOT FIT" in out


def test_tpu_target_without_libtpu_names_the_extra(tmp_path, capsys, monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  status, _, err = _dry(TINY_DISTILL + ["--target=v5e-4"], str(tmp_path / "run"), capsys)
  assert status == 2
  assert "pip install -e '.[plan]'" in err and err.count("\n") == 1


@pytest.mark.parametrize("argv", [
    TINY_DISTILL,
    ["teacher-adapt", "--config=configs/pretrain_demo.py:adapt,tiny",
     "--shapes", "student=D2-A2-H32-I64"],
    ["extract", "--config=configs/extract_demo.py:tiny", "--shapes", "teacher=D2-A2-H32-I64"],
    ["finetune", "--config=configs/finetune.py:task=glue/rte,tiny",
     "--config.train.total_steps=10", "--shapes", "init=D2-A2-H32-I64"],
], ids=["distill", "teacher-adapt", "extract", "finetune"])
def test_each_mode_on_the_simulated_cpu_mesh(tmp_path, capsys, argv):
  assert len(jax.devices()) == 8  # conftest's simulated mesh
  status, out, _ = _dry(argv + ["--target=cpu"], str(tmp_path / "run"), capsys)
  assert status == 0, out
  assert "8 devices" in out and "total" in out and "ETA" in out
  if argv[0] == "extract":
    assert "bucket plan:" in out and "padded-FLOP overhead" in out


def test_gpu_target_is_an_estimate_on_a_cpu_mesh_of_its_size(tmp_path, capsys, tiny_export):
  cache_before = jax.config.jax_compilation_cache_dir
  status, out, _ = _dry(["finetune", "--config=configs/finetune.py:task=glue/rte,tiny",
                         f"--config.init.path={tiny_export}", "--config.train.total_steps=100",
                         "--target=h100-x8", "--mfu=0.5", "--prices", '{"h100-x8": 3.0}'],
                        str(tmp_path / "run"), capsys)
  assert status == 0, out
  assert "ESTIMATE" in out and "mesh {'data': 8" in out
  assert "at MFU 0.50 (given with --mfu)" in out and "at the given price" in out
  assert jax.config.jax_compilation_cache_dir == cache_before  # the caller's JAX as it was
  assert os.listdir(tmp_path / "cache" / "xla")  # the plan's compiles went to the cache


def test_plan_memory_holds_the_state(tiny_export):
  """The compiled arguments hold at least the parameters, Adam's two moments and the batch."""
  from bort_jax import cli  # pylint: disable=import-outside-toplevel
  config = cli.load_config("configs/finetune.py:task=glue/rte,tiny")
  config.init.path = tiny_export
  target = targets.cpu_target(1)
  plan = programs.build("finetune", config, jax.devices()[:1], {})
  result = dry_run.compile_program(plan.programs[0], target, lambda line: None)
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), export.load_config(
      tiny_export), model.HeadSpec("classification", 2)))
  params = sum(x.size * 4 for x in jax.tree.leaves(abstract))
  assert result.argument >= 3 * params
  assert result.flops > 0 and not result.verdict


def test_summary_arithmetic():
  target = targets.TARGETS["v5e-8"]
  plan = programs.ModePlan("distill", "distill", {"data": 8}, 64, 8, [], [])
  done = [dry_run.CompiledPlan("step", 1000, 1.0, argument=2 * dry_run.GIB,
                               temp=dry_run.GIB, output=dry_run.GIB, alias=dry_run.GIB,
                               flops=1e12)]
  summary = dry_run.summarise(plan, done, target, (0.5, "given"), {"v5e": 2.0})
  eta = 1000 * 1e12 / (197e12 * 0.5)
  assert summary["eta_s"] == pytest.approx(eta)
  assert summary["chip_hours"] == pytest.approx(eta / 3600 * 8)
  assert summary["bill"] == pytest.approx(summary["chip_hours"] * 2.0)
  assert summary["peak_gib"] == pytest.approx(3.0) and summary["fits"]


def test_max_batch_bisects_to_the_largest_fit(monkeypatch):
  """The search over compiles: with a compiler that fits up to 37, it answers within 1/16 below
  37 from a batch that fits (doubling up) and from one that does not (halving down), exactly
  for small batches; nothing fits: 0."""
  limit = 37
  compiled = []

  class Fake:
    def __init__(self, batch):
      self.batch = batch

    def rebatch(self, batch):
      return Fake(batch)

  def compile_all(plan, target, say, largest_only=False):
    compiled.append(plan.batch)
    return [dry_run.CompiledPlan("p", 1, 0.0, verdict="" if plan.batch <= limit else "OOM")]

  monkeypatch.setattr(dry_run, "compile_all", compile_all)
  best, probes = dry_run.max_batch(Fake(8), None, None, start=8, first_fits=True)
  assert limit - limit // 16 <= best <= limit and 8 not in compiled  # 8's verdict is reused
  assert "64 does not fit" in probes and f"{best} fits" in probes
  assert limit - limit // 16 <= dry_run.max_batch(Fake(8), None, None, start=200)[0] <= limit
  limit = 5
  assert dry_run.max_batch(Fake(8), None, None, start=1)[0] == 5
  limit = 0
  assert dry_run.max_batch(Fake(8), None, None, start=8)[0] == 0


def test_demo_is_planned_stage_by_stage(tmp_path, capsys):
  """Before anything exists, every stage is planned with stand-ins it names; nothing written."""
  status, out, _ = _dry(["demo", "--config=configs/demo.py:tiny", "--target=cpu", "--shapes",
                         "teacher=D2-A2-H32-I64"], str(tmp_path / "run"), capsys)
  assert status == 0, out
  stages = [line for line in out.splitlines() if line.startswith("== demo stage")]
  assert [s.split()[3] for s in stages[:3]] == ["teacher-adapt", "extract", "distill"]
  assert "its largest candidate" in stages[2]
  assert any("finetune student on" in s and "the distilled student" in s for s in stages)
  assert len(stages) == 3 + 6  # the tiny suite's three tasks, for the teacher and the student
  assert "the demo's training stages: ETA" in out


def test_largest_only_compiles_the_program_that_holds_the_most():
  f32 = jax.numpy.float32
  small = programs.Program("small", jax.jit(lambda x: x + 1),
                           (jax.ShapeDtypeStruct((4,), f32),), 3, 8.0, 4.0)
  big = programs.Program("big", jax.jit(lambda x: x @ x),
                         (jax.ShapeDtypeStruct((64, 64), f32),), 1, 16.0, 4096.0)
  plan = programs.ModePlan("extract", "proxy", {"data": 1}, 1, 1, [small, big], [])
  target = targets.cpu_target(1)
  done = dry_run.compile_all(plan, target, lambda line: None, largest_only=True)
  assert [d.compiled for d in done] == [False, True]
  assert done[0].flops == 8.0 and done[0].runs == 3  # analytic, kept for the ETA
  assert done[1].argument == 64 * 64 * 4
  assert all(d.compiled for d in dry_run.compile_all(plan, target, lambda line: None))
