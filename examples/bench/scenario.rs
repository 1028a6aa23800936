//! The benchmark's scenarios and the Envoy bootstrap each one runs on,
//! rendered from the templates in bench/.

use std::path::Path;

/// Client request header that makes examples/bench_upstream.rs wait before
/// it responds, in microseconds. The filter's targets set it on side calls.
pub const DELAY_HEADER: &str = "x-bench-delay-us";

/// Fan-out scenario: the primary upstream responds after 2 ms and the
/// awaited side upstream after 5 ms, so max(primary, side) and the sum
/// (7 ms) are far enough apart to tell which one the client waits for.
pub const FANOUT_PRIMARY_DELAY_US: u64 = 2_000;
pub const FANOUT_SIDE_DELAY_US: u64 = 5_000;

/// Slow side upstream of scenario 6: 10 ms per side call. The primary
/// upstream responds at once, and the report prints how many times scenario
/// 1's p50 this delay is.
pub const SLOW_SIDE_DELAY_US: u64 = 10_000;

/// Host clock reads per request in scenario 0-calls, which prices one host
/// call as (0-calls − 0) / this.
pub const FLOOR_CLOCK_READS: u32 = 20;

/// Request path of every scenario. The shadow and fan-out rules match it,
/// the no-match rule does not.
pub const REQUEST_PATH: &str = "/bench";

/// Envoy's filters and route options besides routing to the primary cluster.
#[derive(Clone, Copy, Debug)]
pub enum Setup {
    /// Router only.
    NoFilter,
    /// Router with the route's `request_mirror_policies` to this cluster.
    Mirror { cluster: &'static str },
    /// examples/floor_filter.rs, loaded the way the mesh-fanout filter is.
    /// It does nothing, or with a side cluster, sends each request there
    /// the cheapest way proxy-wasm can.
    Floor {
        side_cluster: Option<&'static str>,
        /// Host clock reads per request, to price one host call.
        clock_reads: u32,
        /// Hands each side call to the root context before it is sent, as
        /// mesh-fanout does, so its response outlives the request.
        handoff: bool,
    },
    /// The mesh-fanout filter with a plugin configuration from bench/plugins/.
    Filter {
        /// File name in bench/plugins/.
        plugin: &'static str,
        /// Fills `${SIDE_CLUSTER}` in the plugin configuration.
        side_cluster: &'static str,
        /// Fills `${SIDE_DELAY_US}`: the delay that the side call requests from
        /// the upstream.
        side_delay_us: u64,
    },
}

impl Setup {
    pub fn describe(&self) -> &'static str {
        match self {
            Setup::NoFilter => "router only",
            Setup::Mirror { .. } => "request_mirror_policies",
            Setup::Floor {
                side_cluster: Some(_),
                handoff: true,
                ..
            } => "floor_filter, one side call from the root (examples/floor_filter.rs)",
            Setup::Floor {
                side_cluster: Some(_),
                ..
            } => "floor_filter, one side call (examples/floor_filter.rs)",
            Setup::Floor {
                clock_reads: 1.., ..
            } => "floor_filter, host clock reads (examples/floor_filter.rs)",
            Setup::Floor { .. } => "floor_filter, empty (examples/floor_filter.rs)",
            Setup::Filter { .. } => "mesh-fanout",
        }
    }
}

/// Scenarios that share a request shape, and so a fixed request rate and
/// the baselines that their ratios use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Get,
    Post1k,
    Post64k,
    Fanout,
}

