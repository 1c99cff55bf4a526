# Set-up and everyday commands. `make quickstart` and `make test` install on first use.
PYTHON ?= python3
PLAIT := $(PYTHON) -m plait.trainer
STAMP := .install-stamp
# A CPU build of torch lies on local disk here; a bare `torch` requirement would pull a multi-GB CUDA build.
CPU_TORCH := torch==2.13.0

.PHONY: install quickstart test gpu-check clean

$(STAMP): setup.py
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: torch comes from setup.py's requirement"; \
	else \
		$(PYTHON) -m pip install "$(CPU_TORCH)"; \
	fi
	$(PYTHON) -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(PLAIT) train configs/quickstart.yaml

test: $(STAMP)
	$(PYTHON) -m pytest

# On a CUDA machine: every fast path against its reference, then 50 training steps of the ~1B example on one GPU;
# one JSON line (tokens/s, MFU, step time, peak memory, host syncs). Refuses (exit 2) without CUDA.
gpu-check: $(STAMP)
	$(PYTHON) launch/gpu_check.py

clean:
	rm -rf $(STAMP) .plait runs .pytest_cache
