"""The whole demo (``bort-jax demo``): fetch, teacher-adapt, extract, distil, fine-tune, Agora,
report.

    bort-jax demo --workdir=runs/demo [--cache-dir=DIR] [--quick]

Holds the step configs: ``adapt``, ``extract`` and ``distill`` as they come from
``pretrain_demo.py:adapt``, ``extract_demo.py`` and ``pretrain_demo.py``; ``finetune`` (the
student's) and ``finetune_teacher`` from ``finetune.py`` (a population of seeds per task);
``report`` from ``report.py``. The pipeline points their data at the cache and their models at
the workdir's, so any of their fields can be overridden here
(``--config.distill.train.total_steps=400``, ``--config.finetune.population.seeds=5``).
Each task's fine-tuning length and sequence length are ``finetune_tasks.<name>.steps`` /
``.seq_len``; ``.student_steps`` (0: ``steps``) gives the student its own length where its
learning curve levels off later than the teacher's; a non-zero ``finetune.train.total_steps``
(or ``finetune_teacher``'s) overrides the steps of every task for that model.

Your own task in place of the suite: ``task=file:PATH`` (a CSV, TSV or JSON Lines training
file) or ``task=tfds:NAME[/CONFIG]``, with ``steps=N`` and ``seq_len=N`` (defaults 400 and
128); it is ``finetune_tasks.own``, so its file settings are ``--config.finetune_tasks.own.files.
validation=dev.csv`` and so on (the fields of ``finetune.py``'s ``config.files`` /
``config.tfds``). A config of your own can list several with :func:`own_task`. The pretraining
stages still use the demo's teacher and corpus; every stage after them (fine-tuning, Agora,
the report, the products) takes your tasks as it takes the suite's.

Args: ``quick`` (the same as ``--quick``: every stage shortened, a smoke run of the same
path); ``tiny`` (every stage's tiny config on the synthetic suite of ``data/tiny_suite.py``,
written in place of the fetch: a few minutes on a CPU, no network; the notebook's test mode;
tests with their own tiny assets set ``config.fetch=False``); ``task``, ``steps``,
``seq_len`` (your own task, above).
"""

import ml_collections

from configs import common
from configs import extract_demo
from configs import finetune
from configs import pretrain_demo
from configs import report

# The demo's tasks: fine-tuning steps of batch 8, tokens per example (finetune.DEMO_SEQ_LEN,
# sized to each task's text) and, where 500 records give too wide a standard error for the
# task's margin, more dev records. Steps from the learning curves
# (benchmarks/results/learning_curve_{teacher,student}.json; docs/RESULTS.md has the tables):
# the teacher's (lr 3e-5) set ``steps``; on word_sense the student (lr 1e-4) is still at the
# majority class after the teacher's 200 steps (51.8) and levels off later (55.9 at 400, 58.8
# at 800, 60.1 at 1,600: twice 800 gains 1.3 points, about one standard error), so it gets
# ``student_steps`` = 800.
TASKS = {"movie_sentiment": {"steps": 800},
         "word_sense": {"steps": 200, "student_steps": 800, "max_dev_examples": 2000},
         "bbc_news": {"steps": 200}}


OWN_TASK = "own"  # finetune_tasks' key of the task given as ``task=``


def own_task(task: str, steps: int = 400, seq_len: int = 128, student_steps: int = 0,
             max_dev_examples: int = 0, data_dir: str = "") -> ml_collections.ConfigDict:
  """A ``finetune_tasks`` entry for a task that is not in the demo suite.

  Args:
    task: ``file:PATH``, ``tfds:NAME[/CONFIG]`` or a registered task name (``glue/sst2``).
    steps: fine-tuning steps (the teacher's; the student's too unless ``student_steps``).
    seq_len: tokens per example.
    student_steps: the student's own length (0: ``steps``).
    max_dev_examples: dev records scored (0: all).
    data_dir: the TFDS data folder of a ``tfds:`` or registered task ("" = the demo cache's).

  Returns:
    The entry, with ``files`` and ``tfds`` blocks holding ``finetune.py``'s defaults (how a
    file or a TFDS dataset is read; used for a task of that kind).
  """
  defaults = finetune.get_config("task=glue/sst2")
  return ml_collections.ConfigDict({
      "task": task, "steps": steps, "student_steps": student_steps, "seq_len": seq_len,
      "max_dev_examples": max_dev_examples, "data_dir": data_dir,
      "files": defaults.files.to_dict(), "tfds": defaults.tfds.to_dict()})


