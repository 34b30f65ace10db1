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

# Debian packages the host side needs (the kernel build installs its own).
HOST_PACKAGES := python3 binutils util-linux cpio bc gcc libc6-dev busybox-static containerd

.PHONY: demo test kernel agent build bench lint deps clean fuzz

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

# Unit tests, the agent as PID 1 in a throwaway namespace, KVM tests with tiny guests, and
# the end-to-end boot of the real kernel and agent.
test: kernel agent build
	$(CARGO) test --release --workspace

# runc is the reference every figure is compared with, measured in the same run.
bench: kernel agent build
	@command -v runc >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends runc
	$(CARGO) run --release -q -p hull-bench -- --kernel $(KERNEL) --initramfs $(INITRAMFS) \
		--test-initramfs $(TEST_INITRAMFS)

lint: deps
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Each cargo-fuzz target in fuzz/ for FUZZ_SECONDS (docs/fuzzing.md). Not part of `make test`:
# it needs the nightly toolchain, and its corpus and finds stay in fuzz/corpus, fuzz/artifacts.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := protocol_decoder vsock virtio_fs
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
