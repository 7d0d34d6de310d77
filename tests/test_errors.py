"""Every bad input of docs/ERRORS.md: exit status 2, one paragraph, no traceback, no writes.

Each row runs ``bort_jax.main.main(argv)`` in this process (the checks come before anything
heavy, so a row takes well under a second) and asserts the status, the message (as the table
in docs/ERRORS.md prints it), that stderr holds no traceback, and that the workdir was not
created (or, when it existed, that nothing in it changed). Two rows also run end to end in a
subprocess, and ``--debug`` is shown to add the traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import pytest

from bort_jax import main as cli_main
from bort_jax.core import arch as arch_lib
from bort_jax.core import model
from bort_jax.interop import export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = os.path.join(REPO, "docs", "ERRORS.md")


def _snapshot(path: str) -> dict | None:
  """{relative path: bytes} of every file under ``path`` (None when it does not exist)."""
  if not os.path.exists(path):
    return None
  if os.path.isfile(path):
    return {"": open(path, "rb").read()}
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      out[os.path.relpath(full, path)] = open(full, "rb").read()
  return out


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
  """A tiny teacher in our export format (for the rows that get past the teacher check)."""
  path = str(tmp_path_factory.mktemp("errors") / "teacher")
  config = arch_lib.get_model_config("D1-A2-H32-I64", family="bert", vocab_size=64,
                                     max_positions=32, pooler=False)
  export.save(path, jax.device_get(model.init(jax.random.key(1), config)), config)
  return path


def _corrupt_journal(workdir: str) -> None:
  os.makedirs(workdir)
  with open(os.path.join(workdir, "journal.jsonl"), "w") as f:
    f.write(json.dumps({"kind": "bort_jax.fptas.journal", "version": 1, "config_hash": "x"})
            + "\n{not json\n" + json.dumps({"candidate": "D1-A2-H16-I32", "theta": {"lr": 1},
                                            "e": 1.0}) + "\n")


def _file(workdir: str) -> None:
  with open(workdir, "w") as f:
    f.write("a file, not a folder\n")


def _file_parent(workdir: str) -> None:
  _file(os.path.dirname(workdir))


def _data_files(workdir: str) -> None:
  """Users' data files with one defect each, in DATA (a folder beside the workdir)."""
  data = os.path.join(os.path.dirname(workdir), "data")
  os.makedirs(data)
  texts = {"train.csv": "sentence,label\ngood,pos\nbad,neg\n",
           "dev.csv": "sentence,label\nfine,pos\nso-so,meh\n",
           "empty.csv": "sentence,label\n",
           "ragged.csv": "sentence,label\ngood,pos\nbad,neg,extra\n",
           "scores.csv": "sentence,score\ngood,0.5\nbad,high\n",
           "mc.jsonl": '{"text": "q", "c": ["a", "b", "c"], "label": 0}\n'
                       '{"text": "r", "c": ["a", "b"], "label": 1}\n'}
  for name, text in texts.items():
    with open(os.path.join(data, name), "w") as f:
      f.write(text)
  with open(os.path.join(data, "latin1.csv"), "wb") as f:
    f.write(b"sentence,label\ngood,pos\ncaf\xe9,neg\n")


FILE_TASK = "--config=configs/finetune.py:task=file:DATA/"

TINY_EXTRACT = ["--config=configs/extract_demo.py:tiny"]

