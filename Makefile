# hull: the two commands a user needs are `make demo` and `make test`. CI runs `.ci/run`,
# which runs `make test`. Every target installs what it is missing (Debian packages) first.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := demo

GUEST_DIR := build/guest
KERNEL := $(GUEST_DIR)/vmlinux
AGENT := $(GUEST_DIR)/hull-agent
INITRAMFS := $(GUEST_DIR)/initramfs.cpio
TEST_INITRAMFS := $(GUEST_DIR)/test-initramfs.cpio
HULL_VMM := target/release/hull-vmm
CARGO ?= cargo

# Debian packages the host side needs (the kernel build installs its own); QEMU, kmod and xz
# are for the nested AMD lane (tests/lanes/nested.sh), runc is what `make bench` compares with,
# docker.io and podman are clients the end-to-end tests drive.
HOST_PACKAGES := python3 binutils util-linux cpio bc gcc libc6-dev busybox-static containerd \
	protobuf-compiler containernetworking-plugins \
	qemu-system-x86 kmod xz-utils runc docker.io podman

.PHONY: demo test test-nested kernel agent build bench bench-nested lint deps clean fuzz install deb

deps:
	@command -v $(CARGO) >/dev/null || { echo "error: cargo not found: hull needs a Rust toolchain (rustup) on PATH" >&2; exit 1; }
	@missing=(); for p in $(HOST_PACKAGES); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing+=($$p); done; \
	if [ $${#missing[@]} -gt 0 ]; then \
		echo "installing $${missing[*]}"; \
		DEBIAN_FRONTEND=noninteractive apt-get update -q; \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $${missing[@]}; \
	fi

# The guest kernel: cached by a hash of its inputs, so this is instant after the first build.
kernel: deps
	kernel-config/build.sh $(GUEST_DIR) >/dev/null

# The static guest agent and the uncompressed initramfs whose /init it is; and the test
# initramfs, which adds busybox and tests/guest programs for the end-to-end tests.
agent: deps
	guest-agent/build.sh $(GUEST_DIR)
	python3 guest-agent/mkinitramfs.py $(INITRAMFS) $(AGENT)
	tests/guest/build-initramfs.sh $(GUEST_DIR) $(AGENT)

# hull and hull-vmm.
build: deps
	$(CARGO) build --release --workspace --bins

# Installs hull, hull-vmm, containerd-shim-hull-v2 in $(PREFIX)/bin and the guest kernel and
# initramfs in $(PREFIX)/share/hull/guest, where hull finds them (docs/kubernetes.md).
PREFIX ?= /usr/local
DESTDIR ?=
install: kernel agent build
	install -d -m 0755 $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/share/hull/guest
	install -m 0755 target/release/hull target/release/hull-vmm \
		target/release/containerd-shim-hull-v2 $(DESTDIR)$(PREFIX)/bin/
	install -m 0644 $(KERNEL) $(INITRAMFS) $(DESTDIR)$(PREFIX)/share/hull/guest/
	install -d -m 0755 $(DESTDIR)$(PREFIX)/share/hull/deploy
	install -m 0644 deploy/containerd-hull.toml deploy/runtimeclass.yaml \
		$(DESTDIR)$(PREFIX)/share/hull/deploy/

# A Debian package of the same files under /usr (build/hull_<version>_amd64.deb).
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb: kernel agent build
	rm -rf build/deb && mkdir -p build/deb/DEBIAN
	$(MAKE) --no-print-directory install DESTDIR=$(CURDIR)/build/deb PREFIX=/usr
	printf '%s\n' 'Package: hull' 'Version: $(VERSION)' 'Architecture: amd64' \
		'Maintainer: hull developers <hull@localhost>' 'Depends: libc6' \
		'Recommends: containerd' 'Section: admin' 'Priority: optional' \
		'Description: OCI runtime and containerd shim that run containers in KVM micro-VMs' \
		' hull (runc-compatible CLI), hull-vmm, containerd-shim-hull-v2 and the guest.' \
		> build/deb/DEBIAN/control
	dpkg-deb --root-owner-group --build build/deb build/hull_$(VERSION)_amd64.deb

DEMO_BUNDLE := build/demo-bundle
DEMO_ROOT := build/demo-state

# 1. Boot a micro-VM with our kernel and agent: it prints the agent's readiness line and powers
#    off. 2. Run a busybox container in a micro-VM with `hull run`: it greets and prints the
#    guest kernel's release, which shows it ran in the VM, not on the host.
demo: kernel agent build
	@echo "== booting a hull micro-VM (kernel $(KERNEL), initramfs $(INITRAMFS))"
	@start=$$(date +%s.%N); \
	$(HULL_VMM) --kernel $(KERNEL) --initramfs $(INITRAMFS) --cmdline hull.poweroff=ready; \
	echo "micro-VM powered off after $$(echo "$$(date +%s.%N) - $$start" | bc) s"
	@target/release/make-bundle $(DEMO_BUNDLE) \
		'echo "Hello from a hull container"; echo "kernel: $$(uname -r) (host: '"$$(uname -r)"')"' >/dev/null
	@echo "== hull run --bundle $(DEMO_BUNDLE) demo"
	@start=$$(date +%s.%N); \
	target/release/hull --root $(DEMO_ROOT) run --bundle $(DEMO_BUNDLE) demo; \
	echo "container exited with status $$? after $$(echo "$$(date +%s.%N) - $$start" | bc) s"

# Every test in the lane where it means something (docs/testing.md): unit tests here; the KVM
# and end-to-end tests on this host's hardware KVM, or, without one, in the nested AMD lane
# (QEMU) with the PVM subset on this host. The lanes chosen, and why, are printed first.
test: kernel agent build
	tests/lanes/test.sh

# The nested AMD lane by hand: `make test-nested TESTS="run=echo_hello lifecycle"` (test
# programs of tests/tests/, each optionally with =FILTER,FILTER).
TESTS ?= $(basename $(notdir $(wildcard tests/tests/*.rs)))
test-nested: kernel agent build
	$(CARGO) test --release --workspace --no-run --locked
	tests/lanes/nested.sh --require xstate=xsave \
		--skip-test "hostile/twenty_mib_to_the_serial_port=too slow here: make test runs it in the PVM lane" \
		--skip-test "docker/docker_runs_hull_containers=L1 has no distribution for dockerd: make test runs it in the PVM lane" \
		--skip-test "podman/podman_runs_hull_containers=L1 has no distribution for Podman: make test runs it in the PVM lane" \
		$(TESTS)

# runc is the reference every figure is compared with, measured in the same run. On a host
# without hardware KVM the same benchmark also runs in the nested AMD lane (bench-nested).
BENCH := target/release/hull-bench
bench: kernel agent build
	$(CARGO) build --release -q -p hull-bench
	$(BENCH) --kernel $(KERNEL) --initramfs $(INITRAMFS) --test-initramfs $(TEST_INITRAMFS)
	$(CARGO) build --release -q -p hull-tests --bin cri_bench
	target/release/cri_bench --lane "$$(if [ -d /sys/module/kvm_pvm ]; then echo PVM host; else echo this host; fi)"
	@if [ ! -c /dev/kvm ] || [ -d /sys/module/kvm_pvm ]; then $(MAKE) --no-print-directory bench-nested; fi

# hull and runc side by side inside the nested lane's level-1 machine: absolute times there
# are emulated, the ratios are what hardware users see in proportion. (No context-switch
# figure: the lane has no XSAVE.)
bench-nested: kernel agent build
	$(CARGO) build --release -q -p hull-bench
	tests/lanes/nested.sh --host-bin "$$(command -v runc)" --file $(BENCH):/hull/bin/hull-bench \
		--exec 'hull-bench --lane "nested AMD (QEMU TCG, emulated SVM)" --kernel $$HULL_KERNEL \
			--initramfs $$HULL_INITRAMFS --boot-runs 5 --hull-runs 10'
	$(CARGO) build --release -q -p hull-tests --bin cri_bench
	printf '127.0.0.1\tlocalhost\n' >build/nested-hosts
	tests/lanes/nested.sh $$(for b in containerd ctr containerd-shim-runc-v2 runc tar sha256sum; do \
			echo --host-bin "$$(command -v $$b)"; done) \
		$$(for p in bridge host-local loopback; do echo --host-bin /usr/lib/cni/$$p; done) \
		--file build/nested-hosts:/etc/hosts \
		--file target/release/containerd-shim-hull-v2:/hull/bin/containerd-shim-hull-v2 \
		--file target/release/cri_bench:/hull/bin/cri_bench \
		--exec 'cri_bench --lane "nested AMD (QEMU TCG, emulated SVM)"'

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Each cargo-fuzz target in fuzz/ for FUZZ_SECONDS (docs/fuzzing.md). Not part of `make test`:
# it needs the nightly toolchain, and its corpus and finds stay in fuzz/corpus, fuzz/artifacts.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := protocol_decoder vsock virtio_fs virtio_mmio emulation_assist net
fuzz:
	@rustup run nightly rustc --version >/dev/null 2>&1 || { echo "error: fuzzing needs the nightly toolchain (rustup toolchain install nightly)" >&2; exit 1; }
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz
	cd fuzz && for target in $(FUZZ_TARGETS); do \
		echo "== fuzzing $$target for $(FUZZ_SECONDS) s"; \
		$(CARGO) +nightly fuzz run $$target -- -max_total_time=$(FUZZ_SECONDS) -timeout=20 \
			-len_control=0 -max_len=1024 -print_final_stats=1; \
	done

clean:
	rm -rf build target
