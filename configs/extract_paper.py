"""The paper's extraction: 300 candidates, RoBERTa-large teacher (docs/BORT.md sections 2-3).

For an accelerator (a GPU or a TPU host); populations are vmapped and sharded over the mesh's
data axis. i is the measured latency of each candidate's compiled forward pass (batch 1, 128
tokens) on the running device, cached per device kind. eps=4 trains one representative of each
interval of 4 candidates (75 per theta) under the max-gain rule; eps=1 trains all 300. The
largest W is returned (``config.select.rule="w"``); ``--config.select.rule=budget
--config.select.min_speedup=K`` returns the lowest proxy error among the candidates at least K
times faster than the teacher instead.

    bort-jax extract --config=configs/extract_paper.py --workdir=runs/extract_paper \\
        --config.teacher.path=/data/roberta-large \\
        --config.data.tokenizer=/data/roberta-large \\
        --config.data.corpus_files='("/data/corpus/*.txt",)'
"""

import ml_collections

from configs import common
from configs import extract_demo  # the same fields, other values


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  common.parse_arg(arg, {}, "extract_paper.py")
  config = extract_demo.get_config()
  config.space.depth = (2, 4, 6, 8, 10, 12)
  config.space.heads = (4, 8, 12, 16)
  config.space.hidden = (512, 768, 1024)
  config.space.intermediate = (256, 512, 768, 1024, 3072)

  config.teacher.kind = "hf"
  config.teacher.path = ""              # RoBERTa-large directory (required)
  config.student.family = "bort"        # RoBERTa vocabulary, positions from 0, no token types

  config.cost.inference = "latency"
  config.fptas.eps = 4
  config.fptas.thetas = ({"lr": 1e-4}, {"lr": 5e-4})
  config.proxy.mode = "vmap"
  config.proxy.max_members = 16
  config.audit.enabled = False          # turn on to audit the proxy (S-step trainings)
  config.select.rule = "w"              # the paper's rule: the largest W ("budget": the lowest
                                        # proxy error among the candidates meeting the limits)
  config.select.min_speedup = 0.0       # K: i(teacher) / i(candidate) >= K, latency (0 = none)
  config.select.max_latency_ms = 0.0    # measured latency on this device in ms (0 = none)
  config.select.max_params = 0          # p (the cost.size count) at most this (0 = none)

  config.data.seq_len = 512
  config.data.max_predictions = 80
  config.data.global_batch_size = 32
  config.data.data_dir = "/tmp/bort_jax_tfds"
  config.data.tokenizer = ""            # RoBERTa vocab.json + merges.txt directory (required)
  config.data.corpus_files = ("",)
  config.mesh = ml_collections.ConfigDict({"data": -1})
  return config
