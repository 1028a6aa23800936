//! The Markdown page of a report.

use std::fmt::Write as _;

use super::{
    group_digits, Report, RunResult, Setup, FANOUT_PRIMARY_DELAY_US, FANOUT_SIDE_DELAY_US,
    SLOW_SIDE_DELAY_US,
};
use crate::scenario;

impl Report {
    /// Renders the page, which links the plot `svg_name` beside it and
    /// names `json_path`, where the same results are.
    pub(super) fn markdown(&self, svg_name: &str, json_path: &str) -> String {
        let mut md = String::new();
        let load =
            |values: [f64; 3]| format!("{:.2}, {:.2}, {:.2}", values[0], values[1], values[2]);
        let _ = writeln!(md, "# Benchmarks\n");
        let _ = writeln!(
            md,
            "mesh-fanout against Envoy without a filter and Envoy's built-in \
             `request_mirror_policies`, measured on one machine in one run. \
             examples/bench/ produced this page, {json_path} and {svg_name}; \
             run `make bench` to measure again, which overwrites the three files \
             of docs/ and bench/.\n"
        );
        if self.smoke {
            let _ = writeln!(
                md,
                "**This is a smoke run** (`--smoke`): a subset of the scenarios with \
                 very short runs. Its figures check that the benchmark works and \
                 measure nothing.\n"
            );
        }

        let _ = writeln!(md, "## Setup\n");
        let _ = writeln!(md, "| | |\n| --- | --- |");
        let _ = writeln!(md, "| command | {} |", self.command);
        let _ = writeln!(md, "| started | {} UTC |", self.started_at_utc);
        let _ = writeln!(md, "| Envoy | `{}` |", self.envoy_version);
        let _ = writeln!(md, "| load generator | `{}` |", self.oha_version);
        let _ = writeln!(md, "| mesh-fanout | commit {} |", self.git_commit);
        let _ = writeln!(
            md,
            "| machine | `nproc` {}, {}, {} memory, Linux {} |",
            self.machine.nproc,
            self.machine.cpu_model,
            self.machine
                .memory_kib
                .map_or("unknown".to_owned(), |kib| format!(
                    "{:.1} GiB",
                    kib as f64 / 1024.0 / 1024.0
                )),
            self.machine.kernel
        );
        let _ = writeln!(
            md,
            "| load average (1, 5, 15 min) | {} at the start, {} at the end |",
            load(self.machine.load_average_start),
            load(self.machine.load_average_end)
        );
        let _ = writeln!(
            md,
            "| CPUs | Envoy `--concurrency 1` on CPU {}; oha, the upstream and the bench program on CPU {} |",
            cpu_text(self.machine.envoy_cpu),
            cpu_text(self.machine.load_cpu)
        );
        let _ = writeln!(
            md,
            "| runs | a {:.1} s closed-loop warm-up before each phase; closed loop {:.1} s; fixed rate {} × {:.1} s; {} connections, HTTP/1.1 keep-alive |",
            self.settings.warmup_s,
            self.settings.duration_s,
            self.settings.rate_runs,
            self.settings.rate_duration_s,
            self.settings.connections
        );
        let rates: Vec<String> = self
            .fixed_rates
            .iter()
            .map(|(group, rate)| format!("{group} {rate:.0}"))
            .collect();
        let _ = writeln!(
            md,
            "| fixed rates (req/s) | {}: {:.0} % of the lowest closed-loop throughput in each group |",
            rates.join(", "),
            self.settings.rate_fraction * 100.0
        );
        let _ = writeln!(
            md,
            "| mesh_fanout.wasm | {} bytes |",
            group_digits(self.wasm.bytes)
        );
        let _ = writeln!(
            md,
            "| VM start | {} on the main thread, {} per worker (medians over the Envoy starts with the filter; see below) |\n",
            ms_text(self.wasm.main_vm_start_ms),
            ms_text(self.wasm.worker_vm_start_ms)
        );

        self.markdown_scenarios(&mut md);
        self.markdown_throughput(&mut md);
        self.markdown_cpu_steps(&mut md);
        self.markdown_latency(&mut md);

        let _ = writeln!(md, "## Targets\n");
        let _ = writeln!(
            md,
            "The project's goals for the filter, each checked on this run's figures. \
             `make bench` reports them and exits 0 whatever they show; \
             README.md's Performance section says what a FAIL means for users.\n"
        );
        let _ = writeln!(md, "| target | result | figures |\n| --- | --- | --- |");
        for target in &self.targets {
            let _ = writeln!(
                md,
                "| {} | **{}** | {} |",
                target.name,
                target.verdict(),
                target.detail
            );
        }
        let _ = writeln!(md);
        let _ = writeln!(
            md,
            "![Closed-loop throughput and fixed-rate latency per scenario]({svg_name})\n"
        );
        self.markdown_method(&mut md);
        md
    }

