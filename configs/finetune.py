"""Fine-tuning on one task: the paper's recipe and grid (docs/BORT.md section 5), and demo defaults.

    bort-jax data fetch
    bort-jax finetune --config=configs/finetune.py:task=demo/movie_sentiment \\
        --workdir=runs/demo/ft/movie
    bort-jax finetune --config=configs/finetune.py:task=glue/rte,init=runs/bort/export \\
        --workdir=runs/rte --config.data_dir=~/tensorflow_datasets --config.download=True
    bort-jax finetune --config=configs/finetune.py:task=demo/word_sense,seeds=3,lrs=1e-4/3e-4 \\
        --workdir=runs/demo/ft/word_sense_population
    bort-jax finetune --config=configs/finetune.py:task=demo/movie_sentiment,agora,seeds=3 \\
        --workdir=runs/demo/ft/movie_agora

Args (comma-separated ``key=value`` or flags):

* ``task=NAME``: a registered task (``glue/rte``, ``super_glue/copa``, ``race/high``,
  ``demo/word_sense``, ...); ``demo/*`` tasks get the demo defaults below; ``file:PATH``
  is your own CSV, TSV or JSON Lines training file, read as ``config.files`` says;
  ``tfds:NAME[/CONFIG]`` any TFDS text dataset, read as ``config.tfds`` says;
* ``init=PATH``: the checkpoint to start from (our export, a fine-tuned ``WORKDIR/best``, or a
  Hugging Face directory); ``random`` as ``init_kind=random`` keeps only its shape;
* ``init_kind=auto|params|finetuned|hf|random``;
* ``tokenizer=DIR``: the tokenizer files (default: next to the checkpoint);
* ``seed=N``, ``lr=X``, ``wd=X``, ``warmup=X``, ``batch=N``, ``steps=N``, ``epochs=N``;
* ``seeds=N``: seeds 0..N-1 as one population (``finetune/population.py``), with
  ``lrs=A/B/C`` (``/``-separated) for several learning rates; per setting the dev metric's
  mean, standard deviation and best land in ``WORKDIR/population.json``;
* ``agora``: Agora (``finetune/agora.py``) with ``config.population``'s grid as Theta and
  ``config.agora`` for the labeller and the transformation;
* ``tiny``: a few steps at sequence length 32 (smoke tests).

The paper's recipe: lr 5e-5, weight decay 110 (as printed; "sic" in the paper: with a decay
that is scaled by the learning rate, as here and in AdamW, it shrinks every weight by 0.55 %
per step, so demo runs use 0.01), warmup 0.45 of the run, batch 8, the RoBERTa-style head.
Its grid is ``config.grid``: lr {1e-4, 1e-5, 9e-6}, weight decay {0, 10, 100, 350}, warmup
0.35-0.50, batch {8, 16}, seeds 0-4. Population runs and Agora train ``config.population``'s
grid (copy values from ``config.grid`` into it; batch size is shared by a population).

GLUE, SuperGLUE and RACE are read through TFDS from ``config.data_dir``; they download only
where the internet is reachable (``config.download=True``). The demo tasks come from the
offline demo suite (``bort-jax data fetch``).
"""

import os

import ml_collections

from configs import common

# Every arg takes a value (task=glue/rte) except tiny and agora; parse_arg checks its kind.
ARGS = {**{key: common.VALUE for key in ("task", "init", "init_kind", "tokenizer")},
        **{key: common.INT for key in ("seed", "batch", "steps", "epochs", "seeds")},
        **{key: common.FLOAT for key in ("lr", "wd", "warmup")},
        "lrs": common.POSITIVE_FLOATS, "tiny": common.FLAG, "agora": common.FLAG}

# Tokens per example of the demo tasks, sized to their text with the teacher's WordPiece
# tokenizer (docs/DATA.md): 64 holds 99.9% of movie snippets whole, 48 99% of word_sense's
# example + gloss pairs; a BBC article runs 414 tokens at the median, so 128 keeps its headline
# and first paragraph, which name the topic.
DEMO_SEQ_LEN = {"demo/movie_sentiment": 64, "demo/word_sense": 48, "demo/bbc_news": 128}


