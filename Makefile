# Two commands do everything on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# Pinned torch. A bare "torch" requirement would pull the newest multi-GB CUDA build. timm needs
# torchvision, and PyPI's torchvision imports only beside torch 2.14.1 (not the 2.13.0 CPU
# build), so the pinned pair is installed together (both come from this machine's local disk).
TORCH   ?= torch==2.14.1 torchvision==0.29.1
# setup.cfg accepts transformers 4.40-5.x (a GPU image ships 5.x); tests and CI run on this one.
TRANSFORMERS ?= transformers==4.57.6
# setup.cfg accepts OpenCV >= 4.8; the demo collection is drawn with OpenCV's warps and JPEG
# writer, whose pixels differ between releases (5.0 and 5.1 give different demo numbers,
# benchmarks/RESULTS.md), so `make` installs the release the recorded numbers were made with.
OPENCV ?= opencv-python-headless==5.1.0.95
DEMO_OUT ?= demo_out

.PHONY: install demo test lint format clean chromium

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(BIN)/python
	@# Never reinstall a working torch: only install the pin when torch does not import.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,ray]" "$(TRANSFORMERS)" "$(OPENCV)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/locore demo --out $(DEMO_OUT)

# The browser test (tests/test_serve_browser.py) drives Debian's chromium: no browser download.
chromium:
	@command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y chromium; }

test: $(STAMP) chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(DEMO_OUT) .cache
