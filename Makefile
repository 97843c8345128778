# Both targets do all their own set-up on a fresh machine.
PY      ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
TORCH   := torch==2.13.0
STAMP_RUN  := $(VENV)/.installed-run
STAMP_TEST := $(VENV)/.installed-test

.PHONY: run test install install-dev clean

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

# torch first, pinned, so pip takes the CPU wheel on disk instead of a multi-GB CUDA build;
# pyproject only asks torch>=2.6, so GPU users keep their own build.
$(STAMP_RUN): $(VPY) pyproject.toml
	$(VPY) -c "import torch" 2>/dev/null || $(VPY) -m pip install -q $(TORCH)
	$(VPY) -m pip install -q -e ".[demo]"
	touch $@

$(STAMP_TEST): $(STAMP_RUN)
	$(VPY) -m pip install -q -e ".[demo,dev]"
	touch $@

install: $(STAMP_RUN)
install-dev: $(STAMP_TEST)

run: $(STAMP_RUN)
	$(VPY) -m gemmaforge train

test: $(STAMP_TEST)
	$(VPY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
