#!/usr/bin/env bash
# The project's test command (what `make test` and .ci/run run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
bash scripts/install.sh
export MPLBACKEND=Agg PYTHONHASHSEED=0

echo "== 1/5 the package is what the notebooks export"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
cp -r bigmodel_nb "$tmp/before"
nbdev-export
if ! diff -r -q -x __pycache__ "$tmp/before" bigmodel_nb; then
  echo "FAIL: bigmodel_nb/ differed from what the notebooks export (nbdev-export has now rewritten it; commit the result)" >&2
  exit 1
fi

echo "== 2/5 the notebooks are clean"
before=$(cat nbs/*.ipynb | sha256sum)
nbdev-clean
if [ "$before" != "$(cat nbs/*.ipynb | sha256sum)" ]; then
  echo "FAIL: nbdev-clean changed notebooks (they are cleaned now; commit them):" >&2
  git status --short nbs >&2 || true
  exit 1
fi

echo "== 3/5 nbdev-test (cells flagged slow are skipped)"
nbdev-test --timing

echo "== 4/5 the docs build, warnings as errors"
bash docs/build.sh

echo "== 5/5 pytest"
$PY -m pytest tests/ -q -p no:cacheprovider
