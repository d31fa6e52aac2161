"""The README's commands are the ones CI runs, and its quickstart runs."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _bash_blocks(text):
  return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def test_readme_test_command_is_what_ci_runs():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text()
  commands = [line for block in _bash_blocks(readme) for line in block.splitlines()
              if "pytest" in line]
  assert commands, "README has no test command"
  assert commands[0].strip() in ci, "README's test command differs from .ci/run's"


def test_readme_quickstart_runs():
  """Every ```python block of the README runs, in order, in one namespace."""
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
  assert blocks, "README has no python quickstart"
  namespace = {}
  import jax
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for block in blocks:
      exec(compile(block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
