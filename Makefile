# The two commands of the README: `make run` and `make test`. Both set up everything they need first:
# Debian's ffmpeg (and espeak-ng for test speech, PostgreSQL for the fleet tests) through apt, then the virtual
# environment .venv/.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
SYSTEM_PACKAGES := ffmpeg espeak-ng postgresql
PYTEST_ARGS ?= -n 2

.PHONY: run test check setup system-deps bench clean install-service

run: setup
	$(VENV)/bin/audiodrop run $(if $(AUDIODROP_CONFIG),--config "$(AUDIODROP_CONFIG)")

test: setup
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The check gate (CI runs it before the tests): ruff on the code, pyflakes on tests and benchmarks, mypy strict.
check: setup
	$(VENV)/bin/ruff check daemon db migrations/env.py
	$(VENV)/bin/ruff check --select F tests bench
	$(VENV)/bin/mypy

setup: system-deps $(STAMP)

# Debian's ffmpeg: ffmpeg and ffprobe, security updates from the distribution, nothing downloaded at run time
# (see the README for why not a pip wheel).
system-deps:
	@missing=""; for tool in ffmpeg ffprobe espeak-ng; do command -v $$tool >/dev/null || missing=1; done; \
	compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing=1; \
	$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || missing=1; \
	if [ -n "$$missing" ]; then \
		echo "installing $(SYSTEM_PACKAGES) with apt-get"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends \
			$(SYSTEM_PACKAGES) python3-venv >/dev/null; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

# The system service, in one command (as root): code in /opt/audiodrop, user, config, key, unit, start.
# KEY_FILE=PATH: the Gemini API key is read from that file ("-": standard input); never GEMINI_API_KEY=... on the
# command line, where ps and the shell's history would keep it.
install-service:
	bash systemd/install.sh $(if $(KEY_FILE),--key-file "$(KEY_FILE)")

bench: setup
	$(VENV)/bin/python -m bench.run_all

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
