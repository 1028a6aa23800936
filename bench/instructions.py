"""Count the CPU instructions Envoy spends per request, under callgrind.

`make bench-instructions` runs it. Timed runs on a shared two-core machine
move by 10 % or more from one run to the next. Callgrind counts the
instructions Envoy executes, JIT-compiled Wasm included, and its GET
counts repeated to within 0.5 % on such a machine (64 KiB POST counts
varied by a third between runs). So this script measures what
a change cost, where `make bench` cannot.

For each scenario it starts the release bench_upstream, Envoy with
`--concurrency 1` under `valgrind --tool=callgrind --instr-atstart=no`,
sends a warm-up with oha, switches instrumentation on, sends the measured
requests, and divides the instructions of the dump by the responses. It
writes bench/instructions.json and docs/instructions.md.

    python3 bench/instructions.py [--requests N] [--only ID,ID] [--wasm F] [--max ID=N]
                                  [--json F] [--markdown F] [--keep DIR]
"""

import argparse
import datetime
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
WASM = os.path.join(REPO, "target/wasm32-wasip1/release/mesh_fanout.wasm")
FLOOR_WASM = os.path.join(REPO, "target/wasm32-wasip1/release/examples/floor_filter.wasm")
UPSTREAM = os.path.join(REPO, "target/release/examples/bench_upstream")
READY_TIMEOUT_S = 120
WARMUP_REQUESTS = 2000
CONNECTIONS = 4


def plugin(name, **fill):
    """Return a bench/plugins/ configuration with its placeholders filled."""
    with open(os.path.join(BENCH, "plugins", name), encoding="utf-8") as file:
        text = file.read()
    for key, value in fill.items():
        text = text.replace("${" + key + "}", str(value))
    return json.dumps(json.loads(text))


SHADOW = dict(SIDE_CLUSTER="side", SIDE_DELAY_US=0)

# id, description, filter module ("none", "mirror" or a path), plugin JSON, body bytes
SCENARIOS = [
    ("1", "no filter", "none", None, 0),
    ("2", "built-in mirror", "mirror", None, 0),
    ("0", "empty proxy-wasm filter (floor_filter)", FLOOR_WASM, "{}", 0),
    ("0-dispatch", "minimal proxy-wasm side call (floor_filter)", FLOOR_WASM,
     '{"side_cluster": "side"}', 0),
    ("0-handoff", "minimal proxy-wasm side call handed to the root (floor_filter)", FLOOR_WASM,
     '{"side_cluster": "side", "handoff": true}', 0),
    ("7", "mesh-fanout, no rule matches", WASM, plugin("no-match.json"), 0),
    ("3-sampled-out", "mesh-fanout, rule matches, sampled out", WASM,
     plugin("sampled-out.json"), 0),
    ("3", "mesh-fanout shadow", WASM, plugin("shadow.json", **SHADOW), 0),
    ("6-dead", "mesh-fanout shadow, side down", WASM,
     plugin("shadow.json", SIDE_CLUSTER="side_dead", SIDE_DELAY_US=0), 0),
    ("5", "mesh-fanout fan-out, 1 awaited target", WASM,
     plugin("fanout.json", SIDE_DELAY_US=0), 0),
    ("1-1k", "no filter, POST 1 KiB", "none", None, 1024),
    ("2-1k", "built-in mirror, POST 1 KiB", "mirror", None, 1024),
    ("4-1k", "mesh-fanout shadow, POST 1 KiB", WASM, plugin("shadow.json", **SHADOW), 1024),
    ("1-64k", "no filter, POST 64 KiB", "none", None, 65536),
    ("0-64k", "empty proxy-wasm filter, POST 64 KiB", FLOOR_WASM, "{}", 65536),
    ("2-64k", "built-in mirror, POST 64 KiB", "mirror", None, 65536),
    ("4-64k", "mesh-fanout shadow, POST 64 KiB", WASM, plugin("shadow.json", **SHADOW), 65536),
]

