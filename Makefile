# Install web-ipt-d as a systemd service: see README, "Install as a service (systemd)".
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

.PHONY: all install install-venv install-files install-live uninstall
# install-live changes files install-files makes: the steps run in order even under make -j.
.NOTPARALLEL:

all:
	@echo "make install [DESTDIR=...] [PREFIX=$(PREFIX)], or make uninstall; see README"

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
		$(DESTDIR)$(SYSCONFDIR)/fail2ban/action.d/web-ipt-d.conf $(DESTDIR)$(BINDIR)/web-ipt-d
	if [ -f $(VENV)/pyvenv.cfg ]; then rm -rf $(VENV); fi
ifeq ($(DESTDIR),)
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
endif
	@echo "kept $(CONF), /var/lib/web-ipt-d, /var/log/web-ipt-d and the user $(USER_NAME)"
