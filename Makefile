# Run the demo or the tests from a checkout, setting up whatever is missing first (README, first screen):
#
#   make demo                      as root: the Debian packages, .venv and the editable install, then `web-ipt-d -demo`
#   make test                      as root: the same plus the test packages, then ruff, mypy and the whole suite
#   make test PYTEST_ARGS='-x -k tls'   ... passing arguments to pytest
#
# The set-up is keyed on a stamp in .venv: it runs again only when pyproject.toml or debian-packages.txt
# changes (or .venv is removed). It installs missing Debian packages only as root.
#
# Install web-ipt-d as a systemd service: see docs/service.md, "Install".
#
#   make install                   as root, from a checkout: the venv, units, config, user
#   make install DESTDIR=/tmp/pkg  stage everything for a package; touches nothing live
#   make uninstall                 remove what install put in place, except config, state and logs
#
# Offline (no package index): build a wheelhouse where there is one, then
#   PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheelhouse make install
# (pip reads both from the environment).

PREFIX      ?= /opt/web-ipt-d
SYSCONFDIR  ?= /etc
UNITDIR     ?= $(SYSCONFDIR)/systemd/system
SYSUSERSDIR ?= $(SYSCONFDIR)/sysusers.d
TMPFILESDIR ?= $(SYSCONFDIR)/tmpfiles.d
MODULESDIR  ?= $(SYSCONFDIR)/modules-load.d
BINDIR      ?= /usr/local/sbin
# The system's Python: the service cannot see a Python under /root or /home (ProtectHome=yes).
PYTHON      ?= /usr/bin/python3
USER_NAME   := web-ipt-d
NFTABLES_PY ?= /usr/lib/python3/dist-packages/nftables

SRC  := $(patsubst %/,%,$(dir $(abspath $(lastword $(MAKEFILE_LIST)))))
VENV := $(DESTDIR)$(PREFIX)
CONF := $(DESTDIR)$(SYSCONFDIR)/web-ipt-d
# Units and config name the default paths; installing rewrites them for PREFIX and SYSCONFDIR.
RENDER := sed -e 's|/opt/web-ipt-d|$(PREFIX)|g' -e 's|/etc/web-ipt-d|$(SYSCONFDIR)/web-ipt-d|g'

.PHONY: all demo test lint install install-venv install-files install-live uninstall
# install-live changes files install-files makes: the steps run in order even under make -j.
.NOTPARALLEL:

all:
	@echo "make demo, make test, make install [DESTDIR=...] [PREFIX=$(PREFIX)], or make uninstall; see README"

# The checkout's own venv, for the demo and the tests (make install makes its own, in PREFIX).
DEV_VENV    := $(SRC)/.venv
PACKAGES    := $(SRC)/debian-packages.txt
# debian-packages.txt: "package group why"; `make demo` needs the `run` group, `make test` both.
DEBS_RUN     = $(shell awk '!/^#/ && $$2 == "run" {print $$1}' $(PACKAGES))
DEBS_TEST    = $(shell awk '!/^#/ && ($$2 == "run" || $$2 == "test") {print $$1}' $(PACKAGES))
PYTEST_ARGS ?=

demo: $(DEV_VENV)/.stamp-demo
	$(DEV_VENV)/bin/web-ipt-d -demo