impl Group {
    pub fn name(self) -> &'static str {
        match self {
            Group::Get => "GET",
            Group::Post1k => "POST 1 KiB",
            Group::Post64k => "POST 64 KiB",
            Group::Fanout => "fan-out",
        }
    }

    /// Ids of the no-filter and the built-in mirror scenario with the same
    /// request, which every ratio in the group compares against.
    pub fn baselines(self) -> Option<(&'static str, &'static str)> {
        match self {
            Group::Get => Some(("1", "2")),
            Group::Post1k => Some(("1-1k", "2-1k")),
            Group::Post64k => Some(("1-64k", "2-64k")),
            Group::Fanout => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Scenario {
    /// Short id used in the tables, the JSON and the target checks.
    pub id: &'static str,
    pub title: &'static str,
    pub setup: Setup,
    pub group: Group,
    /// `GET` or `POST`.
    pub method: &'static str,
    pub body_bytes: usize,
    /// Value of `DELAY_HEADER` on client requests, so on the primary's; 0
    /// sends no header.
    pub client_delay_us: u64,
    /// Whether the scenario has a closed-loop (maximum throughput) run.
    pub closed_loop: bool,
    /// Whether the scenario has a fixed-rate (latency) run.
    pub fixed_rate: bool,
    /// Whether `--smoke` runs it.
    pub in_smoke: bool,
}

const MIRROR: Setup = Setup::Mirror { cluster: "side" };

const fn shadow_to(side_cluster: &'static str, side_delay_us: u64) -> Setup {
    Setup::Filter {
        plugin: "shadow.json",
        side_cluster,
        side_delay_us,
    }
}

const fn get(id: &'static str, title: &'static str, setup: Setup) -> Scenario {
    Scenario {
        id,
        title,
        setup,
        group: Group::Get,
        method: "GET",
        body_bytes: 0,
        client_delay_us: 0,
        closed_loop: true,
        fixed_rate: true,
        in_smoke: false,
    }
}

const fn post(id: &'static str, title: &'static str, setup: Setup, body_bytes: usize) -> Scenario {
    Scenario {
        id,
        title,
        setup,
        group: if body_bytes == 1024 {
            Group::Post1k
        } else {
            Group::Post64k
        },
        method: "POST",
        body_bytes,
        client_delay_us: 0,
        closed_loop: true,
        fixed_rate: true,
        in_smoke: false,
    }
}

const fn fanout(
    id: &'static str,
    title: &'static str,
    setup: Setup,
    client_delay_us: u64,
) -> Scenario {
    Scenario {
        id,
        title,
        setup,
        group: Group::Fanout,
        method: "GET",
        body_bytes: 0,
        client_delay_us,
        closed_loop: false,
        fixed_rate: true,
        in_smoke: false,
    }
}

const fn smoke(mut scenario: Scenario) -> Scenario {
    scenario.in_smoke = true;
    scenario
}

const fn closed_loop_only(mut scenario: Scenario) -> Scenario {
    scenario.fixed_rate = false;
    scenario
}

const fn with_closed_loop(mut scenario: Scenario) -> Scenario {
    scenario.closed_loop = true;
    scenario
}

/// Every scenario in run order. Closed-loop runs go through this list
/// first, then the fixed-rate runs, so "1-again" measures how far the
/// machine drifted during the closed-loop runs. Scenarios that a target
/// compares (1, 2, 3, 6-slow, 6-dead, 7) run next to each other, so a
/// change in background load between them is less likely.
pub const SCENARIOS: &[Scenario] = &[
    smoke(get("1", "no filter", Setup::NoFilter)),
    smoke(get("2", "built-in mirror", MIRROR)),
    smoke(get(
        "0",
        "empty proxy-wasm filter",
        Setup::Floor {
            side_cluster: None,
            clock_reads: 0,
            handoff: false,
        },
    )),
    get(
        "0-calls",
        "empty filter, 20 host calls",
        Setup::Floor {
            side_cluster: None,
            clock_reads: FLOOR_CLOCK_READS,
            handoff: false,
        },
    ),
    get(
        "0-dispatch",
        "minimal proxy-wasm side call",
        Setup::Floor {
            side_cluster: Some("side"),
            clock_reads: 0,
            handoff: false,
        },
    ),
    get(
        "0-handoff",
        "minimal side call from the root",
        Setup::Floor {
            side_cluster: Some("side"),
            clock_reads: 0,
            handoff: true,
        },
    ),
    smoke(get("3", "shadow, GET", shadow_to("side", 0))),
    get(
        "3-sampled-out",
        "shadow rule matches, sampled out",
        Setup::Filter {
            plugin: "sampled-out.json",
            side_cluster: "side",
            side_delay_us: 0,
        },
    ),
    get(
        "6-slow",
        "shadow, side 10 ms slow",
        shadow_to("side", SLOW_SIDE_DELAY_US),
    ),
    get("6-dead", "shadow, side down", shadow_to("side_dead", 0)),
    get(
        "2-slow",
        "built-in mirror, side 10 ms slow",
        Setup::Mirror {
            cluster: "side_slow",
        },
    ),
    get(
        "2-dead",
        "built-in mirror, side down",
        Setup::Mirror {
            cluster: "side_dead",
        },
    ),
    smoke(get(
        "7",
        "filter, no rule matches",
        Setup::Filter {
            plugin: "no-match.json",
            side_cluster: "side",
            side_delay_us: 0,
        },
    )),
    get(
        "7-headers",
        "no rule matches, header matcher",
        Setup::Filter {
            plugin: "no-match-headers.json",
            side_cluster: "side",
            side_delay_us: 0,
        },
    ),
    smoke(with_closed_loop(fanout(
        "5",
        "fan-out, 1 awaited target",
        Setup::Filter {
            plugin: "fanout.json",
            side_cluster: "side",
            side_delay_us: FANOUT_SIDE_DELAY_US,
        },
        FANOUT_PRIMARY_DELAY_US,
    ))),
    fanout(
        "5-primary",
        "no filter, 5's primary delay",
        Setup::NoFilter,
        FANOUT_PRIMARY_DELAY_US,
    ),
    fanout(
        "5-side",
        "no filter, 5's side delay",
        Setup::NoFilter,
        FANOUT_SIDE_DELAY_US,
    ),
    post("1-1k", "no filter, POST 1 KiB", Setup::NoFilter, 1024),
    post("2-1k", "built-in mirror, POST 1 KiB", MIRROR, 1024),
    post("4-1k", "shadow, POST 1 KiB", shadow_to("side", 0), 1024),
    post("1-64k", "no filter, POST 64 KiB", Setup::NoFilter, 65536),
    post("2-64k", "built-in mirror, POST 64 KiB", MIRROR, 65536),
    smoke(post(
        "4-64k",
        "shadow, POST 64 KiB",
        shadow_to("side", 0),
        65536,
    )),
    closed_loop_only(get("1-again", "no filter, repeated", Setup::NoFilter)),
];

pub fn find(id: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|s| s.id == id)
}

/// Ports and paths that every rendered bootstrap uses.
pub struct Ports {
    pub listener: u16,
    pub admin: u16,
    pub primary: u16,
    pub side: u16,
    /// The upstream's port that waits [`SLOW_SIDE_DELAY_US`] before each
    /// response that sets no delay.
    pub slow_side: u16,
    /// A port that nothing listens on.
    pub dead: u16,
}

/// Renders bench/envoy.yaml for `scenario`.
///
/// Full-line `#` comments of the templates are dropped first, so comments
/// may mention placeholders. Returns an error naming the file and the
/// placeholder when one is left unfilled.
pub fn render_bootstrap(
    bench_dir: &Path,
    scenario: &Scenario,
    ports: &Ports,
    wasm: &Path,
    floor_wasm: &Path,
) -> Result<String, String> {
    let template = read_template(bench_dir, "envoy.yaml")?;
    let mirror = match scenario.setup {
        Setup::Mirror { cluster } => fill(
            &read_template(bench_dir, "mirror-policy.yaml")?,
            &[("MIRROR_CLUSTER", cluster.to_owned())],
        ),
        _ => String::new(),
    };
    let filter = match scenario.setup {
        Setup::Filter {
            plugin,
            side_cluster,
            side_delay_us,
        } => {
            let plugin_path = format!("plugins/{plugin}");
            let plugin_config = fill(
                &read_template(bench_dir, &plugin_path)?,
                &[
                    ("SIDE_CLUSTER", side_cluster.to_owned()),
                    ("SIDE_DELAY_US", side_delay_us.to_string()),
                ],
            );
            check_filled(&plugin_config, &plugin_path)?;
            let wasm_filter = fill(
                &read_template(bench_dir, "wasm-filter.yaml")?,
                &[
                    ("WASM", wasm.display().to_string()),
                    ("PLUGIN_CONFIG", plugin_config),
                ],
            );
            check_filled(&wasm_filter, "wasm-filter.yaml")?;
            wasm_filter
        }
        Setup::Floor {
            side_cluster,
            clock_reads,
            handoff,
        } => fill(
            &read_template(bench_dir, "wasm-filter.yaml")?,
            &[
                ("WASM", floor_wasm.display().to_string()),
                (
                    "PLUGIN_CONFIG",
                    match side_cluster {
                        Some(cluster) => format!(
                            r#"{{"side_cluster": "{cluster}", "clock_reads": {clock_reads}, "handoff": {handoff}}}"#
                        ),
                        None => format!(r#"{{"clock_reads": {clock_reads}}}"#),
                    },
                ),
            ],
        ),
        _ => String::new(),
    };
    let rendered = fill(
        &template,
        &[
            ("LISTENER_PORT", ports.listener.to_string()),
            ("ADMIN_PORT", ports.admin.to_string()),
            ("PRIMARY_PORT", ports.primary.to_string()),
            ("SIDE_PORT", ports.side.to_string()),
            ("SLOW_SIDE_PORT", ports.slow_side.to_string()),
            ("DEAD_PORT", ports.dead.to_string()),
            ("ROUTE_MIRROR", mirror),
            ("WASM_FILTER", filter),
        ],
    );
    check_filled(&rendered, "envoy.yaml")?;
    Ok(rendered)
}

/// Reads `name` under `bench_dir` without its full-line `#` comments.
fn read_template(bench_dir: &Path, name: &str) -> Result<String, String> {
    let path = bench_dir.join(name);
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("reading template {} failed: {e}", path.display()))?;
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim_start().starts_with('#'))
        .collect();
    Ok(lines.join("\n"))
}