# (scenario, baseline, the cost that their difference measures)
STEPS = [
    ("2", "1", "the built-in mirror's side call"),
    ("0", "1", "any proxy-wasm filter: a context and its callbacks"),
    ("0-dispatch", "0", "the cheapest proxy-wasm side call"),
    ("0-handoff", "0-dispatch", "handing the side call to the root context"),
    ("7", "0", "mesh-fanout, no rule matches: `:path` read"),
    ("3-sampled-out", "7", "mesh-fanout, a rule matches: the whole header map copied instead of "
     "`:path`, matching, sampling"),
    ("3", "3-sampled-out", "mesh-fanout's side call: handoff, dispatch, response, stats"),
    ("3", "0-dispatch", "mesh-fanout's shadow beyond the cheapest proxy-wasm side call"),
    ("3", "0-handoff", "mesh-fanout's shadow beyond the cheapest side call that keeps its "
     "outcome"),
    ("3", "2", "mesh-fanout's shadow beyond the built-in mirror"),
    ("2-1k", "1-1k", "the built-in mirror's side call, POST 1 KiB"),
    ("4-1k", "2-1k", "mesh-fanout's shadow beyond the built-in mirror, POST 1 KiB"),
    ("2-64k", "1-64k", "the built-in mirror's side call, POST 64 KiB"),
    ("0-64k", "1-64k", "any proxy-wasm filter, POST 64 KiB: body callbacks included"),
    ("4-64k", "0-64k", "mesh-fanout's shadow with the body copied, POST 64 KiB"),
    ("4-64k", "2-64k", "mesh-fanout's shadow beyond the built-in mirror, POST 64 KiB"),
]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def template(name):
    """Return a bench/ template's lines without full-line comments."""
    with open(os.path.join(BENCH, name), encoding="utf-8") as file:
        return [line for line in file.read().split("\n") if not line.strip().startswith("#")]


def indent_of(line):
    return line[: len(line) - len(line.lstrip())]


def render(module, plugin_json, ports):
    """Fill bench/envoy.yaml as examples/bench/scenario.rs does.

    NOTE: this repeats the Rust template filling for the placeholders used
    here; `make bench-instructions-smoke` in `make test` fails if the two
    drift apart far enough that Envoy rejects the result.
    """
    values = {
        "LISTENER_PORT": ports["listener"],
        "ADMIN_PORT": ports["admin"],
        "PRIMARY_PORT": ports["primary"],
        "SIDE_PORT": ports["side"],
        # No scenario here uses the slow side, so it may point nowhere.
        "SLOW_SIDE_PORT": ports["dead"],
        "DEAD_PORT": ports["dead"],
    }
    out = []
    for line in template("envoy.yaml"):
        placeholder = line.strip()
        if placeholder == "${ROUTE_MIRROR}":
            if module == "mirror":
                out += [indent_of(line) + m.replace("${MIRROR_CLUSTER}", "side")
                        for m in template("mirror-policy.yaml") if m.strip()]
            continue
        if placeholder == "${WASM_FILTER}":
            if module not in ("none", "mirror"):
                for filter_line in template("wasm-filter.yaml"):
                    if filter_line.strip() == "${PLUGIN_CONFIG}":
                        out.append(indent_of(line) + indent_of(filter_line) + plugin_json)
                    else:
                        out.append(indent_of(line) + filter_line.replace("${WASM}", module))
            continue
        for key, value in values.items():
            line = line.replace("${" + key + "}", str(value))
        out.append(line)
    return "\n".join(out) + "\n"


def envoy_binary():
    path = os.environ.get("ENVOY_BIN") or os.path.join(REPO, ".venv/bin/envoy")
    if not os.path.exists(path):
        sys.exit(f"Envoy not found at {path}; run `make envoy` or set ENVOY_BIN")
    # The venv's `envoy` is a Python launcher; valgrind must run the ELF binary.
    with open(path, "rb") as file:
        if file.read(4) == b"\x7fELF":
            return path
    found = glob.glob(os.path.join(os.path.dirname(os.path.dirname(path)),
                                   "lib/python3*/site-packages/envoy/_bin/envoy"))
    if not found:
        sys.exit(f"{path} is a launcher script and its envoy/_bin/envoy was not found")
    return found[0]


