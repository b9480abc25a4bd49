"""Lint or render a Helm chart with the real Helm SDK (helm-python-sdk, `import helm_python`).

Used by tests/chart.rs through .venv/bin/python. Only the Helm SDK and the standard library:

    helm_chart.py lint   CHART [--namespace NS] [-f VALUES.yaml]... [--set EXPR]...
    helm_chart.py render CHART [--name REL] [--namespace NS] [-f VALUES.yaml]... [--set EXPR]...

Values compose as with the helm CLI: the chart's defaults, then each -f file in order, then each
--set expression (parsed by Helm's own strvals parser); maps merge, anything else is replaced.

Output, on stdout, one JSON object:
- lint:   Helm's lint report {"total_charts_linted", "messages": [{"severity", "path",
          "error"}], "errors": [...]}; the exit code is 1 when the report holds an error.
- render: {"manifests": {template path: rendered text}, "notes": NOTES.txt rendered,
          "crds": [{"name", "filename"}] (what Helm installs from crds/), "values": the
          merged values}.
A failure (bad values, a template error, a values.schema.json violation) prints
"helm_chart.py: <Helm's message>" on stderr and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import helm_python as helm


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep-merges `override` into a copy of `base`: maps merge, other values replace."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def user_values(args: argparse.Namespace) -> dict[str, Any]:
    """The values given on the command line (-f files, then --set expressions)."""
    values: dict[str, Any] = {}
    for path in args.values:
        with open(path, encoding="utf-8") as f:
            values = merge(values, helm.values_from_yaml(f.read()))
    for expr in args.set:
        values = merge(values, helm.parse_set_string(expr))
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["lint", "render"])
    parser.add_argument("chart")
    parser.add_argument("--name", default="meshbridge", help="release name")
    parser.add_argument("--namespace", default="mesh-system", help="release namespace")
    parser.add_argument("-f", "--values", action="append", default=[], help="values file")
    parser.add_argument("--set", action="append", default=[], help="--set expression")
    args = parser.parse_args()

    try:
        values = user_values(args)
        if args.command == "lint":
            report = helm.lint(args.chart, values, strict=True, namespace=args.namespace)
            print(json.dumps(report, indent=1))
            return 1 if report.get("errors") else 0

        with helm.Chart.load(args.chart) as chart:
            rendered = chart.render(
                values, name=args.name, namespace=args.namespace, is_install=True
            )
            crds = [{"name": c["name"], "filename": c["filename"]} for c in chart.crds]
            merged = chart.merge_values(values)
        notes = {k: v for k, v in rendered.items() if k.endswith("/NOTES.txt")}
        manifests = {k: v for k, v in rendered.items() if k not in notes}
        print(
            json.dumps(
                {
                    "manifests": manifests,
                    "notes": "".join(notes.values()),
                    "crds": crds,
                    "values": merged,
                },
                indent=1,
            )
        )
        return 0
    except helm.HelmError as e:
        print(f"helm_chart.py: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