test: lint
	cd $(SRC) && $(DEV_VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Both checks read their settings from pyproject.toml; ruff: src, tests and bench, mypy: src.
lint: $(DEV_VENV)/.stamp-test
	cd $(SRC) && $(DEV_VENV)/bin/ruff check --quiet src tests bench
	cd $(SRC) && $(DEV_VENV)/bin/mypy

$(DEV_VENV)/.stamp-demo: $(SRC)/pyproject.toml $(PACKAGES)
	$(call dev_setup,$(DEBS_RUN),$(SRC))
	touch $@

# The test set-up is a superset of the demo's: it stamps both.
$(DEV_VENV)/.stamp-test: $(SRC)/pyproject.toml $(PACKAGES)
	$(call dev_setup,$(DEBS_TEST),$(SRC)[test])
	touch $@ $(DEV_VENV)/.stamp-demo

# $(call dev_setup,DEBIAN PACKAGES,PIP TARGET): install the Debian packages that are missing, then
# make the venv if there is none, install the checkout into it (editable), and link Debian's nftables binding.
# Package scripts must not start services while installing: fail2ban would run, and ban, in this host's
# own network namespace (the tests run their own fail2ban-server inside a namespace). So, unless a
# policy-rc.d is in place already (as .ci/run puts one), one stands in for the install, and a fail2ban
# installed by this step is left disabled as well as stopped.
define dev_setup
	@missing=""; for deb in $(1); do \
		dpkg-query -W -f='$${db:Status-Status}' $$deb 2>/dev/null | grep -qx installed || missing="$$missing $$deb"; \
	done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "missing Debian packages:$$missing; run make as root to install them" >&2; exit 1; \
		fi; \
		echo "installing Debian packages:$$missing"; \
		if [ ! -e /usr/sbin/policy-rc.d ]; then \
			trap 'rm -f /usr/sbin/policy-rc.d' EXIT; \
			printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d; \
		fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing >/dev/null || exit 1; \
		case " $$missing " in *" fail2ban "*) \
			systemctl disable --quiet fail2ban.service 2>/dev/null || true;; \
		esac; \
	fi
	@# A current pip: Debian 12's (23.0) builds sdists such as python-iptables through a deprecated setup.py path.
	test -x $(DEV_VENV)/bin/python || { $(PYTHON) -m venv $(DEV_VENV) && \
		$(DEV_VENV)/bin/python -m pip install --disable-pip-version-check --quiet --upgrade pip; }
	$(DEV_VENV)/bin/python -m pip install --disable-pip-version-check --quiet --editable '$(2)'
	@# The nftables backend uses libnftables' own binding, which only Debian's python3-nftables ships.
	if [ -d $(NFTABLES_PY) ]; then \
		ln -sfn $(NFTABLES_PY) "$$($(DEV_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nftables"; \
	fi
endef

install: install-venv install-files install-live

install-venv:
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@# The nftables backend uses libnftables' own binding, which only Debian's python3-nftables ships.
	if [ -d $(NFTABLES_PY) ]; then \
		ln -sfn $(NFTABLES_PY) "$$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nftables"; \
	fi
ifeq ($(DESTDIR),)
	$(VENV)/bin/python -m pip install --disable-pip-version-check --upgrade $(SRC)
else
	$(VENV)/bin/python -m pip install --disable-pip-version-check --upgrade --no-compile $(SRC)
	@# The venv was built at $(VENV) but runs from $(PREFIX): fix its scripts and bytecode paths.
	grep -rlI -- '$(VENV)' $(VENV)/bin $(VENV)/pyvenv.cfg | xargs sed -i -e 's|$(VENV)|$(PREFIX)|g'
	$(VENV)/bin/python -m compileall -q -f -s $(DESTDIR) -p / $(VENV)/lib
endif

