//! The SVG plot of a report, drawn without a plotting library.

use std::fmt::Write as _;

use super::Report;

impl Report {
    /// Renders one row per scenario: closed-loop throughput bars on the
    /// left, fixed-rate latency percentiles on a log scale on the right.
    pub(super) fn svg(&self) -> String {
        const WIDTH: f64 = 1040.0;
        const ROW: f64 = 24.0;
        const TOP: f64 = 56.0;
        const LABEL_WIDTH: f64 = 290.0;
        const BAR_LEFT: f64 = LABEL_WIDTH + 10.0;
        const BAR_WIDTH: f64 = 300.0;
        const LAT_LEFT: f64 = BAR_LEFT + BAR_WIDTH + 60.0;
        const LAT_WIDTH: f64 = WIDTH - LAT_LEFT - 30.0;

        let rows = &self.scenarios;
        let height = TOP + ROW * rows.len() as f64 + 70.0;
        let max_rps = rows
            .iter()
            .filter_map(|r| r.closed_loop.as_ref())
            .map(|run| run.client.requests_per_s)
            .fold(0.0_f64, f64::max)
            .max(1.0);
        let latencies: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.fixed_rate.as_ref())
            .flat_map(|run| run.client.latency_ms.values().copied())
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        let low = latencies.iter().copied().fold(f64::INFINITY, f64::min);
        let high = latencies.iter().copied().fold(0.0_f64, f64::max);
        let (log_low, log_high) = if latencies.is_empty() {
            (-1.0, 2.0)
        } else {
            (
                low.log10().floor(),
                high.log10().ceil().max(low.log10().floor() + 1.0),
            )
        };
        let lat_x = |ms: f64| LAT_LEFT + (ms.log10() - log_low) / (log_high - log_low) * LAT_WIDTH;

        let mut svg = String::new();
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            svg,
            r#"<text x="{BAR_LEFT}" y="20" font-size="14" font-weight="bold">Closed-loop throughput (req/s)</text>"#
        );
        let _ = writeln!(
            svg,
            r#"<text x="{LAT_LEFT}" y="20" font-size="14" font-weight="bold">Fixed-rate latency (ms, log scale)</text>"#
        );
        let _ = writeln!(
            svg,
            r##"<text x="{LAT_LEFT}" y="38" fill="#444">line p50 to p99.9; ● p50  ◆ p99  | p90, p99.9</text>"##
        );

        // Latency grid: one line per decade.
        let axis_bottom = TOP + ROW * rows.len() as f64;
        let mut decade = log_low;
        while decade <= log_high + 1e-9 {
            let ms = 10_f64.powf(decade);
            let x = lat_x(ms);
            let _ = writeln!(
                svg,
                r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{axis_bottom:.1}" stroke="#ddd"/>"##,
                TOP - 8.0
            );
            let _ = writeln!(
                svg,
                r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                axis_bottom + 16.0,
                trim_number(ms)
            );
            decade += 1.0;
        }
        let _ = writeln!(
            svg,
            r#"<text x="{BAR_LEFT}" y="{:.1}">0</text><text x="{:.1}" y="{:.1}" text-anchor="end">{:.0}</text>"#,
            axis_bottom + 16.0,
            BAR_LEFT + BAR_WIDTH,
            axis_bottom + 16.0,
            max_rps
        );

        for (index, result) in rows.iter().enumerate() {
            let y = TOP + ROW * index as f64;
            let middle = y + ROW / 2.0;
            let color = match result.setup.as_str() {
                "router only" => "#8c8c8c",
                "request_mirror_policies" => "#e08a1e",
                _ => "#2f6db5",
            };
            let _ = writeln!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{} {}</text>"#,
                LABEL_WIDTH,
                middle + 4.0,
                xml_escape(&result.id),
                xml_escape(&result.title)
            );
            if let Some(run) = &result.closed_loop {
                let width = run.client.requests_per_s / max_rps * BAR_WIDTH;
                let _ = writeln!(
                    svg,
                    r#"<rect x="{BAR_LEFT}" y="{:.1}" width="{width:.1}" height="{:.1}" fill="{color}"/>"#,
                    y + 4.0,
                    ROW - 8.0
                );
                let _ = writeln!(
                    svg,
                    r#"<text x="{:.1}" y="{:.1}">{:.0}</text>"#,
                    BAR_LEFT + width + 4.0,
                    middle + 4.0,
                    run.client.requests_per_s
                );
            }
            if let Some(run) = &result.fixed_rate {
                let p = |key: &str| run.client.percentile(key);
                if [p("p50"), p("p99.9")]
                    .iter()
                    .all(|v| v.is_finite() && *v > 0.0)
                {
                    let _ = writeln!(
                        svg,
                        r#"<line x1="{:.1}" y1="{middle:.1}" x2="{:.1}" y2="{middle:.1}" stroke="{color}" stroke-width="2"/>"#,
                        lat_x(p("p50")),
                        lat_x(p("p99.9"))
                    );
                    for key in ["p90", "p99.9"] {
                        let x = lat_x(p(key));
                        let _ = writeln!(
                            svg,
                            r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{color}" stroke-width="2"/>"#,
                            middle - 6.0,
                            middle + 6.0
                        );
                    }
                    let _ = writeln!(
                        svg,
                        r#"<circle cx="{:.1}" cy="{middle:.1}" r="4.5" fill="{color}"/>"#,
                        lat_x(p("p50"))
                    );
                    let x99 = lat_x(p("p99"));
                    let _ = writeln!(
                        svg,
                        r#"<path d="M{x99:.1} {:.1} L{:.1} {middle:.1} L{x99:.1} {:.1} L{:.1} {middle:.1} Z" fill="{color}"/>"#,
                        middle - 6.0,
                        x99 + 6.0,
                        middle + 6.0,
                        x99 - 6.0
                    );
                }
            }
        }

        let legend_y = axis_bottom + 44.0;
        for (offset, (color, label)) in [
            ("#8c8c8c", "no filter"),
            ("#e08a1e", "built-in mirror"),
            ("#2f6db5", "mesh-fanout"),
        ]
        .iter()
        .enumerate()
        {
            let x = BAR_LEFT + offset as f64 * 150.0;
            let _ = writeln!(
                svg,
                r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{color}"/><text x="{:.1}" y="{legend_y:.1}">{label}</text>"#,
                legend_y - 10.0,
                x + 18.0
            );
        }
        let _ = writeln!(
            svg,
            r##"<text x="10" y="{:.1}" fill="#444">{} | Envoy {} | {} CPUs, load average {:.2} at start</text>"##,
            legend_y + 20.0,
            xml_escape(&self.started_at_utc),
            xml_escape(short_envoy_version(&self.envoy_version)),
            self.machine.nproc,
            self.machine.load_average_start[0]
        );
        let _ = writeln!(svg, "</svg>");
        svg
    }
}

/// Formats a power of ten as `0.1`, `1` or `10`.
fn trim_number(value: f64) -> String {
    if value >= 1.0 {
        format!("{value:.0}")
    } else {
        let text = format!("{value:.3}");
        text.trim_end_matches('0').to_owned()
    }
}

/// Returns the release part of `envoy --version` output, for example `1.40.0`.
fn short_envoy_version(version: &str) -> &str {
    version.split('/').nth(1).unwrap_or(version)
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
