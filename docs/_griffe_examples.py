"""Griffe extension: a Google-style `Example:` section is read as `Examples:`.

normjax's docstrings title their runnable example `Example:` (singular); griffe only knows
the plural as the examples section and would render the singular as a note, with the `>>>`
lines as nested quotes instead of a highlighted, copyable doctest.
"""

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class SingularExamples(griffe.Extension):
  """Renames the section before the docstring is parsed (parsing is lazy)."""

  def on_instance(self, *, obj, **kwargs):  # pylint: disable=unused-argument
    if obj.docstring is not None:
      obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