install-files:
	install -d -m 0755 $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(TMPFILESDIR) \
		$(DESTDIR)$(MODULESDIR) $(DESTDIR)$(BINDIR) $(DESTDIR)$(SYSCONFDIR)/logrotate.d
	for unit in web-ipt-d.socket web-ipt-d.service; do \
		$(RENDER) $(SRC)/systemd/$$unit > $(DESTDIR)$(UNITDIR)/$$unit.tmp && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$unit.tmp && \
		mv $(DESTDIR)$(UNITDIR)/$$unit.tmp $(DESTDIR)$(UNITDIR)/$$unit || exit 1; \
	done
	install -m 0644 $(SRC)/systemd/sysusers.d/web-ipt-d.conf $(DESTDIR)$(SYSUSERSDIR)/web-ipt-d.conf
	install -m 0644 $(SRC)/systemd/tmpfiles.d/web-ipt-d.conf $(DESTDIR)$(TMPFILESDIR)/web-ipt-d.conf
	install -m 0644 $(SRC)/systemd/modules-load.d/web-ipt-d.conf $(DESTDIR)$(MODULESDIR)/web-ipt-d.conf
	install -m 0644 $(SRC)/logrotate/web-ipt-d $(DESTDIR)$(SYSCONFDIR)/logrotate.d/web-ipt-d
	if [ -f $(SRC)/fail2ban/action.d/web-ipt-d.conf ]; then \
		install -D -m 0644 $(SRC)/fail2ban/action.d/web-ipt-d.conf \
			$(DESTDIR)$(SYSCONFDIR)/fail2ban/action.d/web-ipt-d.conf; fi
	if [ -f $(SRC)/fail2ban/action.d/web-ipt-d-multiport.conf ]; then \
		install -D -m 0644 $(SRC)/fail2ban/action.d/web-ipt-d-multiport.conf \
			$(DESTDIR)$(SYSCONFDIR)/fail2ban/action.d/web-ipt-d-multiport.conf; fi
	ln -sfn $(PREFIX)/bin/web-ipt-d $(DESTDIR)$(BINDIR)/web-ipt-d
	@# The config holds password hashes: readable by root and the service's group only.
	install -d -m 0750 $(CONF)
	if [ -e $(CONF)/config.yaml ]; then \
		echo "keeping the existing $(CONF)/config.yaml"; \
	else \
		$(RENDER) $(SRC)/etc/config.yaml > $(CONF)/config.yaml.tmp && chmod 0640 $(CONF)/config.yaml.tmp && \
		mv $(CONF)/config.yaml.tmp $(CONF)/config.yaml; \
	fi

# Only on the live system (no DESTDIR): the user, group ownership, the lock file, systemd.
install-live:
ifeq ($(DESTDIR),)
	if command -v systemd-sysusers >/dev/null; then \
		systemd-sysusers $(SYSUSERSDIR)/web-ipt-d.conf; \
	elif ! getent passwd $(USER_NAME) >/dev/null; then \
		useradd --system --user-group --home-dir /var/lib/web-ipt-d --no-create-home \
			--shell /usr/sbin/nologin --comment "web-ipt-d HTTPS firewall API" $(USER_NAME); \
	fi
	chgrp $(USER_NAME) $(CONF) $(CONF)/config.yaml
	@# systemd makes it at start (LogsDirectory=); made now so that -check_config passes before that.
	install -d -m 0750 -o $(USER_NAME) -g $(USER_NAME) /var/log/web-ipt-d
	if [ -d /run/systemd/system ]; then \
		systemd-tmpfiles --create $(TMPFILESDIR)/web-ipt-d.conf && \
		systemctl daemon-reload && \
		{ systemctl restart systemd-modules-load.service || \
		  echo "warning: could not load the modules in $(MODULESDIR)/web-ipt-d.conf; they load at boot"; }; \
	fi
else
	@echo "DESTDIR is set: not creating the user $(USER_NAME) or touching systemd; the package does that"
endif

uninstall:
	@case "$(PREFIX)" in /?*) ;; *) echo "refusing to uninstall with PREFIX='$(PREFIX)'"; exit 1;; esac
ifeq ($(DESTDIR),)
	if [ -d /run/systemd/system ]; then \
		systemctl disable --now web-ipt-d.service web-ipt-d.socket || true; fi
endif
	rm -f $(DESTDIR)$(UNITDIR)/web-ipt-d.socket $(DESTDIR)$(UNITDIR)/web-ipt-d.service \
		$(DESTDIR)$(SYSUSERSDIR)/web-ipt-d.conf $(DESTDIR)$(TMPFILESDIR)/web-ipt-d.conf \
		$(DESTDIR)$(MODULESDIR)/web-ipt-d.conf $(DESTDIR)$(SYSCONFDIR)/logrotate.d/web-ipt-d \
		$(DESTDIR)$(SYSCONFDIR)/fail2ban/action.d/web-ipt-d.conf \
		$(DESTDIR)$(SYSCONFDIR)/fail2ban/action.d/web-ipt-d-multiport.conf $(DESTDIR)$(BINDIR)/web-ipt-d
	if [ -f $(VENV)/pyvenv.cfg ]; then rm -rf $(VENV); fi
ifeq ($(DESTDIR),)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif
	@echo "kept $(CONF), /var/lib/web-ipt-d, /var/log/web-ipt-d and the user $(USER_NAME)"
