"""Check that a results.json written by examples/bench/ parses and is complete.

`make bench-smoke` runs it on the smoke run's output:

    python3 bench/check_results.py target/bench-smoke/results.json

It checks the structure and that every run got responses, not the
performance targets, which a smoke run is too short to measure.
"""

import json
import math
import sys

PERCENTILES = ("p50", "p90", "p99", "p99.9")


def check(path):
    """Return a list of problems found in the results file at `path`."""
    with open(path, encoding="utf-8") as file:
        results = json.load(file)

    problems = []
    for key in ("envoy_version", "machine", "wasm", "scenarios", "targets", "fixed_rates"):
        if key not in results:
            problems.append(f"missing top-level key {key!r}")
    if problems:
        return problems

    if not results["scenarios"]:
        problems.append("no scenarios")
    runs = 0
    for scenario in results["scenarios"]:
        for kind in ("closed_loop", "fixed_rate"):
            run = scenario.get(kind)
            if run is None:
                continue
            runs += 1
            where = f"scenario {scenario['id']} {kind}"
            client = run["client"]
            if client["ok"] <= 0:
                problems.append(f"{where}: no successful request")
            if client["failures"]:
                problems.append(f"{where}: failed requests {client['failures']}")
            for key in PERCENTILES:
                value = client["latency_ms"].get(key)
                if value is None or not math.isfinite(value) or value <= 0:
                    problems.append(f"{where}: latency {key} is {value!r}")
            if run["envoy_requests"] != client["ok"]:
                problems.append(
                    f"{where}: Envoy completed {run['envoy_requests']} requests, "
                    f"oha received {client['ok']} responses"
                )
            if run["memory"]["rss_kib"] <= 0:
                problems.append(f"{where}: Envoy RSS is {run['memory']['rss_kib']}")
            problems.extend(check_side_calls(where, scenario["setup"], run.get("side_calls")))
    if runs == 0:
        problems.append("no runs")
    for target in results["targets"]:
        if target.get("pass") not in (True, False, None):
            problems.append(f"target {target.get('name')!r}: pass is {target.get('pass')!r}")
    if results["wasm"]["bytes"] <= 0:
        problems.append("wasm size missing")
    return problems


def check_side_calls(where, setup, side):
    """Return problems with a run's side calls.

    The mirror, mesh-fanout and floor_filter with a side cluster report side
    calls; the router alone and the empty floor_filter report none. A mesh-fanout rule that matched must end its
    side calls as outcomes or skips, and one that never matched (scenario 7)
    makes none.
    """
    reports = (
        setup == "request_mirror_policies"
        or setup.startswith("mesh-fanout")
        or setup.startswith("floor_filter, one side call")
    )
    if not reports:
        return []
    if side is None:
        return [f"{where}: side calls missing"]
    if side.get("matched") == 0:
        return []
    if side["completed"] + side["skipped"] <= 0:
        return [f"{where}: no side call completed or skipped"]
    return []


def main():
    if len(sys.argv) != 2:
        print("usage: check_results.py RESULTS_JSON", file=sys.stderr)
        return 2
    path = sys.argv[1]
    try:
        problems = check(path)
    except (OSError, ValueError, KeyError, TypeError) as error:
        print(f"{path}: cannot be read as bench results: {error!r}", file=sys.stderr)
        return 1
    if problems:
        for problem in problems:
            print(f"{path}: {problem}", file=sys.stderr)
        return 1
    print(f"{path}: results complete")
    return 0


if __name__ == "__main__":
    sys.exit(main())
