"""Bort itself: distil D4-A8-H1024-I768 from RoBERTa-large with the paper's hyperparameters.

For a Cloud TPU pod or a multi-GPU host (docs/BORT.md section 4). The teacher is a local Hugging
Face RoBERTa-large directory (config.json + model.safetensors); the corpus is any set of text
files with documents separated by blank lines; the tokenizer is RoBERTa's vocab.json/merges.txt.

    bort-jax distill --config=configs/pretrain_bort.py --workdir=gs://BUCKET/bort \\
        --config.teacher.path=/data/roberta-large --config.data.tokenizer=/data/roberta-large \\
        --config.data.corpus_files='("/data/corpus/*.txt",)'

Expect about 288 accelerator-hours (the paper's claim on GPUs) for the full schedule.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.init_from = ""                # a checkpoint dir to start from when the workdir is empty
  config.export_params = True          # write workdir/export (params + model config) at the end

  config.student = ml_collections.ConfigDict()
  config.student.arch = "bort"         # preset, "D4-A8-H1024-I768", or "extract:WORKDIR"
  config.student.family = "bort"       # RoBERTa vocabulary, 512 positions from 0, no token types
  config.student.overrides = ml_collections.ConfigDict()

  config.teacher = ml_collections.ConfigDict()
  config.teacher.kind = "hf"           # "hf" (HF directory), "params" (ours) or "none" (plain MLM)
  config.teacher.path = ""             # RoBERTa-large directory; required

  config.loss = ml_collections.ConfigDict()
  config.loss.kind = "kl"              # textbook KL; "original" = the release's double softmax
  config.loss.temperature = 2.0
  config.loss.alpha_kd = 0.5           # weight of T^2 * KD
  config.loss.alpha_mlm = 0.1          # weight of the masked-LM cross-entropy

  config.data = ml_collections.ConfigDict()
  config.data.corpus_files = ("",)     # glob patterns of text files
  config.data.data_dir = "/tmp/bort_jax_tfds"  # where the corpus builder writes array_record
  config.data.tokenizer = ""           # directory with vocab.json + merges.txt
  config.data.seq_len = 512
  config.data.max_predictions = 80     # cap on masked predictions per sequence (paper: 80 / 512)
  config.data.global_batch_size = 256  # ~1024 tokens per GPU in the paper; scale to the pod

  config.optim = ml_collections.ConfigDict()
  config.optim.name = "adam_nobc"      # Adam without bias correction, eps after the sqrt
  config.optim.lr = 1e-4               # peak learning rate
  config.optim.b1 = 0.9
  config.optim.b2 = 0.999
  config.optim.eps = 1e-6
  config.optim.weight_decay = 0.01     # decoupled; not on LayerNorm parameters or biases
  config.optim.clip_norm = 1.0         # global-norm clipping
  config.optim.warmup = 0.01           # fraction of total steps for the linear warmup
  config.optim.total_steps = 100_000

  config.train = ml_collections.ConfigDict()
  config.train.total_steps = config.optim.get_ref("total_steps")
  config.train.log_every = 100
  config.train.checkpoint_every = 2000
  config.train.keep_checkpoints = 3
  config.train.eval_every = 5000
  config.train.eval_batches = 20

  config.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "model": 1})
  config.rules = None                  # None: sharding.DEFAULT_RULES
  if arg == "tiny":  # smoke test of the same code path (used by tests with a tiny teacher)
    config.data.seq_len = 64
    config.data.max_predictions = 10
    config.data.global_batch_size = 8
    config.optim.total_steps = 4
    config.train.log_every = 2
    config.train.checkpoint_every = 2
    config.train.eval_every = 0
    config.train.eval_batches = 0
  return config
