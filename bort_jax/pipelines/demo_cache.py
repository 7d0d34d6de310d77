"""The demo's caches: the adapted teacher, the extraction and the distilled student.

A demo in another workdir with the same source teacher and configs copies them instead of
training again. Each is keyed by a hash of what determines it, with the workdir's and the
cache's own paths left out, so a moved cache or a new workdir still matches:

* ``CACHE/adapted/<hash>``: teacher-adapt's export, ``config.json`` and ``metrics.jsonl``
  (keyed by the adapt config and the bytes of the source teacher's files);
* ``CACHE/extracted/<hash>``: the extraction's folder (keyed by the extraction config and the
  adapted teacher's parameters and model config);
* ``CACHE/distilled/<hash>``: distillation's export, ``config.json`` and ``metrics.jsonl``
  (keyed by the distillation config, the adapted teacher, the architecture the extraction
  chose and the bytes of the corpus files).

The fine-tunings of both models are kept in ``CACHE/finetuned`` by ``pipelines/demo.py`` (keyed
by the model's parameters and the job's config). Every entry is written and copied with
``fileio.atomic_dir``: a reader sees no folder or a complete one. A preempted training caches
nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Callable

import ml_collections

from bort_jax.interop import export
from bort_jax.runtime import fileio, rundir
from bort_jax.runtime.fileio import to_jsonable


# What a cached teacher-adapt keeps besides its export (the report and the model card read them).
RUN_RECORD = ("config.json", "metrics.jsonl")


# Fields added after caches were keyed, at the value that leaves a run as it was: left out of
# the keys, so that caches and workdirs made before them stay valid.
_NEUTRAL = {"data": {"stream_window": 0}}


def config_text(cfg: ml_collections.ConfigDict, cache_dir: str, workdir: str = "") -> str:
  """A config as sorted JSON with the workdir's and the cache's own paths left out, so a
  moved or copied workdir (or cache) keys the same (the text the hashes below are of), and
  the fields of ``_NEUTRAL`` left out at their neutral values."""
  keyed = cfg.to_dict()
  for block, fields in _NEUTRAL.items():
    for name, value in fields.items():
      if isinstance(keyed.get(block), dict) and keyed[block].get(name, value) == value:
        keyed[block].pop(name, None)
  text = json.dumps(to_jsonable(keyed), sort_keys=True)
  if workdir:
    text = text.replace(workdir, "<workdir>")
  return text.replace(cache_dir, "<cache>")


def adapted_cache(cache_dir: str, adapt_cfg: ml_collections.ConfigDict) -> str:
  """``CACHE/adapted/<hash>``: where the adapted teacher of this source and config is kept.

  The hash covers the adapt config (with the cache's own path left out, so a moved cache still
  matches) and the bytes of every file of the source teacher (``CACHE/teacher``): a later demo
  in another workdir with the same teacher and adapt config copies the export instead of
  training it again.
  """
  digest = rundir.Digest(config_text(adapt_cfg, cache_dir))
  source = os.path.join(cache_dir, "teacher")
  for name in sorted(os.listdir(source)) if os.path.isdir(source) else []:
    if os.path.isfile(os.path.join(source, name)):
      digest.file(os.path.join(source, name))
  return os.path.join(cache_dir, "adapted", digest.hex(12))


def run_adapt_cached(adapt_cfg: ml_collections.ConfigDict, workdir: str, cache_dir: str
                     ) -> dict:
  """teacher-adapt into ``WORKDIR/teacher``, or a copy of the cached run of the same job.

  Returns the adaptation's metrics (``preempted`` when a SIGTERM stopped it: nothing is then
  cached) or ``{"copied": cache folder}``.

  A finished adaptation's run folder (its export, ``config.json`` and ``metrics.jsonl``; not
  the checkpoints) is copied into the cache, and a cached one into the workdir, each
  atomically: the export has the same bytes, so the teacher's cached fine-tunings (keyed by
  the export's digest) are found again, and the report and ``convert --to-hf`` find the run's
  record as after a real adaptation.
  """
  from bort_jax.pipelines import distill  # pylint: disable=import-outside-toplevel
  return _run_cached(adapted_cache(cache_dir, adapt_cfg), os.path.join(workdir, "teacher"),
                     lambda run_dir: distill.run_adapt(adapt_cfg, run_dir),
                     "teacher-adapt: the adapted teacher")


def _run_cached(cached: str, run_dir: str, train: Callable[[str], dict], what: str) -> dict:
  """A training run's export and record copied from ``cached``, or trained and then cached.

  The export is copied last (atomically): it marks the run done. A preempted run (SIGTERM,
  no export) caches nothing and returns its metrics, so the stage resumes on a rerun.
  """
  if rundir.has_export(cached):
    print(f"{what} is in the cache ({cached}); copying it", flush=True)
    os.makedirs(run_dir, exist_ok=True)
    for name in RUN_RECORD:
      if os.path.exists(os.path.join(cached, name)):
        shutil.copyfile(os.path.join(cached, name), os.path.join(run_dir, name))
    with fileio.atomic_dir(rundir.export_dir(run_dir)) as tmp:  # last: it marks done
      shutil.copytree(rundir.export_dir(cached), tmp, dirs_exist_ok=True)
    return {"copied": cached}
  metrics = train(run_dir)
  if metrics.get("preempted"):
    return metrics
  with fileio.atomic_dir(cached) as tmp:
    shutil.copytree(rundir.export_dir(run_dir), rundir.export_dir(tmp))
    for name in RUN_RECORD:
      if os.path.exists(os.path.join(run_dir, name)):
        shutil.copyfile(os.path.join(run_dir, name), os.path.join(tmp, name))
  return metrics


def distilled_cache(cache_dir: str, distill_cfg: ml_collections.ConfigDict, workdir: str
                    ) -> str:
  """``CACHE/distilled/<hash>``: where the distilled student of this job is kept.

  The hash covers the distillation config (the workdir's and the cache's paths left out), the
  teacher export's parameters and model config, the architecture the extraction chose
  (``chosen_arch.txt``, which ``student.arch = extract:DIR`` reads) and the bytes of every
  corpus file: distillation is a deterministic function of these (every random choice is one
  of seed and step), so a demo in another workdir with the same inputs copies the student.
  """
  from bort_jax.data import corpus_sources  # pylint: disable=import-outside-toplevel
  from bort_jax.pipelines import setup  # pylint: disable=import-outside-toplevel
  digest = _with_export(rundir.Digest(config_text(distill_cfg, cache_dir, workdir)),
                        distill_cfg.teacher.path)
  digest.text(setup.resolve_student_arch(str(distill_cfg.student.arch)))
  for path in corpus_sources.expand(distill_cfg.data.corpus_files):
    digest.file(path)
  return os.path.join(cache_dir, "distilled", digest.hex(12))


def run_distill_cached(distill_cfg: ml_collections.ConfigDict, workdir: str, cache_dir: str
                       ) -> dict:
  """Distillation into ``WORKDIR/distill``, or a copy of the cached run of the same job
  (its export, ``config.json`` and ``metrics.jsonl``, which the report reads)."""
  from bort_jax.pipelines import distill  # pylint: disable=import-outside-toplevel
  return _run_cached(distilled_cache(cache_dir, distill_cfg, workdir),
                     os.path.join(workdir, "distill"),
                     lambda run_dir: distill.run(distill_cfg, run_dir),
                     "distill: the distilled student")


def _with_export(digest: rundir.Digest, path: str) -> rundir.Digest:
  """Adds an export's parameters (SHA-256 of the file) and model config to a digest."""
  digest.text(fileio.sha256_file(os.path.join(path, export.PARAMS_FILE)))
  return digest.json(export.load_config(path).to_dict())