/// Replaces each `${NAME}` of `values`. A placeholder alone on its line
/// becomes the value's lines, each indented like the placeholder, or
/// nothing for an empty value. Elsewhere it is replaced in place.
fn fill(template: &str, values: &[(&str, String)]) -> String {
    let mut out = Vec::new();
    for line in template.lines() {
        let trimmed = line.trim();
        let block = values
            .iter()
            .find(|(name, _)| trimmed == format!("${{{name}}}"));
        if let Some((_, value)) = block {
            let indent = &line[..line.len() - line.trim_start().len()];
            out.extend(
                value
                    .lines()
                    .map(|value_line| format!("{indent}{value_line}")),
            );
            continue;
        }
        let mut replaced = line.to_owned();
        for (name, value) in values {
            replaced = replaced.replace(&format!("${{{name}}}"), value);
        }
        out.push(replaced);
    }
    let mut text = out.join("\n");
    text.push('\n');
    text
}

fn check_filled(text: &str, file: &str) -> Result<(), String> {
    match text.find("${") {
        None => Ok(()),
        Some(start) => {
            let rest = &text[start..];
            let end = rest.find('}').map_or(rest.len(), |i| i + 1);
            Err(format!(
                "template bench/{file}: placeholder {} has no value",
                &rest[..end]
            ))
        }
    }
}
