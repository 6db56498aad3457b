"""Write README.md from nbs/index.ipynb (nbconvert; Quarto is not available), with chapter links pointing into nbs/.
`python scripts/readme.py --check` exits 1 when README.md is stale."""
import re, sys
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter

ROOT = Path(__file__).resolve().parent.parent


def render() -> str:
    nb = nbformat.read(ROOT/'nbs'/'index.ipynb', as_version=4)
    # `nbdev-clean` drops the kernel's language_info; without it the code fences lose their `python` tag
    nb.metadata.setdefault('language_info', {'name': 'python'})
    md, _ = MarkdownExporter().from_notebook_node(nb)
    return re.sub(r'\]\((\d\d[a-z]?_\w+\.ipynb)\)', r'](nbs/\1)', md)


if __name__ == '__main__':
    readme = ROOT/'README.md'
    if '--check' in sys.argv:
        if readme.read_text() != render(): sys.exit('README.md is stale: run `make readme`')
    else: readme.write_text(render())
