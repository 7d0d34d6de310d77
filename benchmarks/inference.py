"""Forward-pass latency of Bort and BERT shapes: JAX beside PyTorch eager and ONNX Runtime.

What it measures (random weights, no MLM head, float32, sequences of 128 tokens without
padding, batch 1 and 8):

* the compiled JAX forward (``bort_jax.core.cost.compile_forward``, ``jax.jit`` of the whole
  ``model.apply``) of ``bort``, ``bort-paper``, ``bert-base`` and ``bert-large``;
* when torch and transformers are importable, the same shapes as transformers' ``BertModel``
  / ``RobertaModel`` in eager PyTorch (``torch.set_num_threads``), and when onnxruntime is too,
  those models exported with ``torch.onnx.export`` (opset 17) and run by ONNX Runtime;
* when onnx and onnxruntime are importable (the ``serve`` extra), this project's own ONNX
  export (``bort_jax.serve.onnx_graph``) in ONNX Runtime, float32 (``ours``) and with dynamic
  int8 quantisation (``ours-int8``), against the aims of the serving work (int8 at least 2.5x
  the JAX forward at batch 1 and 2x at batch 8 for Bort; our float32 graph within 5% of the
  faster of JAX and ONNX Runtime on the Hugging Face export), under ``targets.serving``.

How the runtimes are kept apart: each runtime runs alone in a process of its own (``--worker
RUNTIME``), so that no runtime's thread pool takes the cores from another's next call (ONNX
Runtime's intra-op threads keep spinning after a call, on by default, and OpenMP's do too:
interleaving runtimes in one process once made JAX look 50-60% slower than it is). In a
worker, each (model, batch) runs one warm-up call and then ``--calls`` calls back to back, the
steady state of a server of that one model. The parent runs ``--process-rounds`` rounds of one
worker per runtime, in an order that rotates from round to round (``--reverse`` reverses it:
the ranking must not depend on the order), and pools each contender's calls over the rounds:
median and IQR. The output records the isolation (method, each round's worker order).

Next to the latencies: the BERT-large / Bort speed-up beside the FLOP ratio, achieved GFLOP/s
and the share of a float32 matmul ceiling measured in the JAX worker, and the JAX / PyTorch
and JAX / ONNX Runtime latency ratios.

Run it in an environment with the ``parity`` extra (torch, transformers, onnxruntime; without
them only the JAX rows are measured):

    python3 -m venv .venv && .venv/bin/pip install -e '.[parity]'
    .venv/bin/python benchmarks/inference.py --out benchmarks/results/inference.json
    .venv/bin/python benchmarks/inference.py --quick    # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/common.py; also puts the repo root on sys.path)

from bort_jax.core import cost  # noqa: E402
from bort_jax.core.arch import get_model_config  # noqa: E402

MODELS = ("bort", "bort-paper", "bert-base", "bert-large")
QUICK_MODELS = ("bort", "bert-base")


def _jax_contenders(names, batches, seq_len, log) -> tuple[dict, dict]:
  """Compiled JAX forwards (jit of the whole model.apply, no head) and their compile times."""
  fns, compile_s = {}, {}
  for name in names:
    for batch in batches:
      run, seconds = cost.compile_forward(name, batch, seq_len, head="none")
      fns[("jax", name, batch)] = run
      compile_s[f"{name}/b{batch}"] = seconds
      log(f"jax {name} b{batch}: compiled in {seconds:.2f} s")
  return fns, compile_s


def _torch_models(names, threads, log):
  """transformers base models (pooler iff our config has one), random weights, eval mode."""
  import torch

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  script = common.load_script("scripts/hf_param_counts.py")
  models = {}
  for name in names:
    config = get_model_config(name)
    _, _, base_class = script.hf_classes(config)
    model = base_class(script.hf_config(config), add_pooling_layer=config.pooler)
    models[name] = model.eval()
    log(f"torch {name}: built")
  return models


def _torch_inputs(name, batch, seq_len):
  """The same token ids the JAX contender sees (same seed), as int64 tensors, no padding."""
  import torch

  config = get_model_config(name)
  ids = cost.random_batch(config, batch, seq_len)["input_ids"]
  return (torch.from_numpy(ids.astype("int64")),
          torch.ones((batch, seq_len), dtype=torch.int64))


def _torch_contenders(models, batches, seq_len) -> dict:
  """Eager PyTorch forwards under inference_mode."""
  import torch

  fns = {}
  for name, model in models.items():
    for batch in batches:
      ids, mask = _torch_inputs(name, batch, seq_len)

      def run(model=model, ids=ids, mask=mask):
        with torch.inference_mode():
          return model(input_ids=ids, attention_mask=mask).last_hidden_state

      fns[("torch", name, batch)] = run
  return fns


def _onnx_contenders(models, batches, seq_len, threads, workdir, log) -> tuple[dict, dict]:
  """ONNX Runtime sessions of the exported models; also export times and an output check."""
  import onnxruntime as ort
  import torch

  class LastHidden(torch.nn.Module):
    """Positional (ids, mask) -> last hidden state: what the TorchScript exporter traces."""

    def __init__(self, model):
      super().__init__()
      self.model = model

    def forward(self, input_ids, attention_mask):
      return self.model(input_ids=input_ids, attention_mask=attention_mask,
                        use_cache=False).last_hidden_state

  fns, export_s, max_diff = {}, {}, {}
  for name, model in models.items():
    path = os.path.join(workdir, f"{name}.onnx")
    ids, mask = _torch_inputs(name, 1, seq_len)
    start = time.perf_counter()
    if not os.path.exists(path):  # exported in the first process round, kept for the others
      # The TorchScript exporter (dynamo=False): the dynamo one needs onnxscript.
      torch.onnx.export(LastHidden(model).eval(), (ids, mask), path, opset_version=17,
                        dynamo=False,
                        input_names=["input_ids", "attention_mask"],
                        output_names=["last_hidden_state"],
                        dynamic_axes={"input_ids": {0: "batch"},
                                      "attention_mask": {0: "batch"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    export_s[name] = time.perf_counter() - start
    # The exporter traces one batch; check the graph on the largest batch against PyTorch so a
    # shape baked into the trace cannot go unnoticed.
    ids, mask = _torch_inputs(name, max(batches), seq_len)
    with torch.inference_mode():
      expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    got = session.run(["last_hidden_state"], {"input_ids": ids.numpy(),
                                               "attention_mask": mask.numpy()})[0]
    max_diff[name] = float(abs(got - expected).max())
    log(f"onnx {name}: exported and loaded in {export_s[name]:.1f} s, "
        f"max |onnx - torch| {max_diff[name]:.2e}")
    for batch in batches:
      ids, mask = _torch_inputs(name, batch, seq_len)
      feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}

      def run(session=session, feed=feed):
        return session.run(["last_hidden_state"], feed)

      fns[("onnx", name, batch)] = run
  return fns, {"export_s": export_s, "max_abs_diff_vs_torch": max_diff}


def _ours_contenders(names, batches, seq_len, threads, runtime, log) -> dict:
  """ONNX Runtime sessions of this project's own ONNX export (``bort_jax.serve``), float32 or
  dynamic int8, random weights, no head; default session options (spinning on, as served)."""
  from bort_jax.serve import runtime as serve_runtime

  fns = {}
  form = "onnxruntime-int8" if runtime == "ours-int8" else "onnxruntime"
  with tempfile.TemporaryDirectory(prefix="bort_ours_") as folder:
    for name in names:
      start = time.perf_counter()
      path = serve_runtime.timing_model(get_model_config(name), form, seq_len,
                                        tempfile.mkdtemp(dir=folder))
      session = serve_runtime.session(path, threads=threads)
      log(f"{runtime} {name}: exported and loaded in {time.perf_counter() - start:.1f} s")
      run_batch = serve_runtime.forward(session)
      for batch in batches:
        inputs = cost.random_batch(get_model_config(name), batch, seq_len)
        fns[(runtime, name, batch)] = lambda run_batch=run_batch, inputs=inputs: run_batch(inputs)
  return fns


def _ratio(a, b):
  return None if a is None or b is None else a / b


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="also write the JSON here")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: bort and bert-base, batch 1, 2 rounds of 3 calls")
  parser.add_argument("--models", nargs="+", default=None, help=f"default: {MODELS}")
  parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8")
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--process-rounds", type=int, default=None,
                      help="rounds of one process per runtime (default 3; quick: 2)")
  parser.add_argument("--calls", type=int, default=None,
                      help="timed calls per model and batch in each process (default 7; "
                           "quick: 3)")
  parser.add_argument("--reverse", action="store_true",
                      help="start each round with the runtimes in reverse order")
  parser.add_argument("--threads", type=int, default=2,
                      help="PyTorch and ONNX Runtime intra-op threads")
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch and ONNX Runtime")
  parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
  parser.add_argument("--no-ours", action="store_true",
                      help="skip this project's ONNX export (float32 and int8)")
  parser.add_argument("--worker", choices=("jax", "torch", "onnx", "ours", "ours-int8"),
                      help=argparse.SUPPRESS)  # internal: one runtime's process
  parser.add_argument("--workdir", help=argparse.SUPPRESS)  # internal: the ONNX files
  args = parser.parse_args(argv)
  args.models = args.models or (QUICK_MODELS if args.quick else MODELS)
  args.batches = args.batches or ([1] if args.quick else [1, 8])
  args.process_rounds = args.process_rounds or (2 if args.quick else 3)
  args.calls = args.calls or (3 if args.quick else 7)
  return args


def _worker(args) -> int:
  """One runtime alone in this process: its contenders timed, the seconds as JSON on stdout."""
  names, batches, log = args.models, args.batches, common.log
  out = {"runtime": args.worker}
  if args.worker == "jax":
    fns, out["compile_s"] = _jax_contenders(names, batches, args.seq_len, log)
    matmul, out["matmul_flops"] = common.jax_matmul(2048)
    fns[("jax", "matmul-2048", 0)] = matmul
  elif args.worker in ("ours", "ours-int8"):
    fns = _ours_contenders(names, batches, args.seq_len, args.threads, args.worker, log)
  else:
    models = _torch_models(names, args.threads, log)
    if args.worker == "torch":
      fns = _torch_contenders(models, batches, args.seq_len)
    else:
      fns, out["onnx"] = _onnx_contenders(models, batches, args.seq_len, args.threads,
                                          args.workdir, log)
  # Each contender in turn: one warm-up call, then its calls back to back.
  out["seconds"] = {"/".join(map(str, key)): cost.time_back_to_back(fn, args.calls)
                    for key, fn in fns.items()}
  print(json.dumps(out))
  return 0


def _runtimes(args) -> list[str]:
  """The runtimes this environment can time (looked up without importing them)."""
  found = lambda name: importlib.util.find_spec(name) is not None
  have_torch = not args.no_torch and found("torch") and found("transformers")
  have_onnx = have_torch and not args.no_onnx and found("onnxruntime")
  have_ours = not args.no_ours and found("onnx") and found("onnxruntime")
  return (["jax"] + (["torch"] if have_torch else []) + (["onnx"] if have_onnx else [])
          + (["ours", "ours-int8"] if have_ours else []))


def _time_runtimes(args, result, log) -> tuple[dict, dict, float]:
  """Process rounds of one worker per runtime; returns (contender keys, timings, ceiling)."""
  runtimes = result["runtimes"] = _runtimes(args)
  samples, orders = {}, []
  flags = ["--models", *args.models, "--batches", *map(str, args.batches), "--seq-len",
           str(args.seq_len), "--calls", str(args.calls), "--threads", str(args.threads)]
  with tempfile.TemporaryDirectory(prefix="bort_onnx_") as workdir:
    for r in range(args.process_rounds):
      order = runtimes[r % len(runtimes):] + runtimes[:r % len(runtimes)]
      order = order[::-1] if args.reverse else order
      orders.append(order)
      for runtime in order:
        log(f"round {r + 1}/{args.process_rounds}: {runtime} alone in its own process")
        done = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", runtime,
                               "--workdir", workdir, *flags], check=True,
                              stdout=subprocess.PIPE, text=True)
        out = json.loads(done.stdout.strip().splitlines()[-1])
        for key, seconds in out["seconds"].items():
          samples.setdefault(key, []).extend(seconds)
        if runtime == "jax":
          result["jax_compile_s"], matmul_flops = out["compile_s"], out["matmul_flops"]
        if runtime == "onnx":
          result["onnx"] = out["onnx"]
  result["isolation"] = {
      "method": "each runtime alone in its own process; in it each model and batch runs one "
                "warm-up call and then its timed calls back to back",
      "process_rounds": args.process_rounds, "calls_per_process": args.calls,
      "worker_order_per_round": orders, "reverse": bool(args.reverse)}
  result["load_average_1m_after"] = os.getloadavg()[0]
  timings = {key: common.summarize(seconds) for key, seconds in samples.items()}
  ceiling_ms = timings.pop("jax/matmul-2048/0")["median_ms"]
  keys = [tuple(key.split("/")[:2]) + (int(key.split("/")[2]),) for key in timings]
  return keys, timings, matmul_flops / ceiling_ms / 1e6


def _latency_rows(fns, timings, seq_len: int, ceiling: float) -> list[dict]:
  rows = []
  for (runtime, name, batch) in fns:
    t = timings[f"{runtime}/{name}/{batch}"]
    flops = cost.forward_flops(name, batch, seq_len)["total"]
    gflops = flops / t["median_ms"] / 1e6
    rows.append({"runtime": runtime, "model": name, "arch": str(get_model_config(name).arch),
                 "batch": batch, "median_ms": t["median_ms"], "iqr_ms": t["iqr_ms"],
                 "min_ms": t["min_ms"], "max_ms": t["max_ms"], "gflops_forward": flops / 1e9,
                 "achieved_gflops": gflops,
                 # Share of the float32 matmul throughput measured interleaved with the models.
                 "utilisation_of_jax_matmul": gflops / ceiling})
  return rows


def _ratios(rows, names, batches, runtimes, seq_len: int) -> list[dict]:
  """JAX against the other runtimes, and BERT / Bort speed-ups beside their FLOP ratio."""
  median = {(r["runtime"], r["model"], r["batch"]): r["median_ms"] for r in rows}
  # Best-of-rounds ratios too: on a loaded machine interference only adds time, so the
  # minimum is the steadier estimate of what each contender costs.
  best = {(r["runtime"], r["model"], r["batch"]): r["min_ms"] for r in rows}
  ratios = []
  for batch in batches:
    for name in names:
      entry = {"model": name, "batch": batch}
      for other in ("torch", "onnx", "ours", "ours-int8"):
        if other in runtimes:
          entry[f"jax_over_{other}"] = _ratio(median.get(("jax", name, batch)),
                                              median.get((other, name, batch)))
          entry[f"jax_over_{other}_best"] = _ratio(best.get(("jax", name, batch)),
                                                   best.get((other, name, batch)))
      ratios.append(entry)
    for big in ("bert-large", "bert-base"):
      if "bort" not in names or big not in names:
        continue
      flop_ratio = (cost.forward_flops(big, batch, seq_len)["total"] /
                    cost.forward_flops("bort", batch, seq_len)["total"])
      for runtime in runtimes:
        speedup = _ratio(median.get((runtime, big, batch)), median.get((runtime, "bort", batch)))
        speedup_best = _ratio(best.get((runtime, big, batch)), best.get((runtime, "bort", batch)))
        ratios.append({"runtime": runtime, "batch": batch, "pair": f"{big}/bort",
                       "speedup": speedup, "speedup_best": speedup_best,
                       "flop_ratio": flop_ratio,
                       "speedup_over_flop_ratio": _ratio(speedup, flop_ratio)})
  return ratios


def _targets(rows, ratios, runtimes) -> dict:
  jax_rows = [r for r in rows if r["runtime"] == "jax"]
  big_rows = [r for r in ratios if r.get("pair") == "bert-large/bort" and r["runtime"] == "jax"]
  median = {(r["runtime"], r["model"], r["batch"]): r["median_ms"] for r in rows}
  serve = {}
  if "ours-int8" in runtimes and "bort" in {r["model"] for r in rows}:
    # The serving issue's aims: int8 at least 2.5x (batch 1) and 2x (batch 8) the JAX forward.
    for batch, aim in ((1, 2.5), (8, 2.0)):
      gain = _ratio(median.get(("jax", "bort", batch)), median.get(("ours-int8", "bort", batch)))
      if gain is not None:
        serve[f"bort_int8_over_jax_b{batch}"] = {"speedup": gain, "aim": aim, "met": gain >= aim}
  if "ours" in runtimes and "onnx" in runtimes:
    # Our float32 graph within 5% of the faster of JAX and ONNX Runtime on the HF export.
    for (runtime, name, batch), ours in median.items():
      if runtime != "ours" or ("onnx", name, batch) not in median:
        continue
      best = min(median[("jax", name, batch)], median[("onnx", name, batch)])
      serve[f"{name}_ours_over_best_b{batch}"] = {"ratio": ours / best, "aim": 1.05,
                                                  "met": ours / best <= 1.05}
  return {
      "serving": serve,
      "speedup_within_10pct_of_flop_ratio": (
          all(abs(r["speedup_over_flop_ratio"] - 1) <= 0.10 for r in big_rows)
          if big_rows else None),
      "min_utilisation_of_matmul_ceiling": min(r["utilisation_of_jax_matmul"] for r in jax_rows),
      "faster_than_torch_eager": (all(r["jax_over_torch"] < 1 for r in ratios
                                      if "jax_over_torch" in r) if "torch" in runtimes else None),
      "at_least_as_fast_as_onnx": (all(r["jax_over_onnx"] <= 1 for r in ratios
                                       if "jax_over_onnx" in r) if "onnx" in runtimes else None),
  }


def main(argv=None) -> int:
  args = _parse(argv)
  if args.worker:
    return _worker(args)
  log = common.log
  result = {"benchmark": "inference", "seq_len": args.seq_len, "batches": args.batches,
            "models": list(args.models), "threads_torch_onnx": args.threads,
            "machine": common.machine_info()}
  fns, timings, ceiling = _time_runtimes(args, result, log)
  result["matmul_ceiling"] = {"jax_gflops": ceiling, "n": 2048}
  rows = _latency_rows(fns, timings, args.seq_len, ceiling)
  result["latency"] = rows
  result["ratios"] = _ratios(rows, args.models, args.batches, result["runtimes"], args.seq_len)
  result["targets"] = _targets(rows, result["ratios"], result["runtimes"])
  common.write_json(result, args.out)
  median = {(r["runtime"], r["model"], r["batch"]): r["median_ms"] for r in rows}
  for batch in args.batches:  # a readable digest on stderr; stdout stays JSON
    for name in args.models:
      cells = "  ".join(f"{rt} {median[(rt, name, batch)]:8.1f} ms" for rt in result["runtimes"])
      log(f"{name:<11} b{batch}: {cells}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