def get_config(arg=None):
  args = common.parse_arg(arg, ARGS, "finetune.py")
  cache = common.cache_dir()
  task = str(args.get("task", "glue/rte"))
  demo = task.startswith("demo/")
  config = ml_collections.ConfigDict()
  config.task = task
  config.seed = 0                      # head init, dropout and data order derive from it
  config.data_dir = ""                 # TFDS data directory ("" = TFDS's default)
  config.download = False              # let TFDS download GLUE / SuperGLUE / RACE
  config.init_from = ""                # an orbax checkpoint dir whose params replace the init

  # Your own data (``task=file:TRAIN_FILE``, bort_jax/data/files.py): CSV, TSV or JSON Lines.
  config.files = ml_collections.ConfigDict()
  config.files.validation = ""         # "" = hold out config.files.held_out of the train rows
  config.files.test = ""               # a file to predict (labels optional)
  config.files.kind = "auto"           # auto | classification | regression | multiple_choice
  config.files.text = ""               # "" = text, sentence, sentence1 or question
  config.files.text_pair = ""          # "" = text_pair, sentence2 or hypothesis if present;
                                       # "-" = none
  config.files.label = "label"
  config.files.choices = ""            # multiple choice: columns a/b/c, or one list field
  config.files.held_out = 0.1          # share of train rows for validation (by a text hash)

  # Any TFDS text dataset by name (``task=tfds:NAME[/CONFIG]``, bort_jax/data/tfds_tasks.py),
  # read from config.data_dir; "" = inferred from the dataset's features.
  config.tfds = ml_collections.ConfigDict()
  config.tfds.text = ""
  config.tfds.text_pair = ""           # "-" = none
  config.tfds.label = ""
  config.tfds.validation_split = ""    # "" = validation, else test

  config.init = ml_collections.ConfigDict()
  config.init.kind = "auto"            # auto | params | finetuned | hf | random
  config.init.path = "runs/demo/distill/export" if demo else ""
  config.init.reset_head = False       # replace a task head that does not fit the task
  config.tokenizer = os.path.join(cache, "teacher") if demo else ""  # "" = beside the init

  config.seq_len = 128
  config.batch_size = 8
  config.eval_batch_size = 32
  config.max_dev_examples = 0          # score N records spread evenly over each dev split (0 =
                                       # all); the reports say so (population.json: dev_records)

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam_nobc"      # Bort's Adam without bias correction
  config.optim.lr = 5e-5
  config.optim.weight_decay = 110.0    # as printed in the paper (see the docstring)
  config.optim.warmup = 0.45           # fraction of the run
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-6
  config.optim.clip_norm = 1.0

  config.train = ml_collections.ConfigDict()
  config.train.epochs = 3              # used when total_steps is 0
  config.train.total_steps = 0
  config.train.log_every = 50
  config.train.eval_every = 200        # dev evaluation with the task's official metrics
  config.train.patience = 0            # evaluations without improvement before stopping
  config.train.checkpoint_every = 200
  config.train.keep_checkpoints = 2
  config.predict_test = True           # leaderboard files and predictions of the test splits

  config.grid = ml_collections.ConfigDict()
  config.grid.lr = (1e-4, 1e-5, 9e-6)
  config.grid.weight_decay = (0.0, 10.0, 100.0, 350.0)
  config.grid.warmup = (0.35, 0.40, 0.45, 0.50)
  config.grid.batch_size = (8, 16)
  config.grid.seeds = (0, 1, 2, 3, 4)

  # Seeds x settings as one population (finetune/population.py): on when seeds is set
  # (``seeds=3``, ``lrs=3e-5/1e-4``); an empty field takes the single value of config.optim.
  config.population = ml_collections.ConfigDict()
  config.population.seeds = 0          # N runs seeds 0..N-1 (0: a plain single run)
  config.population.lrs = ()
  config.population.weight_decays = ()
  config.population.warmups = ()
  config.population.mode = "auto"      # vmap | map | auto (map on CPU)
  config.population.save_best = True   # also write WORKDIR/best: the member of best dev score,
                                       # the model evaluate, predict and convert take

  # Agora (finetune/agora.py; ``agora`` arg): Theta is config.population's grid.
  config.agora = ml_collections.ConfigDict()
  config.agora.enabled = False
  config.agora.labeller = ""           # a fine-tuned teacher ("" = config.init.path); one
                                       # without a binary head is fine-tuned on the binary cast
  config.agora.labeller_steps = 0      # 0 = the run's total steps
  config.agora.labeller_lr = 1e-4
  config.agora.min_labeller_accuracy = 2.0 / 3.0  # a labeller at or below it is refused (the
                                                  # authors' "ok-ish" labeller)
  config.agora.mlm = ""                # MLM head for the transformation ("" = config.init.path;
                                       # none there: token edits only)
  config.agora.points_per_mistake = 2
  config.agora.resample_fraction = 0.15
  config.agora.edit_prob = 0.5
  config.agora.first_round = ""        # a finished `finetune ...,seeds=N` run of the same job:
                                       # round 0 is read from it, not trained again ("": train)

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  config.rules = None

  if demo:  # small models on a 2-core CPU: short runs, a larger lr, a sane decay
    config.seq_len = DEMO_SEQ_LEN.get(task, 64)
    config.optim.lr = 1e-4
    config.optim.weight_decay = 0.01
    config.optim.warmup = 0.1
    config.train.epochs = 3
    config.train.log_every = 20
    config.train.eval_every = 100
    config.train.patience = 3
    config.train.checkpoint_every = 100
    config.grid.lr = (3e-5, 1e-4, 3e-4)
    config.grid.weight_decay = (0.0, 0.01)
    config.grid.seeds = (0, 1, 2)

  overrides = {"init": ("init", "path"), "init_kind": ("init", "kind"), "lr": ("optim", "lr"),
               "wd": ("optim", "weight_decay"), "warmup": ("optim", "warmup"),
               "steps": ("train", "total_steps"), "epochs": ("train", "epochs"),
               "seeds": ("population", "seeds"), "lrs": ("population", "lrs")}
  for key, (group, field) in overrides.items():
    if key in args:
      config[group][field] = args[key]
  for key, field in (("tokenizer", "tokenizer"), ("seed", "seed"), ("batch", "batch_size")):
    if key in args:
      config[field] = args[key]
  if args.get("agora"):
    config.agora.enabled = True
    if not config.population.seeds:
      config.population.seeds = len(config.grid.seeds)

  if args.get("tiny"):
    config.seq_len = 32
    config.batch_size = 8
    config.eval_batch_size = 8
    config.train.total_steps = 4
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.optim.warmup = 0.0
  return config
