"""Turn `nbs/*.ipynb` into the Sphinx sources under `docs/_src`.

- drops nbdev directives (`#| export`, `#| hide`, ...) and the cells they hide;
- adds the API reference (nbdev's `show_doc`, rendered to Markdown) after each exported cell, as nbdev's
  own docs processor does, so the notebooks stay free of `show_doc` boilerplate;
- gives the home page (`index.ipynb`) a hidden table of contents in chapter order;
- adds the benchmarks page from `bench/results/*.md`.
The saved outputs are kept as they are: the site shows what the notebooks printed when they were run.
"""
import importlib, re, shutil, sys
from pathlib import Path

import nbformat
from fastcore.nbio import read_nb
from nbdev.processors import _def_names
from nbdev.showdoc import show_doc

root = Path(__file__).resolve().parent.parent
nbs, src = root/'nbs', root/'docs'/'_src'
_source_link = re.compile(r'^\[source\]\(.*\)\{.*\}\s*$', re.M)
_directive = re.compile(r'^\s*#\|\s*([\w-]+):?\s*(.*?)\s*$')


def directives(source: str) -> tuple[dict, str]:
    "Split a code cell's leading `#|` directives from the rest of its source."
    lines, found = source.splitlines(), {}
    while lines and (m := _directive.match(lines[0])):
        found[m.group(1)] = m.group(2)
        lines.pop(0)
    return found, '\n'.join(lines).strip('\n')


def api_reference(cell_source: str, module) -> list[str]:
    "Markdown of `show_doc` for each public name an exported cell defines."
    cell = read_nb_cell(cell_source)
    docs = []
    for name in _def_names(cell, set()):
        obj = module
        try:
            for part in name.split('.'): obj = getattr(obj, part)
        except AttributeError: continue
        md = show_doc(obj, name=name)._repr_markdown_()
        docs.append(_source_link.sub('', md))  # the hosted repo's line anchors are unknown here: no dead links
    return docs


def read_nb_cell(source: str):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    tmp = src/'.cell.ipynb'
    nbformat.write(nb, tmp)
    try: return read_nb(tmp).cells[0]
    finally: tmp.unlink()


def convert(path: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    module, cells = None, []
    for cell in nb.cells:
        if cell.cell_type != 'code':
            cells.append(cell); continue
        d, body = directives(cell.source)
        if 'default_exp' in d:
            module = importlib.import_module(f"bigmodel_nb.{d['default_exp']}")
        if 'hide' in d or 'default_exp' in d and not body: continue
        if d.get('echo') == 'false' or d.get('include') == 'false':
            if d.get('include') == 'false' or not cell.get('outputs'): continue
            cell.metadata.setdefault('tags', []).append('remove-input')
        if d.get('output') == 'false': cell.outputs = []
        cell.source = body
        if body: cells.append(cell)
        if module is not None and {'export', 'exports'} & set(d):
            cells += [nbformat.v4.new_markdown_cell(md) for md in api_reference(body, module)]
    nb.cells = cells
    # nbdev-clean drops the kernel's language info; MyST-NB needs it to highlight the code cells
    nb.metadata['language_info'] = {'name': 'python', 'pygments_lexer': 'ipython3'}
    nb.metadata.setdefault('kernelspec', {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'})
    return nb


def main():
    if src.exists(): shutil.rmtree(src)
    src.mkdir(parents=True)
    chapters = sorted(p for p in nbs.glob('*.ipynb') if p.name != 'index.ipynb')
    for p in [nbs/'index.ipynb', *chapters]:
        nbformat.write(convert(p), src/p.name)
    pages = [p.stem for p in chapters]
    results = sorted((root/'bench'/'results').glob('*.md'))
    bench = ['# Benchmarks', '',
             'The latest tables printed by `make bench` (each script compares side by side in one process; '
             'see `bench/`). Each table names the machine it ran on.', '']
    for r in results: bench += [r.read_text(), '']
    if not results: bench += ['No benchmark has been recorded yet: run `make bench`.']
    (src/'benchmarks.md').write_text('\n'.join(bench))
    index = nbformat.read(src/'index.ipynb', as_version=4)
    toc = '\n'.join(['```{toctree}', ':hidden:', ':maxdepth: 1', '', *pages, 'benchmarks', '```'])
    index.cells.append(nbformat.v4.new_markdown_cell(toc))
    nbformat.write(index, src/'index.ipynb')
    print(f"docs: prepared {len(pages) + 1} notebooks and the benchmarks page in {src.relative_to(root)}")


if __name__ == '__main__': sys.exit(main())
