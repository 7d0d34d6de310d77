"""``bort-jax finetune``: the fine-tuning modes, chosen by the config.

Three modes share one config (``configs/finetune.py``), the input checks of ``prepare.py`` and
the fine-tuned model format of ``setup.save_finetuned``; none of them imports another:

| mode | chosen by | module |
|---|---|---|
| one model | the default | ``loop.py`` |
| a population of seeds x settings, one compiled program | ``population.seeds > 0`` | ``population_mode.py`` |
| Agora's rounds of populations | ``agora.enabled`` | ``agora.py`` |

    bort-jax finetune --config=configs/finetune.py:task=demo/movie_sentiment --workdir=runs/ft
    bort-jax finetune --config=configs/finetune.py:task=demo/movie_sentiment,seeds=3 ...
"""

from __future__ import annotations

import ml_collections

from bort_jax.finetune import agora, loop, population_mode

MODES = {"single": loop.run, "population": population_mode.run, "agora": agora.run}


def mode_of(config: ml_collections.ConfigDict) -> str:
  """Which fine-tuning mode ``config`` asks for (Agora before a population: it runs them)."""
  if "agora" in config and config.agora.enabled:
    return "agora"
  if "population" in config and config.population.seeds:
    return "population"
  return "single"


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the mode ``config`` asks for in ``workdir``; returns its results."""
  return MODES[mode_of(config)](config, workdir)
