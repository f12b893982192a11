# NUT TLS shims.  `make` lints, `make test` runs the loopback tests.
# Nothing here is needed at run time: the scripts are standalone.

PYTHON  ?= python3
SCRIPTS  = upsdTLS.py upsmonTLS.py mkNUTcert.py
LINTED   = $(SCRIPTS) $(wildcard test/*.py bench/*.py)
VENV     = .venv

# Use a pylint on PATH when there is one; otherwise install the pinned
# version from requirements-dev.txt into a git-ignored virtual environment.
PYLINT  := $(shell command -v pylint 2>/dev/null)
ifeq ($(PYLINT),)
PYLINT   = $(VENV)/bin/pylint
LINTDEP  = $(VENV)/bin/pylint
endif

.PHONY: all lint test bench stress clean

all: lint

lint: $(LINTDEP)
	$(PYLINT) --rcfile=.pylintrc $(LINTED)

$(VENV)/bin/pylint: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements-dev.txt
	touch $@

# Loopback tests.  Real NUT is used when installed; NUTTLS_REQUIRE_NUT=1
# (set by .ci/run) turns a missing NUT into a failure instead of a skip.
test:
	$(PYTHON) -m unittest discover -s test -t test -v

# Speed against a direct upsd session and a stunnel pair (bench/README).
bench:
	$(PYTHON) bench/bench.py

# Faults, load and hostile input, longer than `make test` (bench/stress.py).
stress:
	$(PYTHON) bench/stress.py

clean:
	rm -rf $(VENV) test/__pycache__ bench/__pycache__ __pycache__ bench/results
