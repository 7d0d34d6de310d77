"""The report page of a demo workdir (``bort-jax report``).

    bort-jax report --workdir=runs/demo
    bort-jax report --workdir=runs/demo --config.rounds=20 --config.speed_models="('bert-large',)"

Writes ``WORKDIR/report/report.md`` and the PNGs it embeds from whatever the workdir holds
(a stage that has not run is listed as "not run"). The speed table times the student, the
teacher and ``speed_models`` side by side (``rounds`` interleaved calls of each, median and
interquartile range); the timings are kept in ``WORKDIR/report/speed.json`` and reused while
the models and these fields stay the same (``remeasure=True`` times them again). With the
serve extra installed, the teacher and the student are also timed in each of ``runtimes``
(this project's ONNX export in ONNX Runtime), each runtime in a process of its own. Args:
``tiny`` (two rounds, no BERT shapes: for tests).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = common.parse_arg(arg, {"tiny": common.FLAG}, "report.py")
  config = ml_collections.ConfigDict()
  config.speed_models = ("bert-base", "bert-large")  # presets timed next to student, teacher
  config.batch = 1                     # sequences per timed forward pass
  config.seq_len = 128                 # tokens per sequence
  config.rounds = 10                   # interleaved timed calls of each model (A B C A B C ...)
  config.warmup = 2                    # untimed calls of each model after compiling
  config.remeasure = False             # time again even if speed.json holds these models
  # Teacher and student also in these runtimes (with the serve extra), each in its own process.
  config.runtimes = ("onnxruntime", "onnxruntime-int8")
  if args.get("tiny"):
    config.speed_models = ()
    config.seq_len = 16
    config.rounds = 2
    config.warmup = 1
  return config