def wait_ready(admin_port, process, log_path):
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                sys.exit(f"Envoy exited with {process.returncode}:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"Envoy under valgrind not ready after {READY_TIMEOUT_S} s; see {log_path}")


def oha(oha_bin, port, requests, body_file):
    args = [oha_bin, "-n", str(requests), "-c", str(CONNECTIONS), "--no-tui",
            "--output-format", "json"]
    if body_file:
        args += ["-m", "POST", "-D", body_file]
    args.append(f"http://127.0.0.1:{port}/bench")
    result = subprocess.run(args, capture_output=True, text=True, check=True)
    codes = json.loads(result.stdout).get("statusCodeDistribution", {})
    return int(codes.get("200", 0)), sum(int(v) for k, v in codes.items() if k != "200")


def callgrind(args, work):
    subprocess.run(["callgrind_control"] + args, cwd=work, capture_output=True, check=True)


def measure(scenario, requests, oha_bin, envoy, work):
    scenario_id, _, module, plugin_json, body_bytes = scenario
    body_file = None
    if body_bytes:
        body_file = os.path.join(work, f"body-{body_bytes}.bin")
        with open(body_file, "wb") as file:
            file.write(bytes(i % 251 for i in range(body_bytes)))
    upstream = subprocess.Popen([UPSTREAM, "--listeners", "2"], stdout=subprocess.PIPE, text=True)
    envoy_process = None
    try:
        listening = upstream.stdout.readline().split()
        primary, side = (int(address.rsplit(":", 1)[1]) for address in listening[1:3])
        ports = dict(listener=free_port(), admin=free_port(), primary=primary, side=side,
                     dead=free_port())
        config = os.path.join(work, f"envoy-{scenario_id}.yaml")
        with open(config, "w", encoding="utf-8") as file:
            file.write(render(module, plugin_json, ports))
        log_path = os.path.join(work, f"envoy-{scenario_id}.log")
        out_file = os.path.join(work, f"callgrind-{scenario_id}.out")
        with open(log_path, "w", encoding="utf-8") as log:
            envoy_process = subprocess.Popen(
                ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--smc-check=all-non-file",
                 f"--callgrind-out-file={out_file}", envoy, "-c", config,
                 "--concurrency", "1", "-l", "error", "--disable-hot-restart"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_ready(ports["admin"], envoy_process, log_path)
        pid = str(envoy_process.pid)
        oha(oha_bin, ports["listener"], WARMUP_REQUESTS, body_file)
        callgrind(["-i", "on", pid], work)
        ok, other = oha(oha_bin, ports["listener"], requests, body_file)
        callgrind(["-d", pid], work)
        callgrind(["-i", "off", pid], work)
        instructions = 0
        for dump in glob.glob(out_file + "*"):
            with open(dump, encoding="utf-8", errors="replace") as file:
                for line in file:
                    if line.startswith(("summary:", "totals:")):
                        instructions += int(line.split()[1])
                        break
        if ok <= 0 or other:
            sys.exit(f"scenario {scenario_id}: {ok} responses 200 and {other} others")
        return {"requests": ok, "instructions": instructions,
                "instructions_per_request": round(instructions / ok)}
    finally:
        for process in (envoy_process, upstream):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()


def mirror_of(scenario_id):
    """Return the id of the built-in mirror run with the same request."""
    for suffix in ("-1k", "-64k"):
        if scenario_id.endswith(suffix):
            return "2" + suffix
    return "2"


def ratio_text(value, base):
    return f"{value / base:.3f}" if base else "–"


def selected_module(selected):
    """Return the mesh-fanout module that the selected scenarios load, if any."""
    for _, _, module, _, _ in selected:
        if module not in ("none", "mirror", FLOOR_WASM):
            return module
    return None


def markdown(results, requests, command, build):
    per = {r["id"]: r["instructions_per_request"] for r in results}
    lines = [
        "# Instructions per request",
        "",
        "CPU instructions that Envoy executes per request, counted by callgrind; "
        "bench/instructions.py produced this page and bench/instructions.json. "
        "Unlike the timed runs of docs/benchmarks.md, the GET counts repeated to within "
        "0.5 % across runs while other work shared the machine, so they price a change. "
        "The 64 KiB POST counts did not. In scenario 4-64k, a variant of the filter that "
        "neither read nor sent the body gave 411k instructions per request in one run "
        "and 619k and 623k in two others. Treat the 64 KiB rows as rough. "
        "Instructions are not time: cache misses and system calls weigh more than "
        "their count.",
        "",
        f"Command: `{command}`, at commit {build['commit']}"
        + (f" with `{os.path.relpath(build['module'], REPO)}` of {build['module_bytes']:,} bytes"
           if build["module"] else "")
        + f". Started {results[0]['started']} UTC; Envoy "
        f"`{results[0]['envoy']}` with `--concurrency 1` under "
        "`valgrind --tool=callgrind --instr-atstart=no`; counting starts after "
        f"{WARMUP_REQUESTS} warm-up requests and covers {requests} GET or POST requests "
        f"to `/bench` over {CONNECTIONS} HTTP/1.1 connections from oha. Every thread "
        "of Envoy counts, the main thread included.",
        "",
        "| id | scenario | instructions per request | × no filter | × built-in mirror |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for result in results:
        value = result["instructions_per_request"]
        ratio_none = ratio_text(value, per.get("1"))
        ratio_mirror = ratio_text(value, per.get(mirror_of(result["id"])))
        lines.append(f"| {result['id']} | {result['title']} | {value:,} | {ratio_none} | {ratio_mirror} |")
    lines += ["", "## Steps", "", "| runs | step | instructions per request |",
              "| --- | --- | ---: |"]
    for with_id, without_id, what in STEPS:
        if with_id in per and without_id in per:
            lines.append(f"| {with_id} − {without_id} | {what} | {per[with_id] - per[without_id]:+,} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", help="comma-separated scenario ids")
    parser.add_argument("--json", default=os.path.join(BENCH, "instructions.json"))
    parser.add_argument("--markdown", default=os.path.join(REPO, "docs/instructions.md"))
    parser.add_argument("--invoked-as", help="command to show in the report (default: this one)")
    parser.add_argument("--max", action="append", default=[], metavar="ID=N",
                        help="fail when scenario ID takes more than N instructions per request")
    parser.add_argument("--wasm", help="mesh-fanout module to count instead of the release "
                        "build, for example a variant of a change")
    parser.add_argument("--keep", metavar="DIR", help="keep each scenario's callgrind dump and "
                        "Envoy log in DIR, for callgrind_annotate")
    options = parser.parse_args()

    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found; install Debian's valgrind package")
    oha_bin = os.environ.get("OHA") or shutil.which("oha")
    if not oha_bin:
        sys.exit("oha not found; run `make bench-tools` or set OHA")
    for path, hint in ((WASM, "make build"), (FLOOR_WASM, "make bench-tools"),
                       (UPSTREAM, "make bench-tools")):
        if not os.path.exists(path):
            sys.exit(f"{path} not found; run `{hint}`")
    envoy = envoy_binary()
    envoy_version = subprocess.run([envoy, "--version"], capture_output=True, text=True,
                                   check=True).stdout.split("version:")[-1].strip()
    selected = SCENARIOS
    if options.wasm:
        if not os.path.exists(options.wasm):
            sys.exit(f"--wasm {options.wasm} not found")
        module = os.path.abspath(options.wasm)
        selected = [(i, t, module if m == WASM else m, p, b) for i, t, m, p, b in selected]
    if options.only:
        requested = options.only.split(",")
        unknown = [w for w in requested if w not in {s[0] for s in SCENARIOS}]
        if unknown:
            sys.exit(f"unknown scenario ids {unknown}; known: {[s[0] for s in SCENARIOS]}")
        selected = [s for s in selected if s[0] in requested]

    limits = {}
    for item in options.max:
        scenario_id, _, value = item.partition("=")
        if not value.isdigit() or scenario_id not in {s[0] for s in selected}:
            sys.exit(f"invalid --max {item!r}; use ID=N with a selected scenario id and a whole number")
        limits[scenario_id] = int(value)

    command = options.invoked_as or " ".join(["python3", "bench/instructions.py"] + sys.argv[1:])
    commit = subprocess.run(["git", "-C", REPO, "log", "-1", "--format=%h"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src"],
                           capture_output=True, text=True).stdout.strip()
    module = selected_module(selected)
    build = {"commit": commit + (" (uncommitted changes in src/)" if dirty else ""),
             "module": module, "module_bytes": os.path.getsize(module) if module else None}

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
    results = []
    with tempfile.TemporaryDirectory(prefix="mesh-fanout-callgrind-") as work:
        for scenario in selected:
            result = measure(scenario, options.requests, oha_bin, envoy, work)
            result.update(id=scenario[0], title=scenario[1], started=started, envoy=envoy_version)
            results.append(result)
            if options.keep:
                os.makedirs(options.keep, exist_ok=True)
                for dump in glob.glob(os.path.join(work, f"*-{scenario[0]}.*")):
                    shutil.copy(dump, options.keep)
            print(f"{scenario[0]:<14} {result['instructions_per_request']:>10,} instructions/request",
                  flush=True)
    with open(options.json, "w", encoding="utf-8") as file:
        json.dump({"requests": options.requests, "build": build, "results": results}, file, indent=2)
        file.write("\n")
    with open(options.markdown, "w", encoding="utf-8") as file:
        file.write(markdown(results, options.requests, command, build))
    print(f"wrote {options.json} and {options.markdown}")
    over = [(r["id"], r["instructions_per_request"], limits[r["id"]])
            for r in results if r["id"] in limits and r["instructions_per_request"] > limits[r["id"]]]
    for scenario_id, value, limit in over:
        print(f"scenario {scenario_id}: {value:,} instructions per request, over the limit of {limit:,}; "
              "find the change that added them with --wasm and a build of the previous commit",
              file=sys.stderr)
    if over:
        sys.exit(1)
    for scenario_id, limit in limits.items():
        print(f"scenario {scenario_id}: within the limit of {limit:,} instructions per request")


if __name__ == "__main__":
    main()
