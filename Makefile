# Two commands do all set-up: `make serve` (PACS demo with OHIF) and `make test` (the whole suite).
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
# Test order: `random` (a new seed each run, printed in pytest's header), a seed to replay one, or `off`.
SHUFFLE ?= random
# Debian packages for the PACS and browser tests (tests/appcore/dicom/test_pacs.py, tests/appcore/dicom/test_dicom_proxy.py, tests/e2e)
# and PostgreSQL for --conf database_url (tests/appcore/test_projectdb_engines.py, test_postgres_servers.py):
# installed once per list (the stamp names the list's checksum, so a package added here is installed).
SYSDEPS_PKGS := orthanc orthanc-dicomweb chromium postgresql
SYSDEPS := $(VENV)/.sysdeps-$(shell echo "$(SYSDEPS_PKGS)" | md5sum | cut -c1-8)

# OHIF viewer (@ohif/app's built dist from the npm registry), pinned and checked; served at /ohif/.
OHIF_VERSION := 3.13.2
OHIF_SHA256 := b189d3963bfc58e9394a9db8c7be75d07beb029ec211dbb126d47b62969dd3f1
OHIF_DIST := viewers_config/ohif/dist
OHIF_STAMP := $(OHIF_DIST)/.installed-$(OHIF_VERSION)

.PHONY: venv serve serve-folder test lint demo bench clean pacs sysdeps ohif

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

# Orthanc loaded with the demo studies (in the background, stopped with the server), the server on
# it, OHIF at http://$(HOST):$(PORT)/ohif/ with the labeling panel in its segmentation mode.
serve: $(STAMP) $(SYSDEPS) $(OHIF_STAMP)
	@mkdir -p pacs; set -m; $(VPY) -m appcore.dicom.pacs --storage pacs/storage --port $(PACS_PORT) --shared $(SHARED) \
		> pacs/orthanc.log 2>&1 & pacs=$$!; trap "kill -TERM $$pacs 2>/dev/null; wait $$pacs" EXIT; \
	until grep -q "Orthanc is serving DICOMweb" pacs/orthanc.log; do \
		kill -0 $$pacs 2>/dev/null || { cat pacs/orthanc.log; exit 1; }; sleep 1; done; \
	echo "PACS: http://127.0.0.1:$(PACS_PORT)/dicom-web (log: pacs/orthanc.log)"; \
	echo "Open http://$(HOST):$(PORT)/ohif/ , open a study in the Segmentation mode, then press Next case"; \
	MONAI_LABEL_TRACKING_ENABLED=false $(VENV)/bin/monailabel start_server --app apps/radiology \
		--studies http://127.0.0.1:$(PACS_PORT)/dicom-web --conf models $(MODELS) --host $(HOST) --port $(PORT)

# The same server on a folder of NIfTI images (no PACS, no OHIF labeling): 3D Slicer's way.
serve-folder: $(STAMP)
	@test -d "$(STUDIES)" || $(VPY) -m research.radiology.demo --source $(SHARED)/hippocampus_mr --dest $(STUDIES)
	MONAI_LABEL_TRACKING_ENABLED=false $(VENV)/bin/monailabel start_server --app apps/radiology \
		--studies $(STUDIES) --conf models $(MODELS) --host $(HOST) --port $(PORT)

ohif: $(OHIF_STAMP)
$(OHIF_STAMP):
	rm -rf $(OHIF_DIST) work/ohif-pack && mkdir -p $(OHIF_DIST) work/ohif-pack
	cd work/ohif-pack && npm pack --silent @ohif/app@$(OHIF_VERSION)
	echo "$(OHIF_SHA256)  work/ohif-pack/ohif-app-$(OHIF_VERSION).tgz" | sha256sum -c -
	tar -xzf work/ohif-pack/ohif-app-$(OHIF_VERSION).tgz -C $(OHIF_DIST) --strip-components=2 package/dist
	rm -rf work/ohif-pack
	touch $(OHIF_STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP) $(SYSDEPS) $(OHIF_STAMP)
	$(VENV)/bin/ruff check .
	MONAI_LABEL_TRACKING_ENABLED=false $(VPY) -m pytest -ra --durations=15 --shuffle $(SHUFFLE)

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
