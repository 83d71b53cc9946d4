# Every target installs what it needs into .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo serve test lint format typecheck browser eval bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Without a CUDA driver, take the CPU build of torch (an unpinned torch pulls GBs of CUDA).
	command -v nvidia-smi >/dev/null 2>&1 || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/samkv demo

serve: $(STAMP)
	$(VENV)/bin/samkv serve

# Debian's Chromium for the browser test; the test skips with a reason where it cannot be installed.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser test will be skipped"; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) tools/check_module_size.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) browser lint typecheck
	$(PY) -m pytest -q
	@test -z "$$(git status --porcelain 2>/dev/null)" || { echo "tests left the tree dirty:"; git status --porcelain; exit 1; }

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf $(VENV) build *.egg-info test-artifacts
