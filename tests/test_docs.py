"""The documentation site documents every public name, and its pages are all reachable."""

import pathlib
import re

import pytest

import normjax
import normjax.linen
import normjax.nnx
from tests.helpers import slow_except

ROOT = pathlib.Path(__file__).resolve().parents[1]
API = ROOT / "docs" / "api"


def _documented(page):
  """The objects a reference page renders: its `::: dotted.name` mkdocstrings directives."""
  return set(re.findall(r"^::: ([\w.]+)\s*$", (API / page).read_text(), flags=re.M))


@pytest.mark.parametrize("module, page", [(normjax, "normjax.md"),
                                          (normjax.linen, "linen.md"),
                                          (normjax.nnx, "nnx.md")])
def test_api_reference_covers_every_public_name(module, page):
  public = {f"{module.__name__}.{name}" for name in module.__all__}
  documented = _documented(page)
  assert not public - documented, f"docs/api/{page} lacks {sorted(public - documented)}"
  assert not documented - public, (f"docs/api/{page} documents names outside "
                                   f"{module.__name__}.__all__: {sorted(documented - public)}")


def test_every_page_is_in_the_nav():
  nav = (ROOT / "mkdocs.yml").read_text()
  pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").glob("*.md")}
  pages |= {p.relative_to(ROOT / "docs").as_posix() for p in API.glob("*.md")}
  missing = sorted(p for p in pages if f": {p}" not in nav)
  assert not missing, f"pages missing from mkdocs.yml's nav: {missing}"


def test_version_agrees_with_pyproject():
  pyproject = (ROOT / "pyproject.toml").read_text()
  assert re.search(r'^version = "([^"]+)"', pyproject, flags=re.M)[1] == normjax.__version__


_PAGES_WITH_CODE = sorted(p.name for p in (ROOT / "docs").glob("*.md")
                          if "```python" in p.read_text())


# getting-started.md and todays-models.md compile many programs (their code is also exercised
# by tests/test_readme.py and the modules' own tests); CI runs them.
@pytest.mark.parametrize("page", slow_except(_PAGES_WITH_CODE, *[
    p for p in _PAGES_WITH_CODE if p not in ("getting-started.md", "todays-models.md")]))
def test_page_code_runs(page):
  """Every ```python block of a guide page runs, in order, in one namespace (the README's
  blocks that pages include are run by tests/test_readme.py)."""
  import jax  # pylint: disable=import-outside-toplevel
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / page).read_text(), flags=re.S)
  namespace = {}
  with jax.numpy_dtype_promotion("standard"), jax.numpy_rank_promotion("allow"):
    for block in blocks:
      exec(compile(block, page, "exec"), namespace)  # pylint: disable=exec-used
