"""Write the code cells of every notebook in nbs/ as one .py file each under OUT (default: a new temp folder),
beside copies of bigmodel_nb/, bench/ and tests/, so that a duplicate-code scan sees notebooks and modules together:
    python3 scripts/extract_nb_code.py /tmp/scan && duplicates --repo /tmp/scan --most 40
Exported cells are left out (bigmodel_nb/ holds them already): only the notebooks' own code is extracted."""
import json, shutil, sys, tempfile
from pathlib import Path

root = Path(__file__).resolve().parent.parent
out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix='nbcode-'))
if out.exists(): shutil.rmtree(out)
for d in ('bigmodel_nb', 'bench', 'tests'): shutil.copytree(root/d, out/d, ignore=shutil.ignore_patterns('__pycache__', '*.md'))
(out/'nbs').mkdir(parents=True)
for nb in sorted((root/'nbs').glob('*.ipynb')):
    cells = json.loads(nb.read_text())['cells']
    code = [''.join(c['source']) for c in cells if c['cell_type'] == 'code']
    code = [s for s in code if not s.lstrip().startswith(('#| export', '#|export'))]
    (out/'nbs'/f'{nb.stem}.py').write_text('\n\n'.join(s.replace('\n%', '\n# %') for s in code) + '\n')
print(out)
