# The README's two set-up commands. Each installs what it needs first: a virtual environment in .venv
# (PyTorch pinned to the release on this machine's disk) and the Fashion-MNIST Debian package.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test data browser

$(VENV)/.base: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(BIN)/pip install -q -e '.[test]'
	touch $@

data:
	@test -f $(FMNIST) || { echo "installing Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	  $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

# Debian's Chromium and its driver, for the browser tests of `dinokit explore`; without them those tests skip.
browser:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || { \
	  echo "installing Chromium for the browser tests (Debian packages chromium, chromium-driver)"; \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
	    chromium-driver; } || echo "could not install chromium: the browser tests of dinokit explore will skip"; }

demo: $(VENV)/.base data
	$(BIN)/python -m dinokit demo

test: $(VENV)/.test data browser
	$(BIN)/python -m pytest -q
