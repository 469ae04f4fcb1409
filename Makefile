# The two set-up commands: `make demo` and `make test`. Both create .venv on first use.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.lmforge-installed
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: demo test install clean-workspace

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch first: the CPU wheel 2.13.0 on machines without a GPU, so nothing pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PIP) install --quiet "torch>=2.6,<2.15"; \
	else \
		$(PIP) install --quiet torch==2.13.0; \
	fi
	$(PIP) install --quiet -e ".[test,team]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lmforge demo

test: $(STAMP)
	$(PY) -m pytest -q

clean-workspace:
	rm -rf workspace
