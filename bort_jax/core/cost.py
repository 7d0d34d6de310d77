"""Cost model: exact parameter counts, analytic FLOPs and measured latency of BERT shapes.

Three views of what a shape costs, used by the extraction search (docs/BORT.md section 3: p(b) and
i(b)) and by ``bort-jax cost``:

* :func:`param_counts` counts parameters exactly, per part of the model.
* :func:`forward_flops` counts the floating-point operations of one forward pass analytically
  (two per multiply-add; ``total`` is the matmuls, ``elementwise`` an estimate of the rest), and
  :func:`count_xla_flops` asks XLA for its own count of a compiled function, so the two can be
  checked against each other (tests/test_cost.py: within 5%).
* :func:`measure_latency` times the compiled forward pass on the running device.

Definitions (they decide which of the paper's percentages come out):

* ``embeddings``: the embedding *tables* only, word + position + token type. The embedding
  LayerNorm is counted apart (``embedding_layer_norm``) and belongs to the effective size.
* ``total``: the model as pretrained: embeddings (tables and LayerNorm), encoder, the pooler iff
  the config has one or the head reads it, and the head (by default the MLM head: dense H->H,
  LayerNorm and the decoder bias; the decoder weight is tied to the word embeddings and not
  counted twice). Task heads are counted as Hugging Face lays them out (``model.HeadSpec``).
* ``effective``: ``total`` minus the embedding tables (docs/BORT.md section 1).

With these definitions (MLM head included, pooler iff the config has one) ``bort-paper`` is
5.39% of BERT-large's effective size and 16.48% of its total, the paper's "5.5%" and "16%";
leaving the MLM head out gives 5.20% / 16.34%, which misses the 5.5% by more than 0.2 points.
The released ``bort`` shape is 76.2M parameters with its MLM head (75.1M without): 7.95% /
22.67%.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Sequence

from bort_jax.core.arch import ModelConfig, get_model_config
from bort_jax.core.model import HEAD_KINDS, TASK_KINDS, HeadSpec, has_pooler

# The archs `bort-jax cost` shows when none is named, and the yardstick of the percentages.
DEFAULT_ARCHS = ("bort", "bort-paper", "bert-base", "bert-large")
REFERENCE_ARCH = "bert-large"


def _head(head: Any, config: ModelConfig) -> HeadSpec:
  """A head given as a kind string or a ``model.HeadSpec``, its layout resolved for ``config``.

  Raises:
    ValueError: for an unknown kind or a classification kind without num_labels.
  """
  if isinstance(head, str):
    head = HeadSpec(head)  # raises ValueError naming an unknown kind or missing num_labels
  if not isinstance(head, HeadSpec):
    raise ValueError(f"unknown head {head!r}; expected one of {HEAD_KINDS} or a HeadSpec")
  return head.resolve(config.family)


def _task_head_params(config: ModelConfig, head: HeadSpec) -> int:
  """Parameters of a task head itself (the pooler it may read is counted apart)."""
  if head.kind not in TASK_KINDS:
    return 0
  h, n = config.arch.hidden, head.outputs
  if head.uses_pooler(config.family):
    return h * n + n  # BERT layout and multiple choice: one Linear on the pooler
  return (h * h + h) + (h * n + n)  # RoBERTa layout: classifier.dense, classifier.out_proj


def _config(config: ModelConfig | str) -> ModelConfig:
  return config if isinstance(config, ModelConfig) else get_model_config(config)


def layer_param_count(config: ModelConfig | str) -> int:
  """Parameters of one encoder layer.

  4(H^2 + H) + 2HI + I + H + 4H when heads * head_size == H (docs/BORT.md section 1); in general
  with attention width W = heads * head_size: Q, K, V are 3(HW + W), the output projection
  WH + H, the FFN HI + I + IH + H, and the two LayerNorms 4H.

  Args:
    config: a ModelConfig, preset name or arch string.

  Returns:
    The exact integer count.
  """
  arch = _config(config).arch
  h, i, w = arch.hidden, arch.intermediate, arch.attention_size
  attention = 3 * (h * w + w) + (w * h + h)
  ffn = (h * i + i) + (i * h + h)
  layer_norms = 2 * (2 * h)
  return attention + ffn + layer_norms


def param_counts(config: ModelConfig | str, head: Any = "mlm") -> dict:
  """Exact parameter counts of a model, part by part.

  Args:
    config: a ModelConfig, preset name or arch string.
    head: "mlm" (default, the pretrained model), "none" (the base model), or a head kind /
      ``model.HeadSpec`` of a task head ("classification" with num_labels, "regression",
      "multiple_choice"), counted as Hugging Face lays it out: BERT layout and multiple
      choice are one Linear H->outputs on the pooler (which the model then has, and
      ``pooler`` counts); the RoBERTa layout is dense H->H plus out_proj H->outputs.

  Returns:
    Integer fields ``embeddings`` (the three tables), ``embedding_layer_norm``, ``per_layer``,
    ``encoder``, ``pooler``, ``mlm_head``, ``task_head``, ``total`` and ``effective`` (total
    minus the embedding tables); see the module docstring for the definitions.
  """
  config = _config(config)
  head = _head(head, config)
  h = config.arch.hidden
  tables = (config.vocab_size + config.max_positions + config.type_vocab_size) * h
  embedding_ln = 2 * h
  per_layer = layer_param_count(config)
  encoder = config.arch.depth * per_layer
  pooler = (h * h + h) if has_pooler(config, head) else 0
  # Decoder weight tied to the word embeddings: only its bias is new.
  mlm_head = (h * h + h) + 2 * h + config.vocab_size if head.kind == "mlm" else 0
  task_head = _task_head_params(config, head)
  total = tables + embedding_ln + encoder + pooler + mlm_head + task_head
  return {
      "embeddings": tables,
      "embedding_layer_norm": embedding_ln,
      "per_layer": per_layer,
      "encoder": encoder,
      "pooler": pooler,
      "mlm_head": mlm_head,
      "task_head": task_head,
      "total": total,
      "effective": total - tables,
  }


# XLA's accounting of elementwise work, per element (measured on jax 0.10.2, CPU): one flop per
# arithmetic op; exact GELU costs 64 (XLA expands erf into a polynomial), tanh-GELU 8 (tanh
# itself is a transcendental, counted apart); LayerNorm about 8 per element plus 2 per row;
# scaling, masking and softmax of an attention logit 8.
_GELU_FLOPS = {"gelu": 64, "gelu_tanh": 8}
_LAYER_NORM_FLOPS = 8
_SOFTMAX_FLOPS = 8


def _layer_norm(width: int) -> int:
  return _LAYER_NORM_FLOPS * width + 2


def _head_flops(config: ModelConfig, head: HeadSpec, batch: int, seq_len: int,
                masked_predictions: int | None) -> tuple[int, int]:
  """(matmul flops, elementwise estimate) of the head alone; the pooler is counted apart."""
  h, n = config.arch.hidden, head.outputs
  if head.kind == "mlm":
    predictions = seq_len if masked_predictions is None else masked_predictions
    if predictions < 0:
      raise ValueError(f"masked_predictions must be >= 0, got {masked_predictions}")
    gelu = _GELU_FLOPS[config.activation]
    return (2 * batch * predictions * (h * h + h * config.vocab_size),
            batch * predictions * (h + gelu * h + _layer_norm(h) + config.vocab_size))
  if head.kind == "none":
    return 0, 0
  if head.uses_pooler(config.family):
    # One Linear on the pooler; multiple choice runs one per choice, i.e. per sequence.
    return 2 * batch * h * n, batch * n
  # RoBERTa layout: dense H->H and out_proj on the first token.
  return 2 * batch * (h * h + h * n), batch * (h + n)


def forward_flops(config: ModelConfig | str, batch: int, seq_len: int, head: Any = "none",
                  masked_predictions: int | None = None) -> dict:
  """Analytic floating-point operations of one forward pass (2 per multiply-add).

  ``total`` counts the matmuls: Q/K/V and output projections, the attention score (QK^T) and
  context (PV) products, the FFN, the pooler when the config has one, and the head; this is
  the usual convention for model FLOPs utilisation. ``elementwise`` estimates the rest (bias
  and residual adds, LayerNorm, GELU, softmax) the way XLA counts it; it is 1-5% of the total
  for real shapes but dominates tiny ones. Embedding gathers are free.

  Args:
    config: a ModelConfig, preset name or arch string.
    batch: sequences per forward pass.
    seq_len: tokens per sequence.
    head: "none" (encoder and pooler), "mlm", or a task head kind / HeadSpec.
    masked_predictions: for the MLM head, positions scored per sequence (``masked_positions``);
      None scores every position.

  Returns:
    Integer fields ``attention_projections``, ``attention_scores`` (scores + context),
    ``ffn``, ``per_layer``, ``encoder``, ``pooler``, ``head``, ``total`` (matmuls),
    ``elementwise`` and ``total_with_elementwise``, and ``per_token`` (float, total /
    (batch * seq_len)).
  """
  config = _config(config)
  head = _head(head, config)
  if batch < 1 or seq_len < 1:
    raise ValueError(f"batch and seq_len must be >= 1, got batch={batch}, seq_len={seq_len}")
  arch = config.arch
  h, i, w = arch.hidden, arch.intermediate, arch.attention_size
  tokens = batch * seq_len
  projections = 2 * tokens * (3 * h * w + w * h)
  # Each head: T x S by S x T for the scores, T x T by T x S for the context.
  scores = 2 * 2 * batch * arch.heads * seq_len * seq_len * arch.head_size
  ffn = 2 * tokens * (2 * h * i)
  per_layer = projections + scores + ffn
  encoder = arch.depth * per_layer
  pooled = has_pooler(config, head)
  pooler = 2 * batch * h * h if pooled else 0

  # Elementwise, per token of a layer: biases (3W + H + I + H), two residual adds, two
  # LayerNorms, the activation, and the softmax over A * T logits.
  gelu = _GELU_FLOPS[config.activation]
  layer_elementwise = ((3 * w + 2 * h + i) + 2 * h + 2 * _layer_norm(h) + gelu * i +
                       _SOFTMAX_FLOPS * arch.heads * seq_len)
  tables = 2 + (config.type_vocab_size > 0)
  elementwise = tokens * (arch.depth * layer_elementwise + (tables - 1) * h + _layer_norm(h))
  elementwise += batch * h if pooled else 0
  head_flops, head_elementwise = _head_flops(config, head, batch, seq_len, masked_predictions)
  elementwise += head_elementwise
  total = encoder + pooler + head_flops
  return {
      "attention_projections": arch.depth * projections,
      "attention_scores": arch.depth * scores,
      "ffn": arch.depth * ffn,
      "per_layer": per_layer,
      "encoder": encoder,
      "pooler": pooler,
      "head": head_flops,
      "total": total,
      "elementwise": elementwise,
      "total_with_elementwise": total + elementwise,
      "per_token": total / tokens,
  }


def count_xla_flops(fn: Callable, *args, **kwargs) -> float:
  """XLA's own FLOP count of ``jax.jit(fn)(*args, **kwargs)`` after compilation.

  Args:
    fn: a JAX-traceable function.
    *args, **kwargs: example arguments (arrays or ShapeDtypeStructs).

  Returns:
    The ``flops`` entry of the compiled executable's cost analysis (summed over entries when
    the installed JAX returns one dict per program). XLA counts each elementwise operation as
    one flop per element and transcendentals (exp, tanh, rsqrt) apart, not as flops.
  """
  import jax

  analysis = jax.jit(fn).lower(*args, **kwargs).compile().cost_analysis()
  if analysis is None:
    raise RuntimeError("this backend gives no cost analysis")
  entries = analysis if isinstance(analysis, (list, tuple)) else [analysis]
  if not entries or not all(isinstance(e, dict) for e in entries):
    raise RuntimeError(f"unexpected cost analysis: {analysis!r}")
  # XLA leaves the key out of a program with no floating-point work (e.g. only tanh, which it
  # counts under "transcendentals").
  return sum(float(e.get("flops", 0.0)) for e in entries)


def random_batch(config: ModelConfig, batch: int, seq_len: int, seed: int = 0) -> dict:
  """A batch of random token ids with no padding, shaped as ``model.apply`` expects.

  Args:
    config: the model config (vocabulary and token types).
    batch: sequences.
    seq_len: tokens per sequence (at most ``config.max_length``).
    seed: numpy seed of the ids.

  Returns:
    int32 numpy arrays ``input_ids``, ``attention_mask`` and, when the config has token types,
    ``token_type_ids``.
  """
  import numpy as np

  if seq_len > config.max_length:
    raise ValueError(f"seq_len {seq_len} exceeds the {config.max_length} positions of "
                     f"{config.arch}")
  rng = np.random.default_rng(seed)
  out = {
      "input_ids": rng.integers(0, config.vocab_size, (batch, seq_len), dtype=np.int32),
      "attention_mask": np.ones((batch, seq_len), np.int32),
  }
  if config.type_vocab_size > 0:
    out["token_type_ids"] = np.zeros((batch, seq_len), np.int32)
  return out


def timing_params(config: ModelConfig, head: Any, seq_len: int, seed: int = 0) -> Any:
  """Weights of the model's shapes for timing: N(0, 0.02) from NumPy, on the device.

  The forward pass costs the same whatever the values, and ``model.init`` compiles its
  initialisers for every new shape first (18 s for BERT-large on a 2-core CPU, against a
  second for these), which a latency measurement does not need.
  """
  import jax
  import numpy as np

  from bort_jax.core import model  # Deferred: model.py imports flax.

  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed), config, head=head,
                                             seq_len=seq_len))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if not np.issubdtype(np.dtype(leaf.dtype), np.floating):
      return np.zeros(leaf.shape, leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape, dtype=np.float32)).astype(leaf.dtype)

  return jax.device_put(jax.tree.map(fill, shapes))


def compile_forward(config: ModelConfig | str, batch: int, seq_len: int, head: Any = "none",
                    seed: int = 0) -> tuple[Callable[[], Any], float]:
  """Random-weight model and batch, and the compiled forward pass over them.

  Args:
    config: a ModelConfig, preset name or arch string.
    batch: sequences per forward pass.
    seq_len: tokens per sequence.
    head: head kind or ``model.HeadSpec`` ("none" times the encoder and pooler).
    seed: seed of the weights and the token ids.

  Returns:
    ``(run, compile_seconds)``: ``run()`` executes the compiled forward once and blocks until
    its outputs are ready; ``compile_seconds`` is the lower + compile time.
  """
  import jax

  from bort_jax.core import model  # Deferred: model.py imports flax.

  config = _config(config)
  spec = model.HeadSpec(head) if isinstance(head, str) else head
  params = timing_params(config, spec, seq_len, seed)
  inputs = jax.device_put(random_batch(config, batch, seq_len, seed))

  def forward(params, inputs):
    return model.apply(params, config, inputs, head=spec, train=False)

  start = time.perf_counter()
  compiled = jax.jit(forward).lower(params, inputs).compile()
  compile_seconds = time.perf_counter() - start

  def run():
    return jax.block_until_ready(compiled(params, inputs))

  return run, compile_seconds


def summarize_times(seconds: Sequence[float]) -> dict:
  """Median and spread of repeated timings, in milliseconds."""
  ms = sorted(1e3 * s for s in seconds)
  quartiles = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
  return {
      "median_ms": statistics.median(ms),
      "min_ms": ms[0],
      "max_ms": ms[-1],
      "iqr_ms": quartiles[2] - quartiles[0],
      "repeats": len(ms),
  }


def measure_latency(config: ModelConfig | str, batch: int, seq_len: int, repeats: int = 10,
                    warmup: int = 2, head: Any = "none", seed: int = 0) -> dict:
  """Measured latency of the compiled forward pass on the default device.

  Args:
    config: a ModelConfig, preset name or arch string.
    batch: sequences per forward pass.
    seq_len: tokens per sequence.
    repeats: timed runs (each waits for its outputs).
    warmup: untimed runs after compilation.
    head: head kind or ``model.HeadSpec``.
    seed: seed of the random weights and ids.

  Returns:
    ``compile_s``, ``median_ms``, ``min_ms``, ``max_ms``, ``iqr_ms``, ``repeats``, plus the
    ``arch``, ``batch``, ``seq_len`` and ``device`` measured.
  """
  import jax

  if repeats < 1 or warmup < 0:
    raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats}, {warmup}")
  config = _config(config)
  run, compile_seconds = compile_forward(config, batch, seq_len, head, seed)
  times = time_back_to_back(run, repeats, warmup)
  return {
      "arch": str(config.arch),
      "batch": batch,
      "seq_len": seq_len,
      "device": str(jax.devices()[0].device_kind),
      "compile_s": compile_seconds,
      **summarize_times(times),
  }


def time_back_to_back(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> list[float]:
  """Seconds of ``repeats`` calls of ``fn`` one after another, after ``warmup`` untimed ones:
  the steady state of one model served alone (``fn`` must block on its own work)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def time_interleaved(fns: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1,
                     log: Callable[[str], None] | None = None) -> dict:
  """Times each callable once per round, round-robin (A B C A B C ...), over ``rounds``.

  Interleaving spreads a slow spell of a shared machine over every contender instead of one;
  the starting contender rotates so none always runs first. ``warmup`` untimed calls of each
  come first.

  Returns:
    name -> :func:`summarize_times` of its timings plus ``times_ms`` (sorted).
  """
  if rounds < 1 or warmup < 0:
    raise ValueError(f"need rounds >= 1 and warmup >= 0, got {rounds}, {warmup}")
  names = list(fns)
  for name in names:
    for _ in range(warmup):
      fns[name]()
  times = {name: [] for name in names}
  for r in range(rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      start = time.perf_counter()
      fns[name]()
      times[name].append(time.perf_counter() - start)
    if log:
      log(f"timing round {r + 1}/{rounds}")
  return {name: dict(summarize_times(t), times_ms=sorted(round(1e3 * x, 3) for x in t))
          for name, t in times.items()}


def _cpu_times(path: str) -> tuple[int, int] | None:
  """(busy, total) jiffies of all CPUs from ``/proc/stat``'s first line, or None."""
  try:
    with open(path) as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  if len(fields) < 4:
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
  return sum(fields[:8]) - idle, sum(fields[:8])


def busy_share(seconds: float = 1.0, path: str = "/proc/stat") -> float | None:
  """The share of the machine's CPU time that was busy during ``seconds`` of sleep.

  Called while this process sleeps, it is what other processes take: on a 2-core machine one
  other busy process reads about 0.5. A timing taken then favours a model that uses fewer cores
  (a small one), so a speed-up measured on a busy machine is overstated. None where the
  kernel's counters cannot be read (not Linux).
  """
  first = _cpu_times(path)
  time.sleep(seconds)
  second = _cpu_times(path)
  if first is None or second is None or second[1] <= first[1]:
    return None
  return (second[0] - first[0]) / (second[1] - first[1])


def interleaved_latency(configs: Mapping[str, ModelConfig | str], batch: int, seq_len: int,
                        rounds: int = 10, warmup: int = 2,
                        log: Callable[[str], None] | None = None) -> dict:
  """Forward latency of several models measured side by side (:func:`time_interleaved`).

  Args:
    configs: name -> ModelConfig, preset name or arch string (random weights, no head).
    batch: sequences per forward pass.
    seq_len: tokens per sequence.
    rounds: timed calls of each model.
    warmup: untimed calls of each after compiling.
    log: optional progress printer.

  Returns:
    name -> ``median_ms``, ``iqr_ms``, ``min_ms``, ``max_ms``, ``repeats``, ``times_ms``,
    ``compile_s``, ``arch``, ``batch``, ``seq_len``, ``device``.
  """
  import jax

  runs, compiles, archs = {}, {}, {}
  for name, config in configs.items():
    config = _config(config)
    runs[name], compiles[name] = compile_forward(config, batch, seq_len)
    archs[name] = str(config.arch)
  out = time_interleaved(runs, rounds, warmup, log)
  device = str(jax.devices()[0].device_kind)
  for name in out:
    out[name].update(compile_s=compiles[name], arch=archs[name], batch=batch, seq_len=seq_len,
                     device=device)
  return out


def cost_row(name: str, batch: int = 1, seq_len: int = 128,
             reference: str = REFERENCE_ARCH) -> dict:
  """One row of the cost report: sizes, share of the reference model, forward GFLOPs.

  Args:
    name: preset name or arch string (bare shapes take the Bort family's fields).
    batch: sequences per forward pass for the FLOP count.
    seq_len: tokens per sequence.
    reference: the model the percentages are relative to.

  Returns:
    A flat dict; the field names are those of ``bort-jax cost --json``.
  """
  config = get_model_config(name)
  ref = param_counts(get_model_config(reference))
  counts = param_counts(config)
  flops = forward_flops(config, batch, seq_len)
  return {
      "name": name,
      "arch": str(config.arch),
      "family": config.family,
      "params_total": counts["total"],
      "params_effective": counts["effective"],
      "params_embeddings": counts["embeddings"],
      f"pct_of_{reference}_effective": 100.0 * counts["effective"] / ref["effective"],
      f"pct_of_{reference}_total": 100.0 * counts["total"] / ref["total"],
      "batch": batch,
      "seq_len": seq_len,
      "gflops_forward": flops["total"] / 1e9,
  }


def format_table(rows: list[dict], reference: str) -> str:
  columns = [("name", "name", "{}"), ("arch", "arch", "{}"),
             ("total", "params_total", "{:,}"), ("effective", "params_effective", "{:,}"),
             ("embeddings", "params_embeddings", "{:,}"),
             (f"% {reference} eff", f"pct_of_{reference}_effective", "{:.2f}"),
             (f"% {reference} total", f"pct_of_{reference}_total", "{:.2f}"),
             ("GFLOPs fwd", "gflops_forward", "{:.2f}")]
  if any("latency_ms" in r for r in rows):
    columns += [("latency ms", "latency_ms", "{:.1f}"), ("compile s", "compile_s", "{:.2f}")]
  cells = [[title for title, _, _ in columns]]
  for row in rows:
    cells.append([fmt.format(row[key]) if key in row else "-" for _, key, fmt in columns])
  widths = [max(len(c[j]) for c in cells) for j in range(len(columns))]
  lines = ["  ".join(c.ljust(w) if j < 2 else c.rjust(w)
                     for j, (c, w) in enumerate(zip(line, widths))) for line in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)
