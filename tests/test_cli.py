"""The ``bort-jax`` command line: one flag system, ``--help`` everywhere, configs and overrides."""

from __future__ import annotations

import ml_collections
import pytest

from bort_jax import cli
from bort_jax import main as cli_main
from bort_jax.pipelines import setup

CONFIG_MODES = {"teacher-adapt": "config.adapt.trainable = 'all'",
                "distill": "config.train.total_steps = 200",
                "extract": "config.fptas.eps = 9",
                "demo": "config.distill.train.total_steps = 200",
                "finetune": "config.task = 'glue/rte'",
                "report": "config.rounds = 10"}


@pytest.mark.parametrize("mode", list(cli_main.MODES))
def test_every_mode_has_help_with_its_flags(mode, capsys):
  assert cli_main.main([mode, "--help"]) == 0
  out = capsys.readouterr().out
  # One parser for every mode: the global flags are listed everywhere, evaluate's and
  # predict's included.
  assert out.startswith(f"usage: bort-jax {mode}") and "--debug" in out and "--verbose" in out
  flags = {"cost": "--measure", "convert": "--from-hf", "data": "--cache-dir",
           "demo": "--quick", "evaluate": "--checkpoint", "predict": "--text",
           "export": "--quantize"}.get(mode, "--workdir")
  assert flags in out
  if mode in CONFIG_MODES:  # the config's fields with their current defaults
    assert "--config" in out and CONFIG_MODES[mode] in out


def test_help_shows_the_fields_of_the_given_config_and_arg(capsys):
  assert cli_main.main(["extract", "--config=configs/extract_demo.py:tiny", "-h"]) == 0
  out = capsys.readouterr().out
  assert "config fields of configs/extract_demo.py:tiny" in out
  assert "config.space.hidden = (16, 32)" in out and "config.fptas.eps = 2" in out


def test_top_level_usage_lists_every_mode(capsys):
  assert cli_main.main(["--help"]) == 0
  out = capsys.readouterr().out
  assert all(f"  {mode} " in out for mode in cli_main.MODES)


def test_overrides_take_the_type_of_the_field():
  config = ml_collections.ConfigDict({
      "n": 3, "x": 0.5, "flag": False, "name": "a", "files": ("a",), "mesh": {"data": -1},
      "rules": None})
  cli.apply_overrides(config, [
      ("config.n", "7"), ("config.x", "2"), ("config.flag", "true"), ("config.name", "1e-3"),
      ("config.files", "/data/*.txt"), ("config.mesh.data", "4"),
      ("config.rules", "(('embed', None),)")])
  assert config.n == 7 and config.x == 2.0 and isinstance(config.x, float)
  assert config.flag is True and config.name == "1e-3"
  assert config.files == ("/data/*.txt",) and config.mesh.data == 4
  assert config.rules == (("embed", None),)
  cli.apply_overrides(config, [("config.files", "('a', 'b')"), ("config.mesh", "{'data': 2}")])
  assert config.files == ("a", "b") and config.mesh.data == 2
  for path, text, message in (("config.n", "1.5", "expected an integer"),
                              ("config.flag", "maybe", "expected true or false"),
                              ("config.mesh", "4", "expected a dict"),
                              ("config.nn", "1", "did you mean config.n?")):
    with pytest.raises(cli.UsageError, match=message):
      cli.apply_overrides(config, [(path, text)])


def test_split_overrides_reads_both_forms():
  rest, overrides = cli.split_overrides(
      ["--workdir=w", "--config.a.b=1", "--config.c", "x y", "--config=f.py:tiny"])
  assert rest == ["--workdir=w", "--config=f.py:tiny"]
  assert overrides == [("config.a.b", "1"), ("config.c", "x y")]
  with pytest.raises(cli.UsageError, match="needs a value"):
    cli.split_overrides(["--config.a"])


def test_configs_are_a_package_with_one_arg_parser():
  paper = cli.load_config("configs/extract_paper.py")
  demo = cli.load_config("configs/extract_demo.py")
  assert paper.loss.to_dict() == demo.loss.to_dict()  # both from configs/common.py
  assert paper.teacher.kind == "hf" and len(paper.space.depth) == 6
  tiny = cli.load_config("configs/pretrain_demo.py:adapt,tiny,arch=D2-A2-H64-I128")
  assert tiny.student.arch == "D2-A2-H64-I128" and tiny.train.total_steps == 6
  assert "adapt" in tiny
  for spec, message in (("configs/extract_paper.py:tiny", "unknown arg 'tiny'.*no args"),
                        ("configs/pretrain_demo.py:arch", "must be given as arch=VALUE"),
                        ("configs/pretrain_bort.py:tiny=1", "tiny without a value")):
    with pytest.raises(cli.UsageError, match=message):
      cli.load_config(spec)


@pytest.mark.parametrize("spec", ["configs/pretrain_demo.py", "configs/pretrain_demo.py:adapt",
                                  "configs/pretrain_bort.py", "configs/pretrain_bort.py:tiny"])
def test_total_steps_is_one_field(spec):
  config = cli.load_config(spec)
  assert "total_steps" not in config.optim and config.train.total_steps >= 1
  # The learning-rate schedule is as long as the training run.
  assert setup.optimizer_config(config)["total_steps"] == config.train.total_steps
  config.train.total_steps = 77
  assert setup.optimizer_config(config)["total_steps"] == 77


def test_every_shipped_config_passes_its_own_checks():
  for spec in ("configs/pretrain_demo.py", "configs/pretrain_demo.py:adapt,tiny",
               "configs/pretrain_bort.py", "configs/pretrain_bort.py:tiny"):
    config = cli.load_config(spec)
    if not config.teacher.path and config.teacher.kind != "none":
      # pretrain_bort.py leaves the teacher to the command line, and says so.
      with pytest.raises(ValueError, match="config.teacher.path is empty"):
        setup.check_config(config, paths=False)
      config.teacher.path = "/data/roberta-large"
    setup.check_config(config, paths=False)
  demo = cli.load_config("configs/demo.py:quick")
  assert demo.quick and demo.distill.train.total_steps == 200


def test_workdir_checks_create_nothing(tmp_path):
  assert cli.check_workdir(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
  assert not (tmp_path / "a").exists()
  assert cli.check_workdir("gs://bucket/run") == "gs://bucket/run"
  (tmp_path / "f").write_text("x")
  with pytest.raises(cli.UsageError, match="is a file"):
    cli.check_workdir(str(tmp_path / "f"))
  with pytest.raises(cli.UsageError, match="lies under the file"):
    cli.check_workdir(str(tmp_path / "f" / "run"))


def test_failures_that_say_what_to_do_print_one_paragraph(tmp_path, monkeypatch, capsys):
  from bort_jax.pipelines import distill
  from bort_jax.runtime import checkpoint

  def nothing_restorable(config, workdir):
    raise checkpoint.CheckpointRestoreError(
        f"no checkpoint in {workdir} can be restored;\nmove the folder aside to start afresh")

  monkeypatch.setattr(distill, "run", nothing_restorable)
  assert cli_main.main(["distill", f"--workdir={tmp_path}"]) == 1
  err = capsys.readouterr().err
  assert err == (f"bort-jax distill: no checkpoint in {tmp_path} can be restored; move the "
                 "folder aside to start afresh\n")
  with pytest.raises(checkpoint.CheckpointRestoreError):  # --debug: the traceback
    cli_main.main(["distill", "--debug", f"--workdir={tmp_path}"])
