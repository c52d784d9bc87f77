# ovirt-borg: set-up, tests, demo and benchmarks.
# `make demo` and `make test` install what is missing on a Debian machine (as root), then run.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
LABDIR ?= $(CURDIR)/lab

APT_PACKAGES := qemu-utils libxml2-dev liblz4-dev libzstd-dev libxxhash-dev libacl1-dev \
                libssl-dev pkg-config build-essential python3-dev fuse3 libfuse3-dev \
                e2fsprogs openssl systemd util-linux \
                ntfs-3g fusefat \
                xfsprogs btrfs-progs dosfstools mtools fdisk lvm2 cryptsetup-bin
# ntfs-3g and fusefat: file-level recovery of NTFS and vfat guests (the kernel mounts ext2/3/4,
# XFS and btrfs); the rest builds the lab's guest disks (mkfs.*, sfdisk, lvm2, cryptsetup).

.PHONY: setup apt venv lint test unit demo bench install clean lab-up lab-down

setup: apt venv

# Install the Debian packages that are missing (needs root; skipped when all are present).
apt:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q -e '.[lab,test,fuse]'
	touch $@

venv: $(VENV)/.installed

# Lint (ruff, configured in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check ovirt_borg tests bench hooks

test: setup
	$(VENV)/bin/pytest -ra

# The tests that need no lab and no Borg repository (tests/unit): seconds.
unit: venv
	$(VENV)/bin/pytest -ra tests/unit

demo: setup
	$(PY) -m ovirt_borg.lab.demo --dir $(LABDIR)

# The benchmark (figures in the README): make bench BENCH_ARGS=--quick for a short run.
bench: setup
	$(PY) -m pip install -q py-spy
	$(PY) -m bench $(BENCH_ARGS)

lab-up: setup
	$(VENV)/bin/ovirt-borg-lab up --dir $(LABDIR)

lab-down:
	$(VENV)/bin/ovirt-borg-lab down --dir $(LABDIR)

# Install the systemd units (the package itself: pip install .).
install:
	install -m 0644 systemd/ovirt-borg@.service systemd/ovirt-borg@.timer \
		systemd/ovirt-borg-verify@.service systemd/ovirt-borg-verify@.timer /etc/systemd/system/
	install -d -m 0700 /etc/ovirt-borg /var/lib/ovirt-borg /root/.cache/borg /root/.config/borg
	systemctl daemon-reload

clean:
	rm -rf $(VENV) build *.egg-info
