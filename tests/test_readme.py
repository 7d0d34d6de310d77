"""The README's front door: two commands, the second what CI runs, every link alive.

Cheap guards of the promise a newcomer meets first: exactly two set-up commands (install and run
the demo; run the tests), `.ci/run` running exactly the second, and every relative link of the
README pointing at a file of the repository.
"""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
  with open(os.path.join(REPO, *parts), encoding="utf-8") as f:
    return f.read()


def test_two_commands_and_ci_runs_the_second():
  blocks = re.findall(r"```bash\n(.*?)```", _read("README.md"), re.S)
  assert len(blocks) == 2, blocks
  install, tests = (b.strip() for b in blocks)
  assert "pip install -e '.[test]'" in install and "bort-jax demo" in install
  ci_lines = [line.strip() for line in _read(".ci", "run").splitlines()
              if line.strip() and not line.startswith("#")]
  assert ci_lines[-1] == tests


def test_readme_is_a_front_door_and_its_links_resolve():
  text = _read("README.md")
  assert len(text.encode()) < 10_000  # results and studies live in docs/
  assert "PLACEHOLDER" not in text
  for target in re.findall(r"\]\(([^)#]+)\)", text):
    if not target.startswith("http"):
      assert os.path.exists(os.path.join(REPO, target)), target
