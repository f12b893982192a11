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

.PHONY: all lint test bench stress clean demo install uninstall

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

# Speed against a direct upsd session and a stunnel pair (bench/bench.py; figures in README.md).
bench:
	$(PYTHON) bench/bench.py

# Faults, load and hostile input, longer than `make test` (bench/stress.py).
stress:
	$(PYTHON) bench/stress.py

clean:
	rm -rf $(VENV) test/__pycache__ bench/__pycache__ __pycache__ bench/results

# The whole chain on loopback, in a temporary directory, in a few seconds:
# certificates, upsd (real NUT where installed), upsdTLS, upsmonTLS, upsc.
demo:
	$(PYTHON) test/demo.py

# `make install` [PREFIX=/usr/local] [DESTDIR=] [INITDIR=/etc/init.d]:
# the scripts into SBINDIR, the systemd units into UNITDIR (with SBINDIR and
# CONFDIR filled in), and *.conf.example files into CONFDIR; the options
# files themselves (upsdTLS.conf, upsmonTLS.conf) are never written.  SysV
# init scripts only when INITDIR is given.  Directories that exist keep their
# owner and mode (/etc/nut is root:nut 0750 on Debian).
PREFIX     ?= /usr/local
SBINDIR    ?= $(PREFIX)/sbin
SYSCONFDIR ?= /etc
CONFDIR    ?= $(SYSCONFDIR)/nut
UNITDIR    ?= $(PREFIX)/lib/systemd/system
INITDIR    ?=
UNITS       = upsdTLS.service upsmonTLS.service upsmonTLS@.service
EXAMPLES    = upsdTLS.conf.example upsmonTLS.conf.example
INITS       = upsdTLS upsmonTLS
SUBST       = sed -e 's|@SBINDIR@|$(SBINDIR)|g' -e 's|@CONFDIR@|$(CONFDIR)|g'

install:
	mkdir -p $(DESTDIR)$(SBINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(CONFDIR)
	install -m 0755 $(SCRIPTS) $(DESTDIR)$(SBINDIR)/
	for f in $(UNITS); do \
	    $(SUBST) dist/$$f > $(DESTDIR)$(UNITDIR)/$$f.tmp && chmod 0644 $(DESTDIR)$(UNITDIR)/$$f.tmp \
	    && mv -f $(DESTDIR)$(UNITDIR)/$$f.tmp $(DESTDIR)$(UNITDIR)/$$f || exit 1; done
	for f in $(EXAMPLES); do \
	    $(SUBST) dist/$$f > $(DESTDIR)$(CONFDIR)/$$f.tmp && chmod 0644 $(DESTDIR)$(CONFDIR)/$$f.tmp \
	    && mv -f $(DESTDIR)$(CONFDIR)/$$f.tmp $(DESTDIR)$(CONFDIR)/$$f || exit 1; done
ifneq ($(INITDIR),)
	mkdir -p $(DESTDIR)$(INITDIR)
	for f in $(INITS); do \
	    $(SUBST) dist/$$f.init > $(DESTDIR)$(INITDIR)/$$f.tmp && chmod 0755 $(DESTDIR)$(INITDIR)/$$f.tmp \
	    && mv -f $(DESTDIR)$(INITDIR)/$$f.tmp $(DESTDIR)$(INITDIR)/$$f || exit 1; done
endif

# Removes what `make install` wrote (same variables); options files,
# certificates and keys stay.
uninstall:
	rm -f $(addprefix $(DESTDIR)$(SBINDIR)/,$(SCRIPTS))
	rm -f $(addprefix $(DESTDIR)$(UNITDIR)/,$(UNITS))
	rm -f $(addprefix $(DESTDIR)$(CONFDIR)/,$(EXAMPLES))
ifneq ($(INITDIR),)
	rm -f $(addprefix $(DESTDIR)$(INITDIR)/,$(INITS))
endif