    fn markdown_scenarios(&self, md: &mut String) {
        let _ = writeln!(md, "## Scenarios\n");
        let _ = writeln!(
            md,
            "Every scenario sends its requests to `{}` and Envoy routes them to \
             the same upstream process, examples/bench_upstream.rs, on two ports \
             (primary and side). It responds `200 ok` at once unless the request \
             header `{}` sets a delay.\n",
            scenario::REQUEST_PATH,
            scenario::DELAY_HEADER
        );
        let _ = writeln!(
            md,
            "| id | scenario | Envoy setup | request |\n| --- | --- | --- | --- |"
        );
        for result in &self.scenarios {
            let plugin = scenario::find(&result.id).and_then(|s| match s.setup {
                Setup::Filter { plugin, .. } => Some(plugin),
                _ => None,
            });
            let setup = match plugin {
                Some(plugin) => format!("{} (bench/plugins/{plugin})", result.setup),
                None => result.setup.clone(),
            };
            let request = if result.body_bytes > 0 {
                format!(
                    "{} with {} bytes",
                    result.method,
                    group_digits(result.body_bytes as u64)
                )
            } else {
                result.method.clone()
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                result.id, result.title, setup, request
            );
        }
        let _ = writeln!(
            md,
            "\nIn 5 the primary upstream waits {} ms and the awaited side upstream {} ms; \
             5-primary and 5-side send the same requests without the filter, with \
             each of those delays. In 6-slow the side upstream waits {} ms; in \
             6-dead nothing listens on its port. 2-slow and 2-dead give the built-in \
             mirror the same slow and dead side, which shows what a slow or dead \
             side costs Envoy itself. The rule of 7 matches `POST \
             /api/v1/register` by method and path, so for other requests the filter \
             reads only `:path`; 7-headers adds a header matcher, which makes the \
             filter copy every request's whole header map. 0-dispatch sends its side \
             call from the request's context, whose response the proxy-wasm SDK \
             drops once the request is gone; 0-handoff sends it from the root \
             context, as mesh-fanout does, which keeps every outcome. 1-again \
             repeats 1 after the other closed-loop runs.\n",
            FANOUT_PRIMARY_DELAY_US as f64 / 1000.0,
            FANOUT_SIDE_DELAY_US as f64 / 1000.0,
            SLOW_SIDE_DELAY_US as f64 / 1000.0
        );
        let primary_p50 = self.fixed("1").map(|run| run.client.percentile("p50"));
        if let (Some(p50), Some(_)) = (primary_p50, self.scenario("6-slow")) {
            let _ = writeln!(
                md,
                "Scenario 1's p50 is {p50:.3} ms, so 6-slow's side upstream is {:.0} times \
                 slower than the primary as the client sees it.\n",
                SLOW_SIDE_DELAY_US as f64 / 1000.0 / p50
            );
        }
    }

