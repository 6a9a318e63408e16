# fusionpipe: `make test` on a fresh machine builds the venv, installs, runs the suite.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
RECIPE ?= stages/ablation.yaml
# CPU build of torch; GPU users install their own torch into the venv first (the pin-free
# requirement in pyproject.toml accepts it): `make venv TORCH=` skips the pin.
TORCH  ?= torch==2.13.0

.PHONY: venv test quick demo ablation bench clean
FP     := $(VENV)/bin/fusionpipe

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(if $(TORCH),$(PY) -m pip install -q "$(TORCH)")
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q

# Everything but the tests marked slow (LocalCluster, torchrun, SIGKILLs, whole CLI runs): a check while editing.
quick: venv
	$(PY) -m pytest -q -m "not slow"

# The whole pipeline on the bundled corpus with two toy upstreams, on a CPU, in minutes.
demo: venv
	$(FP) extract --model toy-wavlm,toy-whisper
	$(FP) fuse --stores cache/demo-train/toy-wavlm.zarr,cache/demo-train/toy-whisper.zarr --merge concat --describe
	$(FP) train --fusion hconv --merge concat --out runs/demo --resume
	$(FP) evaluate runs/demo
	$(FP) predict runs/demo fusionpipe/corpus/audio/en-m6-neutral-0001.flac

# A recipe's grid: extract what is missing, train every variant, write results/<name>/.
ablation: venv
	$(FP) ablate $(RECIPE)

bench: venv
	$(PY) bench/extract.py
	$(PY) bench/fuse.py
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) .pytest_cache
