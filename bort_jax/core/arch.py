"""Architectures: searchable BERT shapes, model-family configs, presets and search spaces.

An :class:`Arch` is the part of a BERT that the Bort search varies: depth D, attention heads A,
hidden size H and intermediate (FFN) size I, written ``D4-A8-H1024-I768``. A
:class:`ModelConfig` adds what a model family fixes (vocabulary, positions, token types, layer
norm eps, dropout). Presets name the shapes this project refers to (docs/BORT.md section
1).
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Callable, Iterable, Sequence

_ARCH_RE = re.compile(r"^D(\d+)-A(\d+)-H(\d+)-I(\d+)(?:-S(\d+))?$")


@dataclasses.dataclass(frozen=True, order=True)
class Arch:
  """A BERT shape <D, A, H, I>.

  Attributes:
    depth: number of encoder layers D.
    heads: attention heads A.
    hidden: hidden size H.
    intermediate: feed-forward size I.
    head_size: size of each attention head; defaults to ``hidden // heads``. A padded
      population shape may carry a head size that is not hidden / heads (see search/proxy.py).
  """

  depth: int
  heads: int
  hidden: int
  intermediate: int
  head_size: int | None = None

  def __post_init__(self):
    for name in ("depth", "heads", "hidden", "intermediate"):
      value = getattr(self, name)
      if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Arch.{name} must be a positive int, got {value!r}")
    if self.head_size is None:
      if self.hidden % self.heads:
        raise ValueError(
            f"hidden size {self.hidden} is not divisible by {self.heads} heads; "
            "pass head_size explicitly for such a shape")
      object.__setattr__(self, "head_size", self.hidden // self.heads)
    elif not isinstance(self.head_size, int) or self.head_size < 1:
      raise ValueError(f"Arch.head_size must be a positive int, got {self.head_size!r}")

  @property
  def attention_size(self) -> int:
    """Width of the query/key/value projections, heads * head_size."""
    return self.heads * self.head_size

  @property
  def tuple(self) -> tuple[int, int, int, int]:
    return (self.depth, self.heads, self.hidden, self.intermediate)

  def __str__(self) -> str:
    text = f"D{self.depth}-A{self.heads}-H{self.hidden}-I{self.intermediate}"
    if self.head_size * self.heads != self.hidden:
      text += f"-S{self.head_size}"
    return text

  @classmethod
  def parse(cls, text: str) -> "Arch":
    """Parses ``D4-A8-H1024-I768`` (optionally ``-S128`` for an explicit head size)."""
    match = _ARCH_RE.match(text.strip())
    if not match:
      raise ValueError(
          f"cannot parse architecture {text!r}; expected a string like 'D4-A8-H1024-I768' "
          f"or one of the presets {sorted(PRESETS)}")
    d, a, h, i, s = match.groups()
    return cls(int(d), int(a), int(h), int(i), int(s) if s else None)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A full model description: an :class:`Arch` plus the family's fixed fields.

  Attributes:
    arch: the searchable shape.
    family: "bert", "roberta" or "bort" (a BERT body with the RoBERTa vocabulary).
    vocab_size: rows of the word embedding table (and MLM decoder outputs).
    max_positions: rows of the position table.
    position_offset: added to position ids (RoBERTa: padding_idx + 1 = 2; BERT/Bort: 0).
    type_vocab_size: rows of the token-type table; 0 means no token-type embedding.
    pad_id: padding token id.
    layer_norm_eps: eps of the embedding and encoder LayerNorms.
    mlm_layer_norm_eps: eps of the MLM head's LayerNorm.
    activation: "gelu" (exact, erf) or "gelu_tanh".
    dropout: dropout on embeddings and hidden states.
    attention_dropout: dropout on attention probabilities.
    pooler: whether the model has a BERT pooler (dense + tanh on the first token).
    initializer_range: std of the normal initialiser.
  """

  arch: Arch
  family: str = "bert"
  vocab_size: int = 30522
  max_positions: int = 512
  position_offset: int = 0
  type_vocab_size: int = 2
  pad_id: int = 0
  layer_norm_eps: float = 1e-12
  mlm_layer_norm_eps: float = 1e-12
  activation: str = "gelu"
  dropout: float = 0.1
  attention_dropout: float = 0.1
  pooler: bool = True
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.family not in FAMILIES:
      raise ValueError(f"unknown model family {self.family!r}; known: {sorted(FAMILIES)}")
    if self.activation not in ("gelu", "gelu_tanh"):
      raise ValueError(f"unknown activation {self.activation!r}; use 'gelu' or 'gelu_tanh'")
    if self.vocab_size < 1 or self.max_positions < 1 or self.type_vocab_size < 0:
      raise ValueError("vocab_size and max_positions must be >= 1, type_vocab_size >= 0")
    if not 0 <= self.pad_id < self.vocab_size:
      raise ValueError(f"pad_id {self.pad_id} outside the vocabulary of {self.vocab_size}")

  @property
  def max_length(self) -> int:
    """Longest sequence the position table admits."""
    return self.max_positions - self.position_offset

  def replace(self, **changes) -> "ModelConfig":
    """A copy with fields changed; ``arch`` may be an Arch or a string."""
    if isinstance(changes.get("arch"), str):
      changes["arch"] = Arch.parse(changes["arch"])
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict:
    out = dataclasses.asdict(self)
    out["arch"] = str(self.arch)
    return out

  @classmethod
  def from_dict(cls, data: dict) -> "ModelConfig":
    data = dict(data)
    arch = data.pop("arch")
    if isinstance(arch, dict):
      arch = Arch(**arch)
    elif isinstance(arch, str):
      arch = Arch.parse(arch)
    return cls(arch=arch, **data)


