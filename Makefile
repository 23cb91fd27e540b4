# Two commands do all set-up: `make serve` (demo server) and `make test` (the whole suite).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SHARED ?= ../shared/data
STUDIES ?= demo_studies/hippocampus_mr
MODELS ?= hippocampus,organs_ct
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: venv serve test lint demo bench clean

# Idempotent: reinstalls only when a requirements file or pyproject.toml changed.
venv: $(STAMP)
$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install --quiet -r requirements-dev.txt
	# monailabel's own metadata pulls sam2 (whose build downloads a CUDA torch) and mlflow: see requirements.txt
	$(VPY) -m pip install --quiet --no-deps monailabel==0.8.5
	$(VPY) -m pip install --quiet --no-deps -e .
	# The launcher script runs `python` from PATH; make it use this environment's interpreter.
	sed -i 's|^PYEXE=$${MONAILABEL_PYEXE:-python}$$|PYEXE=$${MONAILABEL_PYEXE:-$(abspath $(VPY))}|' $(VENV)/bin/monailabel
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m radiology.demo --source $(SHARED)/hippocampus_mr --dest $(STUDIES)

serve: $(STAMP)
	@test -d "$(STUDIES)" || $(VPY) -m radiology.demo --source $(SHARED)/hippocampus_mr --dest $(STUDIES)
	MONAI_LABEL_TRACKING_ENABLED=false $(VENV)/bin/monailabel start_server --app apps/radiology \
		--studies $(STUDIES) --conf models $(MODELS) --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	MONAI_LABEL_TRACKING_ENABLED=false $(VPY) -m pytest -ra --durations=15

bench: $(STAMP)
	$(VPY) -m benchmarks.radiology --shared $(SHARED)

clean:
	rm -rf $(VENV) demo_studies apps/radiology/model
