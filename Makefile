# Parallax — one entry point for people and CI. `make help` lists the targets.
SHELL := /bin/bash
CARGO ?= cargo
RELEASE_BIN := target/release/parallax

.PHONY: help deps build release test unit-test check fmt clippy doc run vm-test xen-test \
        bench bench-quick fuzz fuzz-short soak soak-short images demo-image clean install

help: ## This list
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | column -t -s $$'\t'

deps: ## Install the Debian packages and cargo tools the build and tests need
	scripts/deps.sh base

PREFIX ?= /usr/local
DESTDIR ?=
BINDIR := $(PREFIX)/bin
SHAREDIR := $(PREFIX)/share

install: release ## Install parallax, frontend-shim, completions, the man page and the systemd unit (PREFIX, DESTDIR)
	install -Dm755 target/release/parallax $(DESTDIR)$(BINDIR)/parallax
	install -Dm755 target/release/frontend-shim $(DESTDIR)$(BINDIR)/frontend-shim
	install -d $(DESTDIR)$(SHAREDIR)/bash-completion/completions $(DESTDIR)$(SHAREDIR)/zsh/site-functions \
	    $(DESTDIR)$(SHAREDIR)/fish/vendor_completions.d $(DESTDIR)$(SHAREDIR)/man/man1
	target/release/parallax completions bash > $(DESTDIR)$(SHAREDIR)/bash-completion/completions/parallax
	target/release/parallax completions zsh > $(DESTDIR)$(SHAREDIR)/zsh/site-functions/_parallax
	target/release/parallax completions fish > $(DESTDIR)$(SHAREDIR)/fish/vendor_completions.d/parallax.fish
	target/release/parallax man > $(DESTDIR)$(SHAREDIR)/man/man1/parallax.1
	install -d $(DESTDIR)$(SHAREDIR)/doc/parallax
	# The example, with the paths a system install uses instead of the repository's var/.
	sed -e 's|store: "var/parallax.store"|store: "/var/lib/parallax/store.px"|' \
	    -e 's|unix: "var/nbd.sock",|// unix: "/run/parallax/nbd.sock",|' \
	    parallax.ron > $(DESTDIR)$(SHAREDIR)/doc/parallax/parallax.ron
	install -d $(DESTDIR)$(PREFIX)/lib/systemd/system
	sed 's|@BINDIR@|$(BINDIR)|' packaging/parallax.service > $(DESTDIR)$(PREFIX)/lib/systemd/system/parallax.service

build: ## Debug build of the workspace
	$(CARGO) build --workspace

release: ## Optimised build (target/release/parallax, target/release/frontend-shim)
	$(CARGO) build --release --workspace

test: deps ## The whole test suite, as CI runs it
	$(CARGO) build --workspace
	$(CARGO) build --release --workspace
	$(CARGO) nextest run --workspace --profile ci
	$(CARGO) test --workspace --doc
	scripts/deps.sh vm
	tests/vm/run.sh
	scripts/deps.sh xen
	tests/xen-rig/run.sh

unit-test: ## Just the Rust tests (no package installs)
	$(CARGO) build --workspace
	$(CARGO) nextest run --workspace

fmt: ## Check formatting
	$(CARGO) fmt --all -- --check

clippy: ## Lints, warnings as errors
	$(CARGO) clippy --workspace --all-targets -- -D warnings

doc: ## API docs, warnings as errors
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps

check: fmt clippy doc test ## fmt + clippy + doc + tests

FUZZ_SECONDS ?= 300
SOAK_SECONDS ?= 600

fuzz: ## Every fuzz target for FUZZ_SECONDS each (default 300), on stable Rust; fails on a crash
	scripts/fuzz.sh $(FUZZ_SECONDS)

fuzz-short: ## Every fuzz target for 30 s, build included (CI runs this)
	scripts/fuzz.sh 30

soak: ## parallax serve under NBD + ring + admin load for SOAK_SECONDS (default 600)
	$(CARGO) build -p parallax
	# cargo test, not nextest: a long soak outlives the nextest profiles' slow-test timeout.
	PARALLAX_SOAK_SECS=$(SOAK_SECONDS) $(CARGO) test -p parallax-integration --test soak -- --nocapture

soak-short: ## The soak for 60 s (make test runs a 40 s one)
	$(MAKE) soak SOAK_SECONDS=60

run: release ## Build, create a demo store under ./var, and serve it over NBD
	scripts/run-demo.sh

images: ## Build (or reuse) the VM test template from Debian packages into images/.cache
	scripts/deps.sh vm
	images/build-template.sh

demo-image: ## The small ext4 demo disk that `make run` imports (var/demo.img)
	images/build-demo.sh var/demo.img

vm-test: ## Real guests (QEMU, TCG) booting from Parallax forks over NBD
	$(CARGO) build --release -p parallax
	scripts/deps.sh vm
	tests/vm/run.sh

xen-test: ## Xen 4.17 under QEMU (TCG): PV guests' disks served by parallax serve in dom0 and in a storage domain (~25 min)
	$(CARGO) build --release -p parallax
	scripts/deps.sh xen
	tests/xen-rig/run.sh

bench: ## Parallax against qemu-nbd, nbdkit, nbd-server (~35 min); results in bench/results/<date>/
	scripts/deps.sh bench
	$(CARGO) build --release -p parallax -p frontend-shim
	$(CARGO) build --release -p parallax --example scale
	python3 bench/run.py

bench-quick: ## One-minute subset of make bench (tmpfs, small VDI, one run each)
	scripts/deps.sh bench
	$(CARGO) build --release -p parallax -p frontend-shim
	$(CARGO) build --release -p parallax --example scale
	python3 bench/run.py --quick

clean:
	$(CARGO) clean
	rm -rf var