FAMILIES = ("bert", "roberta", "bort")

# Family defaults: what a checkpoint of that family fixes besides its shape.
_BERT = dict(family="bert", vocab_size=30522, max_positions=512, position_offset=0,
             type_vocab_size=2, pad_id=0, layer_norm_eps=1e-12, mlm_layer_norm_eps=1e-12,
             pooler=True)
_ROBERTA = dict(family="roberta", vocab_size=50265, max_positions=514, position_offset=2,
                type_vocab_size=1, pad_id=1, layer_norm_eps=1e-5, mlm_layer_norm_eps=1e-5,
                pooler=True)
# Bort: RoBERTa vocabulary, 512 positions from 0, no token types (the HF port kept a 1-row
# table of zeros; we drop it), no pooler, encoder LN eps 1e-5 and MLM-head LN eps 1e-12.
_BORT = dict(family="bort", vocab_size=50265, max_positions=512, position_offset=0,
             type_vocab_size=0, pad_id=1, layer_norm_eps=1e-5, mlm_layer_norm_eps=1e-12,
             pooler=False)

FAMILY_DEFAULTS = {"bert": _BERT, "roberta": _ROBERTA, "bort": _BORT}

PRESETS: dict[str, ModelConfig] = {
    "bort": ModelConfig(Arch(4, 8, 1024, 768), **_BORT),
    "bort-paper": ModelConfig(Arch(4, 8, 768, 1024), **_BORT),
    "bert-base": ModelConfig(Arch(12, 12, 768, 3072), **_BERT),
    "bert-large": ModelConfig(Arch(24, 16, 1024, 4096), **_BERT),
    "roberta-base": ModelConfig(Arch(12, 12, 768, 3072), **_ROBERTA),
    "roberta-large": ModelConfig(Arch(24, 16, 1024, 4096), **_ROBERTA),
    # all-MiniLM-L6-v2: a 6-layer uncased BERT, 384 wide, 12 heads, FFN 1536.
    "minilm-l6-h384": ModelConfig(Arch(6, 12, 384, 1536), **_BERT),
}


def get_model_config(spec: str | Arch | ModelConfig, family: str = "bort",
                     **overrides) -> ModelConfig:
  """Resolves a preset name, an arch string or an Arch into a :class:`ModelConfig`.

  Args:
    spec: a preset name (``"bort"``), an arch string (``"D4-A8-H1024-I768"``), an Arch or a
      ModelConfig (returned with the overrides applied).
    family: family defaults used when ``spec`` is a bare shape.
    **overrides: ModelConfig fields to change (for example ``vocab_size``).
  """
  if isinstance(spec, ModelConfig):
    config = spec
  elif isinstance(spec, Arch):
    config = ModelConfig(spec, **_family(family))
  elif isinstance(spec, str) and spec in PRESETS:
    config = PRESETS[spec]
  elif isinstance(spec, str):
    config = ModelConfig(Arch.parse(spec), **_family(family))
  else:
    raise TypeError(f"cannot make a model config from {spec!r}")
  return config.replace(**overrides) if overrides else config


def _family(name: str) -> dict:
  if name not in FAMILY_DEFAULTS:
    raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILY_DEFAULTS)}")
  return FAMILY_DEFAULTS[name]


def heads_divide_hidden(arch: Arch) -> bool:
  """The paper's constraint: A divides H."""
  return arch.hidden % arch.heads == 0


@dataclasses.dataclass(frozen=True)
class SearchSpace:
  """A grid of BERT shapes filtered by constraints.

  Attributes:
    depth, heads, hidden, intermediate: the value sets.
    constraints: predicates an Arch must satisfy; the default keeps A | H.
  """

  depth: Sequence[int]
  heads: Sequence[int]
  hidden: Sequence[int]
  intermediate: Sequence[int]
  constraints: tuple[Callable[[Arch], bool], ...] = (heads_divide_hidden,)

  def __post_init__(self):
    for name in ("depth", "heads", "hidden", "intermediate"):
      values = tuple(getattr(self, name))
      if not values:
        raise ValueError(f"search space has no values for {name}")
      if any(not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"search space {name} values must be positive ints, got {values}")
      object.__setattr__(self, name, tuple(sorted(set(values))))

  def enumerate(self) -> list[Arch]:
    """Every shape of the grid that satisfies all constraints, in (D, A, H, I) order."""
    out = []
    for d, a, h, i in itertools.product(self.depth, self.heads, self.hidden, self.intermediate):
      if h % a:  # Arch needs an explicit head size otherwise; the constraint decides below.
        arch = Arch(d, a, h, i, head_size=max(1, h // a))
      else:
        arch = Arch(d, a, h, i)
      if all(c(arch) for c in self.constraints):
        out.append(arch)
    return out

  def __len__(self) -> int:
    return len(self.enumerate())

  def __iter__(self) -> Iterable[Arch]:
    return iter(self.enumerate())

  def __contains__(self, arch: Arch) -> bool:
    return arch in set(self.enumerate())

  @classmethod
  def paper(cls) -> "SearchSpace":
    """The space of docs/BORT.md section 2: 300 candidates."""
    return cls(depth=(2, 4, 6, 8, 10, 12), heads=(4, 8, 12, 16), hidden=(512, 768, 1024),
               intermediate=(256, 512, 768, 1024, 3072))
