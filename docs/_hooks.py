"""MkDocs hook: a page's `<!-- plots: DIR -->` marker becomes an image per PNG in `docs/DIR`.

The plots of a committed run (e.g. the claims lab's, in docs/claims/) change names and number
with the run; listing the directory at build time keeps the page in step with it.
"""

import pathlib
import re

_MARKER = re.compile(r"<!-- plots: ([\w/.-]+) -->")


def on_page_markdown(markdown, page, config, files):  # pylint: disable=unused-argument
  """Replaces each marker with the directory's PNGs, linked relative to the page."""
  docs = pathlib.Path(config["docs_dir"])
  page_dir = (docs / page.file.src_path).parent

  def plots(match):
    folder = docs / match.group(1)
    images = sorted(folder.glob("*.png"))
    if not images:
      return f"*(no plots in `docs/{match.group(1)}` yet)*"
    return "\n\n".join(
        f"![{p.stem.replace('_', ' ')}]({p.relative_to(page_dir).as_posix()})"
        f"{{ loading=lazy }}" for p in images)

  return _MARKER.sub(plots, markdown)
