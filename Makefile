# The two commands: `make repro` and `make test`. Both create .venv and install on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: repro test install clean-venv

# vlmlab itself is not installed: stages, tests and `python -m vlmlab.infer` import the checkout they
# run in (an editable install maps every clone sharing the venv to the first one); one that an older
# Makefile made is removed, and so is the `pynvml` wrapper package older requirements installed (its
# import warns on stderr; nvidia-ml-py provides the same module).
$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip uninstall -q -y vlmlab pynvml 2>/dev/null || true
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/dvc repro

test: $(STAMP)
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
