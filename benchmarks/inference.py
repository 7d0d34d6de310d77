"""Forward-pass latency of Bort and BERT shapes: JAX beside PyTorch eager and ONNX Runtime.

What it measures (random weights, no MLM head, float32, sequences of 128 tokens without
padding, batch 1 and 8):

* the compiled JAX forward (``bort_jax.core.cost.compile_forward``, ``jax.jit`` of the whole
  ``model.apply``) of ``bort``, ``bort-paper``, ``bert-base`` and ``bert-large``;
* when torch and transformers are importable, the same shapes as transformers' ``BertModel``
  / ``RobertaModel`` in eager PyTorch (``torch.set_num_threads``), and when onnxruntime is too,
  those models exported with ``torch.onnx.export`` (opset 17) and run by ONNX Runtime.

All contenders are timed interleaved (round-robin, several rounds, median), so the ratios
compare like with like on a shared machine. Next to the latencies: the BERT-large / Bort
speed-up beside the FLOP ratio, achieved GFLOP/s and the share of a measured float32 matmul
ceiling, and the JAX / PyTorch and JAX / ONNX Runtime latency ratios.

Run it in an environment with the ``parity`` extra (torch, transformers, onnxruntime; without
them only the JAX rows are measured):

    python3 -m venv .venv && .venv/bin/pip install -e '.[parity]'
    .venv/bin/python benchmarks/inference.py --out benchmarks/results/inference.json
    .venv/bin/python benchmarks/inference.py --quick    # smoke run, ~1 minute
"""

from __future__ import annotations

import argparse
import os
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
    # The TorchScript exporter (dynamo=False): the dynamo one needs onnxscript.
    torch.onnx.export(LastHidden(model).eval(), (ids, mask), path, opset_version=17,
                      dynamo=False,
                      input_names=["input_ids", "attention_mask"],
                      output_names=["last_hidden_state"],
                      dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}})
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


def _ratio(a, b):
  return None if a is None or b is None else a / b


def _parse(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="also write the JSON here")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: bort and bert-base, batch 1, 3 rounds")
  parser.add_argument("--models", nargs="+", default=None, help=f"default: {MODELS}")
  parser.add_argument("--batches", nargs="+", type=int, default=None, help="default: 1 8")
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--rounds", type=int, default=None, help="default 5 (quick: 3)")
  parser.add_argument("--threads", type=int, default=2,
                      help="PyTorch and ONNX Runtime intra-op threads")
  parser.add_argument("--no-torch", action="store_true", help="skip PyTorch and ONNX Runtime")
  parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
  args = parser.parse_args(argv)
  args.models = args.models or (QUICK_MODELS if args.quick else MODELS)
  args.batches = args.batches or ([1] if args.quick else [1, 8])
  args.rounds = args.rounds or (3 if args.quick else 5)
  return args


def _time_contenders(args, result, log) -> tuple[dict, dict, float]:
  """Times every contender interleaved; returns (fns, timings, matmul ceiling in GFLOP/s)."""
  names, batches = args.models, args.batches
  fns, result["jax_compile_s"] = _jax_contenders(names, batches, args.seq_len, log)
  # The ceiling is also timed among the contenders, so it sees the same machine load as they.
  matmul, matmul_flops = common.jax_matmul(2048)
  fns[("jax", "matmul-2048", 0)] = matmul
  have_torch = (not args.no_torch and common.optional_import("torch") is not None
                and common.optional_import("transformers") is not None)
  have_onnx = have_torch and not args.no_onnx and common.optional_import("onnxruntime")
  result["runtimes"] = ["jax"] + (["torch"] if have_torch else []) + (
      ["onnx"] if have_onnx else [])
  with tempfile.TemporaryDirectory(prefix="bort_onnx_") as workdir:
    if have_torch:
      models = _torch_models(names, args.threads, log)
      fns.update(_torch_contenders(models, batches, args.seq_len))
      if have_onnx:
        onnx_fns, result["onnx"] = _onnx_contenders(
            models, batches, args.seq_len, args.threads, workdir, log)
        fns.update(onnx_fns)
    log(f"timing {len(fns)} contenders x {args.rounds} rounds, interleaved")
    keyed = {"/".join(map(str, key)): fn for key, fn in fns.items()}
    timings = common.interleaved_timing(keyed, rounds=args.rounds, warmup=1, log=log)
  result["load_average_1m_after"] = os.getloadavg()[0]
  ceiling_ms = timings.pop("jax/matmul-2048/0")["median_ms"]
  del fns[("jax", "matmul-2048", 0)]
  return fns, timings, matmul_flops / ceiling_ms / 1e6


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
      for other in ("torch", "onnx"):
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
  return {
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
  log = common.log
  result = {"benchmark": "inference", "seq_len": args.seq_len, "batches": args.batches,
            "models": list(args.models), "rounds": args.rounds,
            "threads_torch_onnx": args.threads, "machine": common.machine_info()}
  log("measuring the matmul ceiling")
  result["matmul_ceiling"] = common.matmul_ceiling(n=2048)
  fns, timings, ceiling = _time_contenders(args, result, log)
  result["matmul_ceiling"]["jax_gflops_interleaved"] = ceiling
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