# (row id, argv after the mode, what the workdir is before the run, message fragment). Each
# row is one row of docs/ERRORS.md; "WORKDIR", "TEACHER" and "DATA" are replaced by paths.
ROWS = [
    ("distill", "unknown-field", ["--config.optim.lrr=1e-3"], None,
     "--config.optim.lrr: unknown config field; did you mean config.optim.lr?"),
    ("distill", "unknown-group", ["--config.nosuch.x=1"], None,
     "--config.nosuch.x: unknown config field; config has the fields data,"),
    ("distill", "wrong-type", ["--config.train.log_every=abc"], None,
     "--config.train.log_every=abc: expected an integer"),
    ("distill", "unknown-flag", ["--wrkdir=x"], None, "unrecognized arguments: --wrkdir=x"),
    ("distill", "no-workdir", ["--workdir="], None, "--workdir is required"),
    ("distill", "workdir-is-a-file", [], _file, "is a file; give a folder"),
    ("distill", "workdir-under-a-file", ["--workdir=WORKDIR/sub"], _file_parent,
     "lies under the file"),
    ("distill", "config-not-found", ["--config=configs/nosuch.py"], None,
     "--config: config file 'configs/nosuch.py' not found"),
    ("distill", "bad-config-arg", ["--config=configs/pretrain_demo.py:tinyy"], None,
     "unknown arg 'tinyy'; did you mean tiny?"),
    ("distill", "bad-arch", ["--config.student.arch=D4-X8"], None,
     "config.student.arch: cannot parse architecture 'D4-X8'"),
    ("distill", "zero-steps", ["--config.train.total_steps=0"], None,
     "config.train.total_steps=0: must be an integer >= 1"),
    ("distill", "log-every-0", ["--config.train.log_every=0"], None,
     "config.train.log_every=0: must be an integer >= 1"),
    ("distill", "checkpoint-every-negative", ["--config.train.checkpoint_every=-3"], None,
     "config.train.checkpoint_every=-3: must be an integer >= 1"),
    ("distill", "keep-checkpoints-0", ["--config.train.keep_checkpoints=0"], None,
     "config.train.keep_checkpoints=0: must be an integer >= 1"),
    ("distill", "indivisible-batch", ["--config.data.global_batch_size=6",
                                      "--config.mesh.data=4", "--config.mesh.model=2"], None,
     "global batch size 6 is not divisible by the 4 devices of the mesh's batch axes"),
    ("distill", "mesh-too-large", ["--config.mesh.data=1", "--config.mesh.model=16"], None,
     "mesh {'data': 1, 'fsdp': 1, 'model': 16} needs 16 devices, but 8 are available"),
    ("distill", "bad-optimizer", ["--config.optim.name=sgd"], None,
     "unknown optimizer name 'sgd'"),
    ("distill", "missing-teacher", ["--config.teacher.path=/nonexistent/teacher"], None,
     "config.teacher.path='/nonexistent/teacher': no such folder"),
    ("distill", "no-corpus", ["--config.teacher.path=TEACHER",
                              "--config.data.corpus_files=/nonexistent/*.txt"], None,
     "config.data.corpus_files=('/nonexistent/*.txt',): no file matches"),
    ("distill", "unknown-corpus-tfds", ["--config.teacher.path=TEACHER",
                                        "--config.data.corpus_tfds=no_such_corpus_xyz"], None,
     "config.data.corpus_tfds='no_such_corpus_xyz': no such TFDS dataset here"),
    ("teacher-adapt", "bad-trainable", ["--config.adapt.trainable=encoder"], None,
     "config.adapt.trainable must be one of ('all', 'mlm_head'), got 'encoder'"),
    ("extract", "misspelt-config-arg", ["--config=configs/extract_demo.py:tinyy"], None,
     "unknown arg 'tinyy'; did you mean tiny?"),
    ("extract", "eps-0", TINY_EXTRACT + ["--config.fptas.eps=0"], None,
     "config.fptas.eps must be an int in [1, 16] (the interval size, at most the number of "
     "candidates), got 0"),
    ("extract", "unknown-rule", TINY_EXTRACT + ["--config.fptas.rule=best"], None,
     "unknown interval rule config.fptas.rule='best'; expected one of"),
    ("extract", "empty-space", TINY_EXTRACT + ["--config.space.hidden=(30,)",
                                                "--config.space.heads=(4, 8)"], None,
     "has no candidate once its constraints apply"),
    ("extract", "missing-teacher", TINY_EXTRACT + ["--config.teacher.path=/nonexistent/t"],
     None, "config.teacher.path='/nonexistent/t': no such folder"),
    ("extract", "corrupt-journal", TINY_EXTRACT + ["--config.teacher.path=TEACHER"],
     _corrupt_journal, "line 2 is corrupt"),
    ("extract", "unknown-ties", TINY_EXTRACT + ["--config.fptas.ties=some"], None,
     "unknown tie handling config.fptas.ties='some'; expected one of ('all', 'first')"),
    ("extract", "audit-too-short", TINY_EXTRACT + ["--config.audit.steps=3"], None,
     "config.audit.steps=3: must be an integer larger than config.proxy.steps=3"),
    ("extract", "audit-no-sample", TINY_EXTRACT + ["--config.audit.sample=0"], None,
     "config.audit.sample=0: must be an integer >= 1"),
    ("extract", "inherit-no-teacher", TINY_EXTRACT + ["--config.teacher.kind=none",
                                                      "--config.proxy.init=inherit"], None,
     "config.proxy.init='inherit' needs a teacher to inherit from"),
    ("extract", "unknown-maximum", TINY_EXTRACT + ["--config.teacher.path=TEACHER",
                                                   "--config.fptas.maximum=biggest"], None,
     "config.fptas.maximum='biggest': not a candidate, 'teacher' or an architecture name"),
    ("extract", "inherit-outside-teacher", TINY_EXTRACT + ["--config.teacher.path=TEACHER",
                                                           "--config.proxy.init=inherit"], None,
     "needs the search space inside the teacher D1-A2-H32-I64: its largest depth is 2 > the "
     "teacher's 1"),
    ("demo", "bad-step-field", ["--config.distill.train.log_every=0"], None,
     "config.distill: config.train.log_every=0: must be an integer >= 1"),
    ("demo", "unknown-flag", ["--quik"], None, "unrecognized arguments: --quik"),
    ("demo", "bad-finetune-workers", ["--config.finetune_workers=0"], None,
     "config.finetune_workers=0: must be an integer >= 1"),
    ("demo", "own-task-missing-column", ["--config=configs/demo.py:task=file:DATA/train.csv",
                                         "--config.finetune_tasks.own.files.label=stars"],
     _data_files, "train.csv: no column 'stars' for the label "
     "(config.finetune_tasks.own.files); the file has sentence, label"),
    ("demo", "own-task-steps-without-task", ["--config=configs/demo.py:steps=3"], None,
     "steps= and seq_len= go with task= (your own task)"),
    ("demo", "unknown-agora-task", ["--config.agora_tasks=movie"], None,
     "config.agora_tasks='movie': movie not among the demo's tasks"),
    ("extract", "bad-lrs", ["--config=configs/extract_demo.py:lrs=5e-4/fast"], None,
     "arg lrs='5e-4/fast' must be positive numbers separated by '/'"),
    ("finetune", "misspelt-config-arg", ["--config=configs/finetune.py:tsk=glue/rte"], None,
     "unknown arg 'tsk=glue/rte'; did you mean task?"),
    ("finetune", "config-arg-not-an-integer", ["--config=configs/finetune.py:seeds=three"],
     None, "config finetune.py: arg seeds='three' must be an integer"),
    ("finetune", "config-arg-not-a-number", ["--config=configs/finetune.py:lr=fast"], None,
     "config finetune.py: arg lr='fast' must be a number"),
    ("finetune", "config-arg-negative-lrs", ["--config=configs/finetune.py:seeds=2,lrs=1e-4/-1"],
     None, "arg lrs='1e-4/-1' must be positive numbers separated by '/'"),
    ("finetune", "file-missing-column", [FILE_TASK + "train.csv", "--config.files.text=review"],
     _data_files, "train.csv: no column 'review' for the text (config.files); the file has "
     "sentence, label"),
    ("finetune", "file-empty", [FILE_TASK + "empty.csv"], _data_files,
     "empty.csv: the file holds no rows"),
    ("finetune", "file-unseen-label", [FILE_TASK + "train.csv",
                                       "--config.files.validation=DATA/dev.csv"], _data_files,
     "dev.csv line 3: the label 'meh' never occurs in the training file (its labels: neg, pos)"),
    ("finetune", "file-not-utf8", [FILE_TASK + "latin1.csv"], _data_files,
     "latin1.csv line 3: byte 27 is not UTF-8 (save the file as UTF-8)"),
    ("finetune", "file-ragged-row", [FILE_TASK + "ragged.csv"], _data_files,
     "ragged.csv line 3: 3 fields, the header has 2 (sentence, label)"),
    ("finetune", "file-regression-label", [FILE_TASK + "scores.csv", "--config.files.label=score",
                                           "--config.files.kind=regression"], _data_files,
     "scores.csv line 3: the label 'high' is not a number (a regression task)"),
    ("finetune", "file-choices-count", [FILE_TASK + "mc.jsonl", "--config.files.choices=c"],
     _data_files, "mc.jsonl line 2: 2 choices, the training file's rows have 3"),
    ("finetune", "tfds-unknown-dataset", ["--config=configs/finetune.py:task=tfds:no_such_set"],
     None, "tfds:no_such_set: no such TFDS dataset here"),
    ("cost", "bad-arch", ["--arch", "D4-X8"], None, "bad --arch 'D4-X8'"),
    ("cost", "bad-seq-len", ["--seq-len", "0"], None, "--seq-len=0"),
    ("cost", "unknown-runtime", ["--measure", "--runtime", "tvm"], None,
     "--runtime='tvm' is not a runtime; allowed: jax, onnxruntime, onnxruntime-int8"),
    ("cost", "runtime-without-measure", ["--runtime", "onnxruntime"], None,
     "--runtime=onnxruntime times the forward pass: add --measure"),
    ("distill", "target-without-dry-run", ["--target=v5e-8"], None,
     "--target is a planning flag: it goes with --dry-run"),
    ("distill", "dry-run-without-target", ["--dry-run"], None,
     "--dry-run needs --target, one of v5e-4, v5e-8, v5e-64, v4-32, v5p-128, a100-80g-x8, "
     "h100-x8, cpu"),
    ("distill", "unknown-target", ["--dry-run", "--target=v9-1"], None,
     "argument --target: invalid choice: 'v9-1'"),
    ("distill", "bad-mfu", ["--config=configs/pretrain_bort.py:tiny", "--dry-run",
                            "--target=cpu", "--shapes", "teacher=D1-A2-H32-I64", "--mfu=2"],
     None, "--mfu=2.0: must be in (0, 1]"),
    ("distill", "bad-shapes", ["--dry-run", "--target=cpu", "--shapes", "teacher"], None,
     "--shapes='teacher': each entry is NAME=PRESET_OR_ARCH with NAME one of teacher, student, "
     "init"),
    ("distill", "bad-prices", ["--dry-run", "--target=cpu", "--prices", "cheap"], None,
     "--prices='cheap': not a JSON object or a file holding one"),
    ("finetune", "dry-run-no-shape", ["--config=configs/finetune.py:task=glue/rte",
                                      "--dry-run", "--target=cpu"], None,
     "config.init.path is empty: a dry run reads the model's shape from its config file (or "
     "give it with --shapes init=PRESET_OR_ARCH)"),
    ("export", "not-a-model", ["--checkpoint", "/nonexistent/ckpt", "--out", "WORKDIR"], None,
     "--checkpoint '/nonexistent/ckpt' is not a directory"),
    ("export", "bad-format", ["--checkpoint", "TEACHER", "--out", "WORKDIR", "--format",
                              "tflite"], None, "--format='tflite': allowed: onnx"),
    ("export", "bad-quantize", ["--checkpoint", "TEACHER", "--out", "WORKDIR", "--quantize",
                                "int4"], None, "--quantize='int4': allowed: int8"),
    ("export", "task-without-head", ["--checkpoint", "TEACHER", "--out", "WORKDIR", "--task",
                                     "glue/rte"], None,
     "has no task head (a mlm model); leave --task out."),
    ("predict", "unknown-runtime", ["--checkpoint", "TEACHER", "--runtime", "tensorrt",
                                    "--text", "x"], None,
     "argument --runtime: invalid choice: 'tensorrt'"),
    ("predict", "not-an-onnx-export", ["--checkpoint", "TEACHER", "--runtime", "onnxruntime",
                                       "--text", "x"], None,
     "is not an ONNX export of bort-jax (no serve.json)"),
    ("convert", "missing-input", ["--from-hf", "/nonexistent/hf", "--out", "WORKDIR"], None,
     "'/nonexistent/hf' is not a directory"),
    ("convert", "no-source", ["--out", "WORKDIR"], None,
     "one of the arguments --from-hf --to-hf is required"),
    ("convert", "bad-tokenizer", ["--to-hf", "TEACHER", "--out", "WORKDIR", "--tokenizer",
                                  "/nonexistent/tok"], None,
     "--tokenizer '/nonexistent/tok' is not a directory with tokenizer files"),
    ("convert", "missing-speed", ["--to-hf", "TEACHER", "--out", "WORKDIR", "--speed",
                                  "/nonexistent/speed.json"], None,
     "--speed '/nonexistent/speed.json' is not a file"),
    ("convert", "card-flag-with-from-hf", ["--from-hf", "TEACHER", "--out", "WORKDIR",
                                           "--results", "r.json"], None,
     "--results is a flag of --to-hf"),
    ("data", "unknown-item", ["fetch", "--items", "nope", "--cache-dir", "WORKDIR"], None,
     "--items=nope: unknown item(s) nope; allowed: teacher, corpus, movie_sentiment, word_sense, "
     "bbc_news"),
    ("data", "from-not-a-folder", ["fetch", "--from", "/nonexistent/archives", "--cache-dir",
                                   "WORKDIR"], None,
     "--from /nonexistent/archives: not a folder"),
    ("data", "no-action", [], None, "the following arguments are required: action"),
]


