//! Reads Envoy stats through the admin endpoint.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Deserialize;
use tokio::time::Instant;

use super::envoy::Envoy;

const POLL_INTERVAL: Duration = Duration::from_millis(20);

impl Envoy {
    /// Returns every counter by its full dotted name, from `/stats?type=Counters`.
    ///
    /// Panics if the admin request fails.
    pub async fn counters(&self) -> BTreeMap<String, u64> {
        self.try_counters()
            .await
            .unwrap_or_else(|message| panic!("{message}"))
    }

    /// Works like `counters` but returns the error.
    pub async fn try_counters(&self) -> Result<BTreeMap<String, u64>, String> {
        let body = self.admin_get_ok("/stats?type=Counters").await?;
        Ok(parse_counters(&body))
    }

    /// Returns every gauge by its full dotted name, from `/stats?type=Gauges`.
    ///
    /// Panics if the admin request fails.
    pub async fn gauges(&self) -> BTreeMap<String, u64> {
        self.try_gauges()
            .await
            .unwrap_or_else(|message| panic!("{message}"))
    }

    /// Works like `gauges` but returns the error.
    pub async fn try_gauges(&self) -> Result<BTreeMap<String, u64>, String> {
        let body = self.admin_get_ok("/stats?type=Gauges").await?;
        Ok(parse_counters(&body))
    }

    /// Returns counter `name`, or 0 if Envoy has not created it.
    ///
    /// NOTE: a misspelled name also reads as 0. `wait_for_counter` lists
    /// the existing filter counters when it times out.
    pub async fn counter(&self, name: &str) -> u64 {
        self.counters().await.get(name).copied().unwrap_or(0)
    }

    /// Returns the counters whose names start with `prefix`.
    pub async fn counters_matching(&self, prefix: &str) -> BTreeMap<String, u64> {
        let mut counters = self.counters().await;
        counters.retain(|name, _| name.starts_with(prefix));
        counters
    }

    /// Returns the `/stats/prometheus` exposition text.
    pub async fn prometheus_text(&self) -> String {
        self.try_prometheus_text()
            .await
            .unwrap_or_else(|message| panic!("{message}"))
    }

    /// Works like `prometheus_text` but returns the error.
    pub async fn try_prometheus_text(&self) -> Result<String, String> {
        self.admin_get_ok("/stats/prometheus").await
    }

    /// Returns the histograms whose names match the RE2 regex `filter`, by
    /// full dotted name, from `/stats?type=Histograms&histogram_buckets=detailed`.
    ///
    /// Envoy merges the samples of its workers into these histograms at each
    /// stats flush (`stats_flush_interval` in the bootstrap, 5 s unless set),
    /// so samples recorded since the last flush are missing.
    pub async fn histograms(&self, filter: &str) -> Result<BTreeMap<String, Histogram>, String> {
        let path = format!(
            "/stats?format=json&type=Histograms&histogram_buckets=detailed&filter={}",
            percent_encode(filter)
        );
        let body = self.admin_get_ok(&path).await?;
        parse_histograms(&body)
            .map_err(|e| format!("parsing the JSON from admin {path} failed: {e}"))
    }

    /// Sends `GET path` to the admin endpoint and returns the body of a 200 response.
    async fn admin_get_ok(&self, path: &str) -> Result<String, String> {
        let (status, body) = self
            .admin_get(path)
            .await
            .map_err(|e| format!("reading admin {path} failed: {e}"))?;
        if status != 200 {
            return Err(format!("admin {path} returned {status}: {body}"));
        }
        Ok(body)
    }

    /// Polls until counter `name` equals `expected`, or fails after `timeout`
    /// with the last value and all `wasmcustom.` counters.
    pub async fn wait_for_counter(
        &self,
        name: &str,
        expected: u64,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let counters = self.counters().await;
            let value = counters.get(name).copied();
            if value.unwrap_or(0) == expected {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let found = match value {
                    Some(value) => value.to_string(),
                    None => "missing".to_owned(),
                };
                let filter_counters: Vec<String> = counters
                    .iter()
                    .filter(|(name, _)| name.starts_with("wasmcustom."))
                    .map(|(name, value)| format!("  {name}: {value}"))
                    .collect();
                let listing = if filter_counters.is_empty() {
                    " (none)".to_owned()
                } else {
                    format!("\n{}", filter_counters.join("\n"))
                };
                return Err(format!(
                    "counter {name} is {found}, expected {expected} within {timeout:?}; \
                     wasmcustom counters:{listing}"
                ));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
}

/// Parses `name: value` lines. Lines whose value is not an integer are skipped.
fn parse_counters(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let (name, value) = line.rsplit_once(": ")?;
            Some((name.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// One histogram as of Envoy's last stats flush, over all samples since start.
#[derive(Clone, Debug, PartialEq)]
pub struct Histogram {
    /// Number of samples.
    pub samples: u64,
    /// `(percentile, value)` pairs for the percentiles Envoy supports
    /// (0, 25, 50, 75, 90, 95, 99, 99.5, 99.9 and 100 in Envoy 1.40).
    /// Envoy estimates each value from bucketed samples, so it is not an
    /// exact sample value. Empty while the histogram has no samples.
    pub percentiles: Vec<(f64, f64)>,
}

impl Histogram {
    /// Returns the value at `percentile` (for example 99.0), if Envoy computed it.
    pub fn percentile(&self, percentile: f64) -> Option<f64> {
        self.percentiles
            .iter()
            .find(|(p, _)| *p == percentile)
            .map(|(_, value)| *value)
    }
}

/// The parts of Envoy's detailed JSON histogram output that `histograms` reads.
#[derive(Deserialize)]
struct StatsJson {
    stats: Vec<StatsJsonEntry>,
}

#[derive(Deserialize)]
struct StatsJsonEntry {
    #[serde(default)]
    histograms: Option<HistogramsJson>,
}

#[derive(Deserialize)]
struct HistogramsJson {
    supported_percentiles: Vec<f64>,
    details: Vec<HistogramJson>,
}

#[derive(Deserialize)]
struct HistogramJson {
    name: String,
    /// Buckets of the cumulative histogram.
    totals: Vec<BucketJson>,
    percentiles: Vec<PercentileJson>,
}

#[derive(Deserialize)]
struct BucketJson {
    count: u64,
}

#[derive(Deserialize)]
struct PercentileJson {
    /// Null while the histogram has no samples.
    cumulative: Option<f64>,
}

fn parse_histograms(text: &str) -> Result<BTreeMap<String, Histogram>, serde_json::Error> {
    let parsed: StatsJson = serde_json::from_str(text)?;
    let mut histograms = BTreeMap::new();
    for section in parsed
        .stats
        .into_iter()
        .filter_map(|entry| entry.histograms)
    {
        for detail in section.details {
            let percentiles = section
                .supported_percentiles
                .iter()
                .zip(&detail.percentiles)
                .filter_map(|(p, value)| Some((*p, value.cumulative?)))
                .collect();
            let histogram = Histogram {
                samples: detail.totals.iter().map(|bucket| bucket.count).sum(),
                percentiles,
            };
            histograms.insert(detail.name, histogram);
        }
    }
    Ok(histograms)
}

/// Percent-encodes everything except unreserved URI characters, so a regex
/// survives as one query parameter value.
fn percent_encode(text: &str) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            encoded.push(char::from(byte));
        } else {
            write!(encoded, "%{byte:02X}").unwrap();
        }
    }
    encoded
}
