"""Summarises a side-by-side scale run (benches/scale.sh) as README's table: meshbridge
against the encode-once reference, per proxy count and mode, each ratio within one run.

    python3 benches/scale_ratios.py target/scale-YYYYmmdd-HHMMSS [debounce_ms]
"""
import json
import os
import sys


def load(path):
    d = json.load(open(path))
    start = d["startup"]
    runs = d["propagation"]["runs"]
    pooled = d["propagation"].get("pooled_latency_from_change_ms") or d["propagation"]["pooled_latency_ms"]
    per_affected = [r["bytes_per_affected_stream"] for r in runs if r["affected_streams"]]
    return {
        "ttc": start["time_to_config_ms"]["p99"],
        "prop": pooled["p99"],
        "rss": d["server_end"]["rss_kb"] / 1024,
        "cpu": sum(r["server_cpu_s"] for r in runs) / len(runs),
        "bytes": sum(per_affected) / max(len(per_affected), 1),
        "configured": f"{start['configured']}/{start['streams']}",
    }


def main():
    out = sys.argv[1]
    debounce = float(sys.argv[2]) if len(sys.argv) > 2 else 100.0
    print("| proxies, mode | change → affected p99, ms (goal ≤ debounce + 1.5 × ref) "
          "| server CPU per change | RSS | time-to-config p99 | bytes per affected stream | configured |")
    print("|---|---|---|---|---|---|---|")
    for mode in ("sotw", "delta"):
        sizes = sorted({f.split("-")[-1][:-5] for f in os.listdir(os.path.join(out, mode))
                        if f.startswith("loadgen-") and f.endswith(".json")}, key=int) \
            if os.path.isdir(os.path.join(out, mode)) else []
        for n in sizes:
            paths = {t: os.path.join(out, mode, f"loadgen-{t}-{n}.json") for t in ("null", "meshbridge")}
            if not all(os.path.exists(p) for p in paths.values()):
                continue
            ref, mb = load(paths["null"]), load(paths["meshbridge"])
            print(f"| {int(n):,} {'SotW' if mode == 'sotw' else 'Delta'} "
                  f"| {mb['prop']:.0f} vs {ref['prop']:.0f} (≤ {debounce + 1.5 * ref['prop']:.0f}) "
                  f"| {mb['cpu']:.2f} vs {ref['cpu']:.2f} s ({mb['cpu'] / max(ref['cpu'], 0.005):.1f}×) "
                  f"| {mb['rss']:.0f} vs {ref['rss']:.0f} MB ({mb['rss'] / ref['rss']:.1f}×) "
                  f"| {mb['ttc']:,.0f} vs {ref['ttc']:,.0f} ms ({mb['ttc'] / ref['ttc']:.2f}×) "
                  f"| {mb['bytes']:,.0f} vs {ref['bytes']:,.0f} ({mb['bytes'] / ref['bytes']:.2f}×) "
                  f"| {mb['configured']} |")


if __name__ == "__main__":
    main()