def _argv(mode: str, args: list[str], workdir: str, teacher: str) -> list[str]:
  data = os.path.join(os.path.dirname(workdir), "data")
  argv = [mode] + [a.replace("WORKDIR", workdir).replace("TEACHER", teacher).replace("DATA", data)
                   for a in args]
  has_workdir = any(a.startswith("--workdir") or a == "WORKDIR" for a in args)
  if mode in ("distill", "teacher-adapt", "extract", "demo", "finetune") and not has_workdir:
    argv.append(f"--workdir={workdir}")
  return argv


@pytest.mark.parametrize("mode, name, args, before, message", ROWS,
                         ids=[f"{r[0]}-{r[1]}" for r in ROWS])
def test_bad_input_exits_2_with_one_paragraph(tmp_path, capsys, teacher, mode, name, args,
                                              before, message):
  workdir = str(tmp_path / "run")
  if callable(before):
    before(workdir if before is not _file_parent else os.path.join(workdir, "sub"))
  state = _snapshot(workdir)
  status = cli_main.main(_argv(mode, args, workdir, teacher))
  out, err = capsys.readouterr()
  assert status == 2, (out, err)
  assert message in err, err
  assert "Traceback" not in err and "Traceback" not in out
  assert err.startswith(f"bort-jax {mode}: ") and err.count("\n") == 1, err  # one paragraph
  assert _snapshot(workdir) == state  # nothing created, nothing changed


