"""Speed of the pretraining input pipeline, JSON out.

Measures, on one process:
* building the TFDS array_record corpus from text files and reading it back,
* tokenising + packing into segment pairs (done once per run), in tokens/s,
* masked batches per second and tokens/s at ``seq_len`` 128 for global batches of 8 and 32,
and compares the input rate with one Bort MLM train step (B=8, T=128: 1.87 s, measured on the
2-core CPU of the README's results table), i.e. how many times faster than the step the input
is produced.

By default the corpus is the Python language reference shipped with CPython
(`pydoc_data.topics`, real English prose) and the tokenizer a byte-level BPE trained on it;
pass ``--files`` and ``--tokenizer``/``--family`` to time your own.

Run: ``python benchmarks/input.py [--out input.json]``
"""

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bort_jax.data import corpus, pretrain, tokenization  # noqa: E402

# One Bort MLM train step at B=8, T=128, measured on the 2-core CPU of the README's results.
_BORT_STEP_S = 1.87
_BORT_STEP_TOKENS = 8 * 128


def _reference_documents(repeat: int) -> list[str]:
  """CPython's language reference topics as documents (one paragraph per line)."""
  import pydoc_data.topics  # pylint: disable=g-import-not-at-top
  docs = []
  for key in sorted(pydoc_data.topics.topics):
    paragraphs = [" ".join(p.split()) for p in pydoc_data.topics.topics[key].split("\n\n")]
    docs.append("\n".join(p for p in paragraphs if p))
  # Repeats are distinct documents to the pipeline (a marker line keeps their hashes apart).
  return [f"Copy {r}.\n{d}" for r in range(repeat) for d in docs]


def _train_bpe(docs: list[str], directory: str, vocab_size: int) -> tokenization.Tokenizer:
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  bpe = tokenizers.Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.train_from_iterator(docs, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
  bpe.model.save(directory)
  return tokenization.load_tokenizer(
      [os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt")], "bort")


def _time_batches(inp: pretrain.PretrainInput, seconds: float) -> dict:
  inp.batch(0)  # Warm the epoch permutation.
  steps, real = 0, 0
  start = time.perf_counter()
  while time.perf_counter() - start < seconds:
    real += int(inp.batch(steps)["attention_mask"].sum())
    steps += 1
  elapsed = time.perf_counter() - start
  tokens = steps * inp.local_batch_size * inp.seq_len
  return dict(batch_size=inp.global_batch_size, seq_len=inp.seq_len, batches=steps,
              seconds=round(elapsed, 3), batches_per_s=round(steps / elapsed, 1),
              tokens_per_s=round(tokens / elapsed), real_tokens_per_s=round(real / elapsed),
              ms_per_batch=round(1e3 * elapsed / steps, 3))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--files", nargs="*", help="corpus text files (default: CPython docs)")
  parser.add_argument("--tokenizer", help="tokenizer path (default: BPE trained on the corpus)")
  parser.add_argument("--family", default="bort")
  parser.add_argument("--repeat", type=int, default=3, help="copies of the default corpus")
  parser.add_argument("--vocab_size", type=int, default=8000)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--batch_sizes", type=int, nargs="*", default=[8, 32])
  parser.add_argument("--seconds", type=float, default=3.0, help="time per batch size")
  parser.add_argument("--out", help="also write the JSON here")
  args = parser.parse_args(argv)

  with tempfile.TemporaryDirectory() as tmp:
    if args.files:
      files = args.files
      docs_for_vocab = None
    else:
      docs_for_vocab = _reference_documents(args.repeat)
      files = [os.path.join(tmp, "corpus.txt")]
      with open(files[0], "w", encoding="utf-8") as f:
        f.write("\n\n".join(docs_for_vocab) + "\n")
    if args.tokenizer:
      tok = tokenization.load_tokenizer(args.tokenizer, args.family)
    else:
      if docs_for_vocab is None:
        docs_for_vocab = [d for f in files for d in
                          ("\n".join(lines) for lines in corpus.read_documents(f))]
      tok = _train_bpe(docs_for_vocab, tmp, args.vocab_size)

    start = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints progress; stdout is JSON.
      sources = corpus.build_corpus(files, os.path.join(tmp, "tfds"), name="bench",
                                    validation_fraction=0.0)
    build_s = time.perf_counter() - start
    start = time.perf_counter()
    docs = corpus.documents(sources["train"])
    read_s = time.perf_counter() - start

    start = time.perf_counter()
    packed = pretrain.pack_documents(docs, tok, args.seq_len, seed=0)
    pack_s = time.perf_counter() - start
    real_tokens = int(packed.lengths.sum())

    batches = [_time_batches(pretrain.PretrainInput(packed, tok, args.seq_len, b, seed=0),
                             args.seconds) for b in args.batch_sizes]

  step_tokens_per_s = _BORT_STEP_TOKENS / _BORT_STEP_S
  result = dict(
      machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                   python=platform.python_version()),
      corpus=dict(documents=len(docs), characters=sum(len(d) for d in docs),
                  tokenizer=repr(tok)),
      build_corpus=dict(seconds=round(build_s, 3), read_back_seconds=round(read_s, 3)),
      tokenise_and_pack=dict(seconds=round(pack_s, 3), examples=len(packed),
                             real_tokens=real_tokens,
                             tokens_per_s=round(real_tokens / pack_s),
                             fill=round(real_tokens / (len(packed) * args.seq_len), 3)),
      masked_batches=batches,
      bort_step=dict(seconds=_BORT_STEP_S, tokens_per_s=round(step_tokens_per_s, 1),
                     source="measured Bort MLM train step, B=8 T=128, 2-core CPU"),
      input_over_step=[dict(batch_size=b["batch_size"],
                            ratio=round(b["tokens_per_s"] / step_tokens_per_s))
                       for b in batches],
  )
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    with open(args.out, "w") as f:
      f.write(text + "\n")
  return result


if __name__ == "__main__":
  main()