def _finetune_block(tiny: bool, seeds: int) -> ml_collections.ConfigDict:
  """One model's fine-tuning: a population of seeds, dev scores on records spread evenly."""
  config = finetune.get_config(f"task=demo/movie_sentiment,seeds={seeds}"
                               + (",tiny" if tiny else ""))
  config.train.total_steps = 0         # 0: finetune_tasks.<task>.steps
  config.train.eval_every = 0          # one dev score, at the end (the scores reported); a
                                       # killed job restarts (the stage resumes job by job).
                                       # 100 gave a checkpoint per 100 steps and cost a dev
                                       # pass each: about 50 s of a fresh demo's 20 minutes
  config.max_dev_examples = 500        # dev score on 500 records spread over the split (0 = all)
  config.predict_test = False
  return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"quick": common.FLAG, "tiny": common.FLAG,
                                "task": common.VALUE, "steps": common.INT,
                                "seq_len": common.INT}, "demo.py")
  if ("steps" in args or "seq_len" in args) and "task" not in args:
    raise ValueError("config demo.py: steps= and seq_len= go with task= (your own task); the "
                     "suite's tasks take --config.finetune_tasks.<name>.steps=N")
  tiny = bool(args.get("tiny"))
  config = ml_collections.ConfigDict()
  config.cache_dir = ""                # "" = $BORT_JAX_CACHE or ~/.cache/bort_jax
  config.quick = bool(args.get("quick"))  # shorten every stage (a smoke run)
  config.fetch = True                  # False: use the cache as it is (an offline copy, tests)
  config.tiny = tiny                   # fetch = write the synthetic suite of data/tiny_suite.py
                                       # (in cache_dir; "" = WORKDIR/tiny_suite)
  config.adapt = pretrain_demo.get_config("adapt,tiny" if tiny else "adapt")
  config.extract = extract_demo.get_config("tiny" if tiny else None)
  config.distill = pretrain_demo.get_config("tiny" if tiny else None)
  config.finetune = _finetune_block(tiny, seeds=3)          # the student's
  config.finetune.population.save_best = True  # its best seed per task: the model a user runs
                                               # (`bort-jax predict`, the report's HF export)
  # The teacher's (22 M parameters): one seed. Two seeds took 12 of a fresh demo's 31 minutes
  # (2026-11-30, 2-core CPU); its seed spread on demo/movie_sentiment was 0.4 points against a
  # dev standard error of 1.9, so the report's SE column is the teacher's uncertainty. Its
  # fine-tunings are cached, so a later demo with the same teacher skips them.
  config.finetune_teacher = _finetune_block(tiny, seeds=1)
  # Measured on demo/movie_sentiment (200 steps): the teacher reaches 0.81 dev accuracy at 3e-5,
  # 0.66 at 1e-4 and collapses to one class at 3e-4; the inherited student is best at 1e-4
  # (0.73; 0.71 at 3e-5, one class at 3e-4), the demo default it keeps.
  config.finetune_teacher.optim.lr = 3e-5
  config.finetune_teacher.population.save_best = True  # WORKDIR/best: Agora's labeller
  # Fine-tuning jobs at once, each in a process of its own pinned to a core (1: in turn, in
  # the demo's process). On a 2-core CPU two one-core processes train ~1.2x more steps per
  # second than one process on both cores (pipelines/demo_workers.py).
  config.finetune_workers = 1 if tiny else 2
  # The teacher's fine-tuning needs only teacher-adapt: with two workers or more and a core for
  # each, its jobs start then, in a worker on one core, while extraction and distillation run
  # pinned to the others (pipelines/demo_workers.py:split_cores; False: they wait for the
  # stage). 25:01 for a fresh demo against 27:10 without (docs/RESULTS.md). The pin changes
  # the distilled student's last bits, so it holds whenever this is on.
  config.finetune_teacher_early = True
  # Agora on the student (stage 6): "auto" = the binary classification tasks whose fine-tuned
  # teacher beats config.finetune.agora.min_labeller_accuracy (2/3) on dev, with that teacher
  # as the labeller; or a comma-separated list of task names; "" = none.
  config.agora_tasks = "auto"
  config.finetune_tasks = ml_collections.ConfigDict(
      {name: {"task": "",               # "" = demo/<name>
              "steps": 4 if tiny else task["steps"],
              "student_steps": 0 if tiny else task.get("student_steps", 0),
              "seq_len": 32 if tiny else finetune.DEMO_SEQ_LEN[f"demo/{name}"],
              "max_dev_examples": 0 if tiny else task.get("max_dev_examples", 0)}
       for name, task in TASKS.items()})
  if "task" in args:  # your own task in place of the suite
    config.finetune_tasks = ml_collections.ConfigDict({OWN_TASK: own_task(
        args["task"], steps=args.get("steps", 4 if tiny else 400),
        seq_len=args.get("seq_len", 32 if tiny else 128))})
  if tiny:  # one compiled proxy bucket: the extraction's code path, not a search worth reading
    config.extract.space.hidden = (32,)
    config.extract.space.heads = (2,)
    for block in (config.finetune, config.finetune_teacher):
      block.train.eval_every = 2
      block.population.seeds = 2
      block.max_dev_examples = 16
    # Random-level tiny models: no labeller beats 2/3, so the smoke run lowers the bar to take
    # the Agora stage's rounds through (not a result).
    config.finetune.agora.min_labeller_accuracy = 0.0
  config.report = report.get_config("tiny" if tiny else None)
  return config