def extracted_cache(cache_dir: str, extract_cfg: ml_collections.ConfigDict, workdir: str) -> str:
  """``CACHE/extracted/<hash>``: where a finished extraction of this teacher and config is kept.

  The hash covers the extraction config (the workdir's and the cache's paths left out) and the
  teacher export's parameters and model config: the search and its audit are deterministic
  functions of these, so a demo in another workdir with the same teacher copies the result.
  """
  digest = _with_export(rundir.Digest(config_text(extract_cfg, cache_dir, workdir)),
                        extract_cfg.teacher.path)
  return os.path.join(cache_dir, "extracted", digest.hex(12))


def run_extract_cached(extract_cfg: ml_collections.ConfigDict, workdir: str,
                       cache_dir: str) -> None:
  """The extraction into ``WORKDIR/extract``, or a copy of the cached one of the same job.

  A finished extraction's folder (tables, plots, ledger, journals, chosen_arch.txt) is copied
  into the cache, and a cached one into the workdir, each atomically (``results.json``, which
  marks the stage done, appears with the rest).
  """
  from bort_jax.pipelines import extract  # pylint: disable=import-outside-toplevel
  cached = extracted_cache(cache_dir, extract_cfg, workdir)
  out = os.path.join(workdir, "extract")
  if os.path.exists(os.path.join(cached, rundir.RESULTS)):
    print(f"extract: this teacher's extraction with this config is in the cache ({cached}); "
          "copying it", flush=True)
    with fileio.atomic_dir(out) as tmp:
      shutil.copytree(cached, tmp, dirs_exist_ok=True)
    return
  extract.run(extract_cfg, out)
  with fileio.atomic_dir(cached) as tmp:
    shutil.copytree(out, tmp, dirs_exist_ok=True)


