"""Write README.md from nbs/index.ipynb (nbconvert; Quarto is not available), with chapter links pointing into nbs/.
`python scripts/readme.py --check` exits 1 when README.md is stale."""
import re, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def render() -> str:
    md = subprocess.run(['jupyter', 'nbconvert', '--to', 'markdown', '--log-level', 'WARN', '--stdout',
                         str(ROOT/'nbs'/'index.ipynb')], capture_output=True, text=True, check=True).stdout
    return re.sub(r'\]\((\d\d_\w+\.ipynb)\)', r'](nbs/\1)', md)


if __name__ == '__main__':
    readme = ROOT/'README.md'
    if '--check' in sys.argv:
        if readme.read_text() != render(): sys.exit('README.md is stale: run `make readme`')
    else: readme.write_text(render())
