"""Extraction on this machine: a space scaled around the demo teacher (all-MiniLM-L6-v2).

108 candidates (depth 1-4, heads 2/4/8, hidden 128/256/384, FFN 256/512/1024), intervals of
eps=9 with the max-gain rule, s=10 proxy steps of distillation from the adapted MiniLM teacher
on the demo Wikipedia corpus, starting from the teacher's weights (proxy.init="inherit"), i =
analytic FLOPs (switch to measured latency with --config.cost.inference=latency). The A2/A4/A8
variants of a shape tie in (p, i); with ties="all" every member of a trained tie is trained (36
trainings per theta). Then the proxy audit trains a sample for S=30 steps. Chosen by
measurement (docs/EXTRACTION.md): s=3 from random weights ranks the candidates against their
30-step order (Kendall tau-b -0.33), s=10 from inherited weights with it (tau-b 0.78). Needs the
demo teacher first:

    bort-jax data fetch
    bort-jax teacher-adapt --config=configs/pretrain_demo.py:adapt --workdir=runs/demo/teacher
    bort-jax extract --config=configs/extract_demo.py --workdir=runs/demo/extract

Produces runs/demo/extract/{results.md,results.csv,pareto.png,audit.json,audit.png,chosen_arch.txt,
ledger.json} in about 9 minutes on a 2-core CPU. The `tiny` arg (a random teacher, synthetic tokens) is for tests.
The `lrs` arg sets Theta to proxy learning rates separated by "/" (`:lrs=2e-4/5e-4/1e-3`: three
trainings per candidate, W takes each candidate's best).

The returned candidate is the lowest proxy error among those at least 4x faster than the teacher
in analytic FLOPs (``config.select``, the budget rule); W's choice (the paper's rule) is computed
and shown beside it (``--config.select.rule=w`` returns it instead).
"""