    fn markdown_throughput(&self, md: &mut String) {
        let _ = writeln!(md, "## Throughput (closed loop)\n");
        let _ = writeln!(
            md,
            "| id | req/s | × no filter | × mirror | Envoy CPU µs/req | × no filter | Envoy CPU busy | Envoy RSS MiB | side calls completed / requests | failed requests | load average |"
        );
        let _ = writeln!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
        );
        for result in &self.scenarios {
            let Some(run) = &result.closed_loop else {
                continue;
            };
            let ratios = result.ratios.as_ref();
            let _ = writeln!(
                md,
                "| {} | {:.0} | {} | {} | {:.1} | {} | {:.0} % | {:.1} | {} | {} | {:.2} |",
                result.id,
                run.client.requests_per_s,
                ratio_text(ratios.and_then(|r| r.throughput_vs_no_filter)),
                ratio_text(ratios.and_then(|r| r.throughput_vs_mirror)),
                run.envoy_cpu_us_per_request,
                ratio_text(ratios.and_then(|r| r.cpu_per_request_vs_no_filter)),
                run.envoy_cpu_busy_percent,
                run.memory.rss_kib as f64 / 1024.0,
                side_text(run),
                run.client.failed(),
                run.load_average[0]
            );
        }
        if let Some(drift) = self.drift_no_filter {
            let _ = writeln!(
                md,
                "\n1-again's throughput differs from 1's by {:+.1} %, a rough measure \
                 of the run-to-run noise on this machine.",
                drift * 100.0
            );
        }
        if let Some(run) = self.closed("5") {
            let _ = writeln!(
                md,
                "\nEnvoy's CPU was not the limit in 5 (busy {:.0} %): each connection \
                 waits for the slower upstream, so the closed loop cannot exceed \
                 {} connections ÷ {:.1} ms.",
                run.envoy_cpu_busy_percent,
                self.settings.connections,
                run.client.percentile("p50")
            );
        }
        let _ = writeln!(md);
    }

    /// Splits the shadow scenario's CPU per request into steps, each the
    /// difference between two closed-loop runs that differ by that step.
    fn markdown_cpu_steps(&self, md: &mut String) {
        let cpu = |id: &str| self.closed(id).map(|run| run.envoy_cpu_us_per_request);
        let steps = [
            ("0", "1", "any proxy-wasm filter: a context and its callbacks, per request"),
            ("2", "1", "the built-in mirror's side call"),
            (
                "0-dispatch",
                "0",
                "the cheapest proxy-wasm side call: one header copy, the dispatch, Envoy's async client",
            ),
            (
                "0-handoff",
                "0-dispatch",
                "handing the side call to the root context, so its response outlives the request",
            ),
            ("7", "0", "mesh-fanout with no rule matching: reading `:path`"),
            (
                "3-sampled-out",
                "7",
                "a rule matches: the whole header map copied instead of `:path`, matching, sampling, two counters",
            ),
            (
                "3",
                "3-sampled-out",
                "mesh-fanout's side call: handoff to the root, dispatch, response, stats",
            ),
            (
                "3",
                "0-handoff",
                "mesh-fanout's shadow beyond the cheapest side call that keeps its outcome",
            ),
        ];
        let rows: Vec<String> = steps
            .iter()
            .filter_map(|(with, without, what)| {
                let (with_cpu, without_cpu) = (cpu(with)?, cpu(without)?);
                Some(format!(
                    "| {with} − {without} | {what} | {:+.1} |",
                    with_cpu - without_cpu
                ))
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        let _ = writeln!(
            md,
            "## Where the CPU goes
"
        );
        let _ = writeln!(
            md,
            "Envoy CPU µs per request of one closed-loop run minus another's. \
             Each difference carries the noise of two runs (see 1-again).\n"
        );
        let _ = writeln!(md, "| runs | step | µs/req |\n| --- | --- | ---: |");
        for row in rows {
            let _ = writeln!(md, "{row}");
        }
        if let (Some(calls), Some(empty)) = (cpu("0-calls"), cpu("0")) {
            let _ = writeln!(
                md,
                "\n0-calls − 0 prices one host call (a clock read) at {:.2} µs, \
                 from {} reads per request.",
                (calls - empty) / f64::from(scenario::FLOOR_CLOCK_READS),
                scenario::FLOOR_CLOCK_READS
            );
        }
        if let (Some(none), Some(mirror), Some(empty)) = (cpu("1"), cpu("2"), cpu("0")) {
            // Throughput at a CPU-bound closed loop is about 1 / (CPU per
            // request), so a ratio target turns into a CPU allowance.
            let shadow_allowance = mirror / 0.97 - mirror;
            let no_match_allowance = none / 0.99 - none;
            let _ = writeln!(
                md,
                "\nWith Envoy's CPU the limit, throughput is about the inverse of CPU per \
                 request. Shadow at 0.97 × the mirror's throughput then allows {:.1} µs \
                 per request beyond the mirror's {mirror:.1}, and 0.99 × no filter allows \
                 {:.1} µs beyond {none:.1}. An empty proxy-wasm filter alone adds {:.1} µs.\n",
                shadow_allowance,
                no_match_allowance,
                empty - none
            );
        } else {
            let _ = writeln!(md);
        }
    }

    fn markdown_latency(&self, md: &mut String) {
        let _ = writeln!(md, "## Latency (fixed rate)\n");
        let _ = writeln!(
            md,
            "Each latency is the median of that percentile over {} runs of {:.1} s; \
             the JSON has the figures of each run. The load average column, in both \
             tables, is the 1-minute load average once the phase's Envoy was ready. CPU per request is higher than in \
             the closed loop. A likely reason, not measured here, is that Envoy \
             handles fewer requests per event-loop wake-up at a fixed rate. \
             Every scenario of a group gets the same rate, so Envoy's CPU busy share \
             grows with its CPU per request, and requests queue behind each other \
             more often as it grows: compare the busy and p99 columns.\n",
            self.settings.rate_runs, self.settings.rate_duration_s
        );
        let _ = writeln!(
            md,
            "| id | rate req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | p99 × no filter | p99 × mirror | Envoy CPU µs/req | Envoy CPU busy | side calls completed / requests | failed requests | load average |"
        );
        let _ = writeln!(
            md,
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |"
        );
        for result in &self.scenarios {
            let Some(run) = &result.fixed_rate else {
                continue;
            };
            let ratios = result.ratios.as_ref();
            let _ = writeln!(
                md,
                "| {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {:.1} | {:.0} % | {} | {} | {:.2} |",
                result.id,
                run.rate.unwrap_or(f64::NAN),
                run.client.percentile("p50"),
                run.client.percentile("p90"),
                run.client.percentile("p99"),
                run.client.percentile("p99.9"),
                ratio_text(ratios.and_then(|r| r.p99_vs_no_filter)),
                ratio_text(ratios.and_then(|r| r.p99_vs_mirror)),
                run.envoy_cpu_us_per_request,
                run.envoy_cpu_busy_percent,
                side_text(run),
                run.client.failed(),
                run.load_average[0]
            );
        }
        let _ = writeln!(md);
    }

    fn markdown_method(&self, md: &mut String) {
        let lines = [
            "## How it is measured\n".to_owned(),
            "- Each run starts its own Envoy from bench/envoy.yaml and the snippets \
             beside it, pinned with `taskset` and with `--concurrency 1`, so one \
             worker thread serves all traffic."
                .to_owned(),
            "- oha runs with `--wait-ongoing-requests-after-deadline`, so every request \
             it sends gets its response and is counted. Fixed-rate runs add `-q RATE \
             --latency-correction`, which measures each request from the time it was \
             scheduled, so a stall also counts against the requests queued behind it. \
             The latency columns come from the fixed-rate runs only."
                .to_owned(),
            "- Envoy CPU per request is the change in utime + stime of \
             /proc/PID/stat over the measured run, divided by the change in \
             `http.bench.downstream_rq_completed`. Envoy CPU busy is the same CPU \
             time over the run's wall time; near 100 % means Envoy's CPU was the \
             limit of the closed loop. RSS is `VmRSS` of /proc/PID/status right \
             after the run; the JSON also has the peak (`VmHWM`)."
                .to_owned(),
            "- Side calls completed are, for mesh-fanout, the sum of \
             `wasmcustom.mesh_fanout.rule.bench.target.side.outcome.*.side_calls` \
             and, for the built-in mirror, `cluster.side.upstream_rq_completed`. \
             Both are read after the in-flight gauges return to 0, as the change \
             over the measured run. In 6-dead every side call ends as `reset`, so \
             it completes without a response."
                .to_owned(),
            format!(
                "- VM start: Envoy logs with microsecond timestamps. The main-thread \
                 figure is the time from `loading N listener(s)` to the filter's first \
                 `mesh-fanout configured` line (V8 creates the VM, compiles the module \
                 and runs `on_configure`). The worker figure is from `starting workers` \
                 to the next such line. The whole listener setup took {} with the \
                 filter and {} without it; Envoy reported ready {} and {} after its \
                 spawn (medians, polled every 20 ms).",
                ms_text(self.wasm.listeners_with_filter_ms),
                ms_text(self.wasm.listeners_without_filter_ms),
                ms_text(self.wasm.ready_with_filter_ms),
                ms_text(self.wasm.ready_without_filter_ms)
            ),
            "- Limits: one run of each scenario, so differences of a few percent are \
             within the noise that 1-again shows. oha shares its CPU with the \
             upstream, which serves twice the requests when a side call goes to it. \
             Other processes on the machine add to the load average above."
                .to_owned(),
        ];
        for line in lines {
            let _ = writeln!(md, "{line}");
        }
    }
}

fn side_text(run: &RunResult) -> String {
    match &run.side_calls {
        None => "–".to_owned(),
        Some(side) => {
            let mut text = format!(
                "{} / {}",
                group_digits(side.completed),
                group_digits(run.envoy_requests)
            );
            let others: Vec<String> = side
                .outcomes
                .iter()
                .filter(|(name, _)| name.as_str() != "success" && name.as_str() != "2xx")
                .filter(|(_, &count)| count > 0)
                .map(|(name, count)| format!("{name} {}", group_digits(*count)))
                .collect();
            if !others.is_empty() {
                let _ = write!(text, " ({})", others.join(", "));
            }
            text
        }
    }
}

fn ratio_text(ratio: Option<f64>) -> String {
    ratio.map_or("–".to_owned(), |ratio| format!("{ratio:.3}"))
}

fn ms_text(ms: Option<f64>) -> String {
    ms.map_or("not measured".to_owned(), |ms| format!("{ms:.1} ms"))
}

fn cpu_text(cpu: Option<usize>) -> String {
    cpu.map_or("(unpinned)".to_owned(), |cpu| cpu.to_string())
}