@dataclasses.dataclass(frozen=True)
class Job:
  """One fine-tuning job of the demo: ``model`` ("student" or "teacher") on demo ``task``
  (its short name), with its ``config`` and the ``folder`` it runs in
  (:func:`finetuned_cache`). ``kind`` "agora" is Agora on the student's finished job
  (``pipelines/demo_agora.py``), in the folder beside it."""

  model: str
  task: str
  config: ml_collections.ConfigDict
  folder: str
  kind: str = "finetune"

  @property
  def label(self) -> str:
    """What the job is, for progress lines: "teacher on demo/x", "Agora, student on demo/x"."""
    what = f"{self.model} on {self.config.task}"
    return f"Agora, {what}" if self.kind == "agora" else what

  def done(self) -> bool:
    """Whether it finished (its ``population.json``; Agora's journal summary or the refusal
    it recorded; the folder fixes the job)."""
    if self.kind == "agora":
      from bort_jax.pipelines import demo_agora  # pylint: disable=import-outside-toplevel
      return demo_agora.finished(self.folder)
    return fileio.read_json(os.path.join(self.folder, rundir.POPULATION)) is not None


def task_digest(cfg: ml_collections.ConfigDict) -> str:
  """What a fine-tuning job's data was made from: a suite task's source files, a file task's
  files (``config.files``), a TFDS dataset's prepared folder (``tfds:`` and registered
  tasks, under ``config.data_dir``)."""
  # pylint: disable-next=import-outside-toplevel
  from bort_jax.data import demo as demo_data, files, tfds_tasks
  from bort_jax.finetune import tasks as tasks_lib  # pylint: disable=import-outside-toplevel
  name = str(cfg.task)
  if name.startswith("demo/"):
    return demo_data.source_digest(name, os.path.dirname(cfg.data_dir))
  if name.startswith(files.PREFIX):
    return files.source_digest(files.FileTask.from_config(name[len(files.PREFIX):],
                                                          cfg.files.to_dict()))
  builder = (name[len(tfds_tasks.PREFIX):] if name.startswith(tfds_tasks.PREFIX)
             else tasks_lib.get_task(name).builder)
  return tfds_tasks.source_digest(builder, cfg.data_dir)


def _folder_name(task: str) -> str:
  """A task name as a folder name: ``demo_movie_sentiment``; a file task by its file
  (``file_train.csv``), a TFDS task by its name."""
  if task.startswith("file:"):
    task = "file_" + os.path.basename(task[len("file:"):].rstrip("/"))
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", task).strip("_")[:60] or "task"


def finetuned_cache(cache_dir: str, init_export: str, cfg: ml_collections.ConfigDict) -> str:
  """``CACHE/finetuned/<task>-<hash>``: where a fine-tuning job of the demo runs and is kept.

  The hash covers the job's config (its data and tokenizer paths left out; the task's data
  digest, :func:`task_digest`, in their place) and the export it starts from (its parameters
  and model config), so a later demo with the same model finds its runs again, a run with
  another length or seed count (``--quick`` and a full run) gets its own folder, and a task
  whose data changed is fine-tuned again.
  """
  keyed = cfg.to_dict()
  keyed.pop("data_dir", None)
  keyed["data"] = task_digest(cfg)
  keyed.pop("tokenizer", None)
  keyed["init"] = {"kind": cfg.init.kind,
                   "params": fileio.sha256_file(os.path.join(init_export, export.PARAMS_FILE)),
                   "config": export.load_config(init_export).to_dict()}
  digest = rundir.Digest().json(keyed).hex(12)
  return os.path.join(cache_dir, "finetuned", f"{_folder_name(str(cfg.task))}-{digest}")
