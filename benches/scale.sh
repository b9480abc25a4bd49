#!/usr/bin/env bash
# The side-by-side scale run: meshbridge beside the encode-once reference server, on the same
# simulated Envoys (1,000 services x 5 endpoints, 5 dependencies per proxy, 10% on "*"), at
# 2,000 and 5,000 proxies over 50 connections, state-of-the-world and delta xDS, one endpoint
# of svc-0 changed three times. Prints one table per mode and the summary README shows; every
# ratio is taken within one table (same run, same machine). Then the Consul churn bench.
#
#   PERF_KIT=/path/to/side-by-side-harness make bench-scale
#   PERF_KIT=... SIZES="2000" CONNECTIONS=8 MODES=sotw bash benches/scale.sh
#
# PERF_KIT is the directory of the side-by-side harness: run_peer.sh, the load generator of
# simulated Envoys and the encode-once reference server, which it builds itself.
set -euo pipefail
: "${PERF_KIT:?set PERF_KIT to the directory of the side-by-side harness (its run_peer.sh)}"
cd "$(dirname "$0")/.."
cargo build --release --quiet
BIN="$PWD/target/release/meshbridge"
OUT="${OUT:-$PWD/target/scale-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
for mode in ${MODES:-sotw delta}; do
  delta=0
  [[ "$mode" == delta ]] && delta=1
  # From an empty directory, so that nothing in the arguments is expanded as a glob.
  (cd "$OUT" && TARGETS="null meshbridge" SIZES="${SIZES:-2000 5000}" \
    CONNECTIONS="${CONNECTIONS:-50}" DELTA="$delta" MESHBRIDGE="$BIN" \
    MESHBRIDGE_ARGS="--allow-wildcard *" OUT="$OUT/$mode" "$PERF_KIT/run_peer.sh") |
    tee "$OUT/$mode.txt"
done
python3 benches/scale_ratios.py "$OUT"
# The churn: 10,000 Consul instances, 20 health changes a second, 2,000 delta streams.
cargo bench --bench consul_churn | tee "$OUT/churn.txt"
echo "results in $OUT ($(git rev-parse --short HEAD 2>/dev/null || echo unknown commit), $(date -u +%Y-%m-%d))"