def test_every_row_is_in_the_docs_table():
  with open(DOC, encoding="utf-8") as f:
    doc = f.read()
  missing = [(mode, name) for mode, name, _, _, message in ROWS
             if f"| `{mode}` | {name} |" not in doc or message not in doc]
  assert not missing, missing


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write into any folder")
def test_unwritable_workdir(tmp_path, capsys):
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    assert cli_main.main(["distill", f"--workdir={locked / 'run'}"]) == 2
    assert "is not writable by this user" in capsys.readouterr().err
    assert not (locked / "run").exists()
  finally:
    locked.chmod(0o700)


def _subprocess(args: list[str]) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  return subprocess.run([sys.executable, "-m", "bort_jax.main"] + args, cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


def test_end_to_end_status_and_debug(tmp_path):
  workdir = str(tmp_path / "run")
  plain = _subprocess(["distill", "--config.optim.lrr=1e-3", f"--workdir={workdir}"])
  assert plain.returncode == 2
  assert plain.stderr.strip() == ("bort-jax distill: --config.optim.lrr: unknown config field; "
                                  "did you mean config.optim.lr? (--help lists every field "
                                  "with its default)")
  debug = _subprocess(["extract", "--debug", "--config=configs/extract_demo.py:tinyy",
                       f"--workdir={workdir}"])
  assert debug.returncode == 2
  assert "Traceback" in debug.stderr and "unknown arg 'tinyy'" in debug.stderr
  assert not os.path.exists(workdir)


def test_predict_end_to_end_names_the_flag(tmp_path):
  """A real ``bort-jax predict`` with a missing checkpoint: one line naming --checkpoint (not
  the finetune config field it is read into), nothing else on stderr, no output file."""
  out = tmp_path / "predictions.jsonl"
  done = _subprocess(["predict", "--checkpoint", str(tmp_path / "nope"), "--text", "a film",
                      "--output", str(out)])
  assert done.returncode == 2 and done.stdout == ""
  assert done.stderr == (f"bort-jax predict: --checkpoint '{tmp_path / 'nope'}' is not a "
                         "directory (a checkpoint directory: our export, a `bort-jax finetune` "
                         "WORKDIR/best, or a Hugging Face one).\n"), done.stderr
  assert not out.exists()
