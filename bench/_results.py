"""What every benchmark does last: print its Markdown, and write it under a title to bench/results/NAME.md
(the docs' benchmarks page collects those files). The scripts run as `python bench/NAME.py`, so this folder is on
`sys.path` and they import it as `from _results import write_results`."""
from pathlib import Path

from bigmodel_nb.concepts import atomic_write

RESULTS = Path(__file__).resolve().parent / 'results'


def write_results(name: str, title: str, body: str, out=None, show: bool = True) -> Path:
    "Print `body` (when `show`) and write `# title` + `body` to `out` (default bench/results/NAME.md), atomically; returns the path."
    if show: print(body)
    out = Path(out) if out else RESULTS / f'{name}.md'
    with atomic_write(out) as tmp: tmp.write_text(f'# {title}\n\n{body.strip()}\n')  # an interrupted run leaves the last table whole
    print(f'\nwrote {out}')
    return out
