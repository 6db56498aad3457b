# The README's two commands: `make demo` (the main job) and `make test` (what CI runs).
PY ?= python3
.PHONY: install demo test export docs docs-serve bench readme

install:
	bash scripts/install.sh

demo: install
	bigmodel-nb lifecycle

test:
	bash scripts/test.sh

export:
	nbdev-export && nbdev-clean

docs:
	bash docs/build.sh

docs-serve: docs
	$(PY) -m http.server 8000 --bind 127.0.0.1 --directory docs/_build/html

bench: install
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

readme:
	$(PY) scripts/readme.py