import os

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"tiny": common.FLAG, "lrs": common.POSITIVE_FLOATS},
                          "extract_demo.py")
  cache = common.cache_dir()
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.space = ml_collections.ConfigDict()
  config.space.depth = (1, 2, 3, 4)
  config.space.heads = (2, 4, 8)
  config.space.hidden = (128, 256, 384)
  config.space.intermediate = (256, 512, 1024)

  config.teacher = ml_collections.ConfigDict()
  config.teacher.kind = "params"        # the adapted MiniLM written by teacher-adapt
  config.teacher.path = "runs/demo/teacher/export"
  config.student = ml_collections.ConfigDict()
  config.student.family = "teacher"     # the teacher's vocabulary and embedding conventions
  config.student.overrides = ml_collections.ConfigDict()

  config.cost = ml_collections.ConfigDict()
  config.cost.size = "total"            # p: "total" or "effective" parameter count
  config.cost.inference = "flops"       # i: "flops" (analytic) or "latency" (measured here)
  config.cost.batch = 1                 # shape at which i is computed
  config.cost.seq_len = 128
  config.cost.repeats = 5               # latency: timed repeats per candidate
  config.cost.latency_table = ""        # "" = ~/.cache/bort_jax/latency_<device>[_<runtime>].json
  config.cost.runtime = "jax"           # latency timed in: jax, onnxruntime, onnxruntime-int8

  config.fptas = ml_collections.ConfigDict()
  config.fptas.eps = 9                  # interval size (1 = train every candidate: exact)
  config.fptas.rule = "max_gain"        # which members of an interval are trained
  config.fptas.maximum = ""             # T: "" = the largest p and i in the space, a
                                        # candidate, "teacher" (its shape: the paper's T)
                                        # or a shape name outside the space
  config.fptas.thetas = ({"lr": 5e-4},)  # Theta: hyperparameter sets tried per candidate
  if "lrs" in args:
    config.fptas.thetas = tuple({"lr": lr} for lr in args["lrs"])
  config.fptas.ties = "all"             # equal (p, i): "all" members trained, or "first" in sort
                                        # order only (the behaviour before ties were handled)

  # Which candidate the extraction returns (chosen_arch.txt, the one distillation reads). W's
  # choice is computed and shown under either rule; the budget's limits count with "budget" only.
  config.select = ml_collections.ConfigDict()
  config.select.rule = "budget"         # "w": the largest W (the paper); "budget": the lowest
                                        # proxy error among the candidates meeting the budget
  config.select.min_speedup = 4.0       # K: at least K x faster than the teacher, i(teacher) /
                                        # i(candidate) in the cost.inference measure (0 = none)
  config.select.max_latency_ms = 0.0    # measured latency at cost.batch x cost.seq_len on this
                                        # device, in ms, at most this (0 = no latency limit)
  config.select.max_params = 0          # p (the cost.size count) at most this (0 = no limit)

  config.proxy = ml_collections.ConfigDict()
  config.proxy.steps = 10               # s: proxy training steps
  config.proxy.init = "inherit"         # initial weights: "random" (the paper) or "inherit"
                                        # (the teacher's, reordered and sliced)
  config.proxy.error = "distill"        # e: held-out "distill" loss or "mlm" cross-entropy
  config.proxy.error_teacher = True     # train and score against the teacher's logits
  config.proxy.mode = "auto"            # "vmap", "map" (one member at a time), "auto"
  config.proxy.max_overhead = 1.5       # bucket planning: padded / real FLOPs bound
  config.proxy.max_members = 64         # bucket planning: members per compiled program
  config.proxy.optim = ml_collections.ConfigDict(
      {"name": "adam_nobc", "b1": 0.9, "b2": 0.999, "eps": 1e-6, "clip_norm": 1.0})

  config.loss = common.loss(intermediate=False)  # the proxy distils logits only

  # The proxy audit: after the search, a sample of the trained candidates is trained for S >> s
  # steps in the same populations; audit.json, audit.png and a verdict line in results.md say
  # whether the s-step errors rank the candidates as the S-step ones do.
  config.audit = ml_collections.ConfigDict()
  config.audit.enabled = True
  config.audit.steps = 30               # S: proxy steps of the audit (> proxy.steps)
  config.audit.sample = 8               # strata along p (plus the chosen one and the runner-up)
  config.audit.seed = 0                 # which member of each stratum is drawn
  config.audit.tau_min = 0.6            # trusted: Kendall tau-b >= tau_min, choice unchanged

  config.data = ml_collections.ConfigDict()
  config.data.kind = "corpus"           # "corpus" (text files) or "synthetic" (random tokens)
  config.data.corpus_files = (os.path.join(cache, "corpus", "*.txt"),)
  common.corpus_tfds(config.data)     # or a TFDS dataset by name
  config.data.data_dir = os.path.join(cache, "tfds")
  config.data.tokenizer = os.path.join(cache, "teacher")
  config.data.corpus_name = "corpus"    # the TFDS corpus distillation builds and reads too
  config.data.cache_dir = os.path.join(cache, "packed")  # packed-example cache ("" = none)
  config.data.seq_len = 128
  config.data.max_predictions = 20
  config.data.global_batch_size = 8     # |B|

  config.mesh = None                    # e.g. {"data": -1}: shard vmapped populations
  if args.get("tiny"):
    config.space.depth = (1, 2)
    config.space.heads = (2, 4)
    config.space.hidden = (16, 32)
    config.space.intermediate = (32, 64)
    config.fptas.eps = 2
    config.proxy.steps = 3               # the tests' random teachers: the paper's random start
    config.proxy.init = "random"
    config.data.kind = "synthetic"
    config.data.cache_dir = ""
    config.data.seq_len = 16
    config.data.max_predictions = 4
    config.data.global_batch_size = 4
    config.cost.seq_len = 16
    config.audit.steps = 6
    config.audit.sample = 3
    config.select.min_speedup = 1.5      # the tiny teachers (D1/D2-A2-H32-I64) are 2.6-7x the
                                         # FLOPs of the smallest tiny candidates, never 4x of all
  return config
