"""The ``README.md`` of an ONNX export: what the graph is, how to serve it, what was measured.

Every figure comes from the export's record (``serve.json``), written at export time: the
parity with the JAX forward, the int8 graph's quantised MatMuls, its latency beside the float32
graph's and its dev score beside theirs. A figure not measured says so.
"""

from __future__ import annotations

from typing import Any


def _fmt(value: Any, digits: int = 4) -> str:
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _int8_lines(record: dict) -> list[str]:
  q = record.get("int8")
  if not q:
    return ["No int8 graph (export with `--quantize int8` to add `model.int8.onnx`).", ""]
  lines = [f"`model.int8.onnx`: ONNX Runtime's dynamic quantisation, {q['matmuls_quantized']} "
           f"of the {q['weight_matmuls']} weight MatMuls in int8 (attention's MatMuls of two "
           "activations and the embedding tables stay float32).", ""]
  lat = q.get("latency", {})
  if lat:
    seq = record["seq_len"]
    lines += [f"| graph | latency, batch 1 x {seq} (median ms) | IQR (ms) |", "|---|---|---|"]
    for name, row in lat.items():
      lines.append(f"| {name} | {row['median_ms']:.2f} | {row['iqr_ms']:.2f} |")
    lines += ["", f"int8 is {q['speedup']:.2f}x the float32 graph here (ONNX Runtime, CPU, "
              "spinning off, the two timed in alternating blocks on the exporting machine).",
              ""]
  dev = q.get("dev")
  if dev:
    metric = dev["metric"]
    lines += [f"| graph | {metric} on {dev['split']} ({dev['examples']} examples) |",
              "|---|---|"]
    for name in ("onnxruntime", "onnxruntime-int8"):
      lines.append(f"| {name} | {_fmt(dev[name][metric])} |")
    lines += ["", f"Accuracy cost of int8: {dev['change_points']:+.2f} points of {metric}.", ""]
  else:
    lines += ["The int8 graph's accuracy was not measured (the model has no task head).", ""]
  return lines


def render(record: dict, name: str) -> str:
  """Markdown for the export ``name`` described by ``record``."""
  head = record["head"]
  task = f", fine-tuned on `{record['task']}`" if record.get("task") else ""
  labels = record.get("label_names") or []
  inputs = ", ".join(f"`{i}`" for i in record["inputs"])
  axes = "[batch, choices, length]" if head["kind"] == "multiple_choice" else "[batch, length]"
  lines = [
      f"# {name}", "",
      f"A {record['family']} {record['arch']} model with a {head['kind']} head{task}, "
      f"exported by bort_jax as an ONNX graph (opset {record['opset']}).", "",
      "## Inputs and output", "",
      f"Inputs {inputs}: int64 {axes}, every axis dynamic. Output `{record['output']}`."
      + (f" Labels, in order: {', '.join(labels)}." if labels else ""), "",
      f"Checked at export: the largest difference from the JAX forward on a padded batch "
      f"was {record['parity']['max_abs_diff']:.2e} (allowed {record['parity']['tolerance']:g}).",
      "", "## int8", "", *_int8_lines(record),
      "## Serve it", "",
      "```",
      f"bort-jax predict --checkpoint {name} --runtime onnxruntime --text \"...\"",
      "```", "",
      "or from Python, with the tokenizer files in this folder:" if record.get(
          "tokenizer_files") else "(no tokenizer was found with the checkpoint: give predict "
      "`--tokenizer DIR`), or from Python:", "",
      "```python",
      "import onnxruntime, tokenizers",
      f"tok = tokenizers.Tokenizer.from_file(\"{name}/tokenizer.json\")",
      f"session = onnxruntime.InferenceSession(\"{name}/model.onnx\")",
      "```", ""]
  return "\n".join(lines)
