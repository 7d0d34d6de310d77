"""The demo's pretraining on this machine: adapt the MiniLM teacher, then distil a student.

Two jobs share this file. ``adapt`` gives all-MiniLM-L6-v2 (BERT uncased vocabulary,
D6-A12-H384-I1536, shipped without an MLM head) a fresh MLM head and fine-tunes it together
with the body (``config.adapt.trainable``; a head alone on the frozen body cannot get below
the unigram loss) and exports the adapted teacher to ``WORKDIR/export``; the default job
distils a small student from that teacher on the demo Wikipedia corpus (BIG-bench
paragraph_segmentation articles, written as text files by the demo's data step). The cache
directory is ``$BORT_JAX_CACHE`` or ``~/.cache/bort_jax``.

    bort-jax data fetch
    bort-jax teacher-adapt --config=configs/pretrain_demo.py:adapt --workdir=runs/demo/teacher
    bort-jax extract --config=configs/extract_demo.py --workdir=runs/demo/extract
    bort-jax distill --config=configs/pretrain_demo.py:arch=extract:runs/demo/extract \\
        --workdir=runs/demo/distill

Each job runs a few hundred steps of batch 8 x 128 tokens and takes a few minutes on a 2-core
CPU (see benchmarks/train.py for the measured step time). ``teacher-adapt`` leaves
``runs/demo/teacher/export`` (the teacher that distillation and extraction read); ``distill``
leaves checkpoints, ``metrics.jsonl`` and ``export/`` in its workdir, and prints its final
metrics. Args (comma-separated): ``adapt``; ``arch=SPEC`` (a preset, ``D4-A4-H256-I1024`` or
``extract:WORKDIR``); ``tiny`` (a few steps at sequence length 32, for smoke tests: point the
paths at a tiny teacher and corpus with ``--config.*`` overrides).
"""

import os

import ml_collections

from configs import common

ARGS = {"adapt": common.FLAG, "tiny": common.FLAG, "arch": common.VALUE}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, ARGS, "pretrain_demo.py")
  adapt = bool(args.get("adapt"))
  cache = common.cache_dir()
  config = ml_collections.ConfigDict()
  config.seed = 0                      # init, dropout, data order and masking all derive from it
  config.init_from = ""                # a checkpoint dir to start from when the workdir is empty
  config.export_params = True          # write workdir/export (params + model config) at the end

  config.student = ml_collections.ConfigDict()
  # distill: the student's shape; teacher-adapt: unused (the adapted model is read from path).
  config.student.arch = str(args.get("arch", "D4-A4-H256-I1024"))
  config.student.family = "teacher"    # copy the teacher's vocabulary and embedding conventions
  config.student.overrides = ml_collections.ConfigDict()
  config.student.kind = "hf"           # teacher-adapt: "hf" directory or "params" (ours)
  config.student.path = os.path.join(cache, "teacher") if adapt else ""
  common.student_init(config)           # init: "random" | "inherit" (docs/STUDENTS.md)
  if not adapt and not args.get("tiny"):  # tiny: random (the tests' teachers are random)
    # Measured (docs/STUDENTS.md): a random D3-A8-H256-I1024 stays at the unigram level after
    # 200 steps (held-out MLM 7.35 nats), an inherited one reaches 5.74 (teacher 5.46-5.57).
    config.student.init = "inherit"

  if adapt:
    config.adapt = ml_collections.ConfigDict()
    # What teacher-adapt trains: "all" fine-tunes MiniLM's body with a fresh MLM head;
    # "mlm_head" trains the head alone on the frozen body, which stays near the unigram
    # loss (~7 nats): a sentence-embedding body keeps nothing about a masked token.
    config.adapt.trainable = "all"

  config.teacher = ml_collections.ConfigDict()
  config.teacher.kind = "none" if adapt else "params"  # adapt trains a plain masked LM head
  config.teacher.path = "" if adapt else "runs/demo/teacher/export"

  config.loss = common.loss()

  config.data = ml_collections.ConfigDict()
  config.data.corpus_files = (os.path.join(cache, "corpus", "*.txt"),)  # glob patterns
  common.corpus_tfds(config.data)     # or a TFDS dataset by name
  config.data.data_dir = os.path.join(cache, "tfds")  # where the corpus dataset is built
  config.data.corpus_name = "corpus"   # TFDS config name (the same corpus extraction reads)
  config.data.cache_dir = os.path.join(cache, "packed")  # packed-example cache ("" = none)
  config.data.validation_fraction = 0.01  # documents held out for eval (by a text hash)
  config.data.tokenizer = os.path.join(cache, "teacher")  # MiniLM's vocab.txt / tokenizer.json
  config.data.seq_len = 128
  config.data.max_predictions = 20     # 15% of 128 tokens, rounded up
  config.data.global_batch_size = 8

  # Peak lr. Fine-tuning MiniLM with a fresh head: 1e-4..1.5e-4; 3e-4 and above wreck the body
  # within 150 steps (held-out loss back at the unigram level). A head alone takes 1e-3.
  # Warmup: longer for adapt, while the fresh head's first, noisy gradients reach the
  # pretrained body.
  # Distillation: 1.5e-4 for an inherited student (the rate that does not wreck MiniLM's body
  # in adapt); a random one needs 5e-4 (``--config.student.init=random --config.optim.lr=5e-4``).
  gentle = adapt or config.student.init == "inherit"
  config.optim = common.optim(lr=1.5e-4 if gentle else 5e-4, warmup=0.2 if adapt else 0.05)
  config.train = common.train(
      total_steps=250 if adapt else 200, log_every=20, checkpoint_every=100, keep_checkpoints=2,
      eval_every=50 if adapt else 100,  # held-out loss on the validation split
      eval_batches=4)
  config.mesh = common.mesh()
  config.rules = None                  # None: sharding.DEFAULT_RULES

  if args.get("tiny"):  # the same code path in seconds (tests point the paths elsewhere)
    common.make_tiny(config, seq_len=32, max_predictions=5, total_steps=6, log_every=1)
    config.data.cache_dir = ""
  return config
