#!/usr/bin/env bash
# Build the docs site into docs/_build/html from the notebooks' saved outputs (Sphinx + MyST-NB),
# with warnings as errors. Quarto is not used (it cannot be installed offline).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
# 1. MathJax, bundled locally from the npm registry (once).
if [ ! -f _static/mathjax/tex-chtml.js ]; then
  echo "docs: fetching mathjax@3 from the npm registry (once)"
  npm install --silent --no-save --no-audit --no-fund --prefix .npm mathjax@3 >/dev/null
  mkdir -p _static/mathjax && cp -r .npm/node_modules/mathjax/es5/. _static/mathjax/
  rm -rf .npm
fi
# 2. Notebooks -> docs/_src (nbdev directives dropped, API reference added after each exported cell).
$PY prepare.py
# 3. Sphinx, warnings as errors.
$PY -m sphinx -b html -W --keep-going -q -c . _src _build/html
echo "docs: built $(ls _build/html/*.html | wc -l) pages into docs/_build/html"
