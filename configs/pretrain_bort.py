"""Bort itself: distil D4-A8-H1024-I768 from RoBERTa-large with the paper's hyperparameters.

For a Cloud TPU pod or a multi-GPU host (docs/BORT.md section 4). The teacher is a local Hugging
Face RoBERTa-large directory (config.json + model.safetensors); the corpus is any set of text
files with documents separated by blank lines; the tokenizer is RoBERTa's vocab.json/merges.txt.

    bort-jax distill --config=configs/pretrain_bort.py --workdir=gs://BUCKET/bort \\
        --config.teacher.path=/data/roberta-large --config.data.tokenizer=/data/roberta-large \\
        --config.data.corpus_files='("gs://BUCKET/corpus/*.txt",)'

or, with a TFDS text dataset prepared under ``config.data.data_dir``. Either corpus is streamed
(``config.data.stream_window``): each host reads only its share of the records, a window of
4,096 documents at a time, so no host holds the corpus or its token ids:

    bort-jax distill --config=configs/pretrain_bort.py --workdir=gs://BUCKET/bort \
        --config.teacher.path=/data/roberta-large --config.data.tokenizer=/data/roberta-large \
        --config.data.corpus_tfds=wikipedia/20230601.en --config.data.data_dir=gs://BUCKET/tfds

Expect about 288 accelerator-hours (the paper's claim on GPUs) for the full schedule. Arg:
``tiny`` (a smoke run of the same code path, for tests with a tiny teacher).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"tiny": common.FLAG}, "pretrain_bort.py")
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = ""                # a checkpoint dir to start from when the workdir is empty
  config.export_params = True          # write workdir/export (params + model config) at the end

  config.student = ml_collections.ConfigDict()
  config.student.arch = "bort"         # preset, "D4-A8-H1024-I768", or "extract:WORKDIR"
  config.student.family = "bort"       # RoBERTa vocabulary, 512 positions from 0, no token types
  config.student.overrides = ml_collections.ConfigDict()
  common.student_init(config)           # init: "random" | "inherit" (docs/STUDENTS.md)

  config.teacher = ml_collections.ConfigDict()
  config.teacher.kind = "hf"           # "hf" (HF directory), "params" (ours) or "none" (plain MLM)
  config.teacher.path = ""             # RoBERTa-large directory; required

  config.loss = common.loss()

  config.data = ml_collections.ConfigDict()
  config.data.corpus_files = ("",)     # glob patterns of text files
  common.corpus_tfds(config.data)     # or a TFDS dataset by name
  config.data.stream_window = 4096     # a corpus of this size is streamed, 4,096 documents a
                                       # window per host, never packed whole in any host
  config.data.data_dir = "/tmp/bort_jax_tfds"  # where the corpus builder writes array_record
  config.data.tokenizer = ""           # directory with vocab.json + merges.txt
  config.data.seq_len = 512
  config.data.max_predictions = 80     # cap on masked predictions per sequence (paper: 80 / 512)
  config.data.global_batch_size = 256  # ~1024 tokens per GPU in the paper; scale to the pod

  config.optim = common.optim(lr=1e-4, warmup=0.01)
  config.train = common.train(total_steps=100_000, log_every=100, checkpoint_every=2000,
                              keep_checkpoints=3, eval_every=5000, eval_batches=20)
  config.mesh = common.mesh()
  config.rules = None                  # None: sharding.DEFAULT_RULES
  if args.get("tiny"):
    common.make_tiny(config, seq_len=64, max_predictions=10, total_steps=4, log_every=2)
  return config
