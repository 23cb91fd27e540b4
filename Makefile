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
# torch build: `cuda` where an NVIDIA driver answers, else `cpu` (requirements-torch-*.txt say why).
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)
STAMP := $(VENV)/.installed-$(TORCH)
PACS_PORT ?= 8042
# Debian packages for the PACS and browser tests (tests/appcore/test_pacs.py, tests/appcore/test_dicom_proxy.py, tests/e2e): installed once.
SYSDEPS := $(VENV)/.sysdeps
SYSDEPS_PKGS := orthanc orthanc-dicomweb chromium

.PHONY: venv serve test lint demo bench clean pacs sysdeps

# Idempotent: reinstalls only when a requirements file or pyproject.toml changed.
venv: $(STAMP)
$(STAMP): requirements.txt requirements-dev.txt requirements-torch-$(TORCH).txt pyproject.toml
	test -x $(VPY) || $(PY) -m venv $(VENV)
	rm -f $(VENV)/.installed-*
	$(VPY) -m pip install --quiet -r requirements-torch-$(TORCH).txt -r requirements-dev.txt
	# A torchvision left from a CUDA install does not import beside the CPU torch (and breaks `import monai`).
	if [ "$(TORCH)" = cpu ]; then $(VPY) -m pip uninstall --quiet -y torchvision; fi
	# monailabel's own metadata pulls sam2 (whose build downloads a CUDA torch) and mlflow: see requirements.txt
	$(VPY) -m pip install --quiet --no-deps monailabel==0.8.5
	$(VPY) -m pip install --quiet --no-deps -e .
	# The launcher script runs `python` from PATH; make it use this environment's interpreter.
	sed -i 's|^PYEXE=$${MONAILABEL_PYEXE:-python}$$|PYEXE=$${MONAILABEL_PYEXE:-$(abspath $(VPY))}|' $(VENV)/bin/monailabel
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m research.radiology.demo --source $(SHARED)/hippocampus_mr --dest $(STUDIES)

serve: $(STAMP)
	@test -d "$(STUDIES)" || $(VPY) -m research.radiology.demo --source $(SHARED)/hippocampus_mr --dest $(STUDIES)
	MONAI_LABEL_TRACKING_ENABLED=false $(VENV)/bin/monailabel start_server --app apps/radiology \
		--studies $(STUDIES) --conf models $(MODELS) --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) $(SYSDEPS)
	$(VENV)/bin/ruff check .
	MONAI_LABEL_TRACKING_ENABLED=false $(VPY) -m pytest -ra --durations=15

sysdeps: $(SYSDEPS)
$(SYSDEPS): | $(STAMP)
	@if dpkg -s $(SYSDEPS_PKGS) >/dev/null 2>&1; then echo "system packages present: $(SYSDEPS_PKGS)"; \
	else apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(SYSDEPS_PKGS); fi
	touch $(SYSDEPS)

# Orthanc on 127.0.0.1:$(PACS_PORT) (DICOMweb at /dicom-web), storage in pacs/storage, loaded with the
# real series of $(SHARED)/dicom and three hippocampus cases as MR series. Runs in the foreground.
pacs: $(STAMP) $(SYSDEPS)
	$(VPY) -m appcore.dicom.pacs --storage pacs/storage --port $(PACS_PORT) --shared $(SHARED)

bench: $(STAMP)
	$(VPY) -m benchmarks.radiology --shared $(SHARED)

clean:
	rm -rf $(VENV) demo_studies apps/radiology/model
