//! Reads Envoy stats through the admin endpoint.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::Envoy;

const POLL_INTERVAL: Duration = Duration::from_millis(20);

impl Envoy {
    /// Returns every counter by its full dotted name, from `/stats?type=Counters`.
    ///
    /// Panics if the admin request fails.
    pub async fn counters(&self) -> BTreeMap<String, u64> {
        let (status, body) = self
            .admin_get("/stats?type=Counters")
            .await
            .unwrap_or_else(|e| panic!("reading counters failed: {e}"));
        assert_eq!(status, 200, "admin /stats returned {status}: {body}");
        parse_counters(&body)
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
        let (status, body) = self
            .admin_get("/stats/prometheus")
            .await
            .unwrap_or_else(|e| panic!("reading /stats/prometheus failed: {e}"));
        assert_eq!(
            status, 200,
            "admin /stats/prometheus returned {status}: {body}"
        );
        body
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
