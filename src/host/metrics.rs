//! Envoy stats for rules and targets.
//!
//! Names follow `mesh_fanout.rule.<rule>.target.<target>.<...>`; Envoy puts
//! them under `wasmcustom.`, and the `stats_tags` in the shipped configs turn
//! the `rule`, `target`, `outcome` and `reason` segments into labels.
//! Counters are shared by all workers because every worker's VM defines the
//! same names.

use log::warn;
use proxy_wasm::hostcalls;
use proxy_wasm::types::{MetricType, Status};

use crate::core::config::{Config, Mode};
use crate::core::outcome::{Outcome, Skip};

type PerOutcome = [u32; Outcome::ALL.len()];

pub struct TargetMetrics {
    /// Final outcomes, one per side call.
    outcomes: PerOutcome,
    skips: [u32; Skip::ALL.len()],
    dispatched: u32,
    in_flight: u32,
    latency_ms: u32,
    /// Defined for targets with the filter's own retries.
    retry: Option<RetryMetrics>,
    /// Outcomes of dead-letter calls, for targets that have one.
    dead_letters: Option<PerOutcome>,
}

struct RetryMetrics {
    /// Every attempt's outcome, retries included.
    attempts: PerOutcome,
    retries: u32,
    budget_exhausted: u32,
}

pub struct RuleMetrics {
    matched: u32,
    targets: Vec<TargetMetrics>,
    /// Defined for fan-out rules only.
    fanout: Option<FanoutMetrics>,
}

struct FanoutMetrics {
    held: u32,
    held_ms: u32,
    failed: u32,
}

pub struct Metrics {
    rules: Vec<RuleMetrics>,
    handoff_delay_us: u32,
}

impl Metrics {
    /// Defines every stat the configuration can touch, so the request path
    /// never formats a stat name.
    pub fn define(config: &Config) -> Result<Metrics, (String, Status)> {
        let mut rules = Vec::with_capacity(config.rules.len());
        for rule in &config.rules {
            let rule_prefix = format!("mesh_fanout.rule.{}", rule.name);
            let mut targets = Vec::with_capacity(rule.targets.len());
            for target in &rule.targets {
                let prefix = format!("{rule_prefix}.target.{}", target.name);
                let mut outcomes = [0; Outcome::ALL.len()];
                for (id, outcome) in outcomes.iter_mut().zip(Outcome::ALL) {
                    *id = define(
                        MetricType::Counter,
                        format!("{prefix}.outcome.{}.side_calls", outcome.as_str()),
                    )?;
                }
                let mut skips = [0; Skip::ALL.len()];
                for (id, skip) in skips.iter_mut().zip(Skip::ALL) {
                    *id = define(
                        MetricType::Counter,
                        format!("{prefix}.reason.{}.skipped", skip.as_str()),
                    )?;
                }
                let retry = match &target.retry {
                    None => None,
                    Some(_) => Some(RetryMetrics {
                        attempts: define_per_outcome(&prefix, "attempts")?,
                        retries: define_stat(MetricType::Counter, &prefix, "retries")?,
                        budget_exhausted: define_stat(
                            MetricType::Counter,
                            &prefix,
                            "retry_budget_exhausted",
                        )?,
                    }),
                };
                let dead_letters = match &target.dead_letter {
                    None => None,
                    Some(_) => Some(define_per_outcome(&prefix, "dead_letters")?),
                };
                targets.push(TargetMetrics {
                    outcomes,
                    skips,
                    retry,
                    dead_letters,
                    dispatched: define_stat(MetricType::Counter, &prefix, "dispatched")?,
                    in_flight: define_stat(MetricType::Gauge, &prefix, "in_flight")?,
                    latency_ms: define_stat(MetricType::Histogram, &prefix, "side_call_ms")?,
                });
            }
            let fanout = if rule.mode == Mode::Fanout {
                Some(FanoutMetrics {
                    held: define_stat(MetricType::Counter, &rule_prefix, "held_responses")?,
                    held_ms: define_stat(MetricType::Histogram, &rule_prefix, "held_ms")?,
                    failed: define_stat(MetricType::Counter, &rule_prefix, "failed_responses")?,
                })
            } else {
                None
            };
            rules.push(RuleMetrics {
                matched: define_stat(MetricType::Counter, &rule_prefix, "matched")?,
                targets,
                fanout,
            });
        }
        let handoff_delay_us = define(
            MetricType::Histogram,
            "mesh_fanout.handoff_delay_us".to_string(),
        )?;
        Ok(Metrics {
            rules,
            handoff_delay_us,
        })
    }

    pub fn matched(&self, rule: usize) {
        if let Some(r) = self.rules.get(rule) {
            increment(r.matched, 1);
        }
    }

    pub fn skipped(&self, rule: usize, target: usize, skip: Skip) {
        if let Some(t) = self.target(rule, target) {
            if let Some(&id) = t.skips.get(skip.index()) {
                increment(id, 1);
            }
        }
    }

    /// Records a dispatched call: one more in flight until its outcome.
    pub fn dispatched(&self, rule: usize, target: usize) {
        if let Some(t) = self.target(rule, target) {
            increment(t.dispatched, 1);
            increment(t.in_flight, 1);
        }
    }

    /// Records a retry attempt that was dispatched.
    pub fn retried(&self, rule: usize, target: usize) {
        if let Some(t) = self.target(rule, target) {
            if let Some(r) = &t.retry {
                increment(r.retries, 1);
            }
            increment(t.in_flight, 1);
        }
    }

    /// Records the end of one attempt. `was_in_flight` is false for calls
    /// that Envoy refused to start, which never raised the gauge.
    pub fn attempt_ended(
        &self,
        rule: usize,
        target: usize,
        outcome: Outcome,
        latency_ms: Option<u64>,
        was_in_flight: bool,
    ) {
        let Some(t) = self.target(rule, target) else {
            return;
        };
        if let Some(&id) = t
            .retry
            .as_ref()
            .and_then(|r| r.attempts.get(outcome.index()))
        {
            increment(id, 1);
        }
        if was_in_flight {
            increment(t.in_flight, -1);
        }
        if let Some(ms) = latency_ms {
            record(t.latency_ms, ms);
        }
    }

    /// Records the one final outcome of a side call.
    pub fn outcome(&self, rule: usize, target: usize, outcome: Outcome) {
        if let Some(&id) = self
            .target(rule, target)
            .and_then(|t| t.outcomes.get(outcome.index()))
        {
            increment(id, 1);
        }
    }

    /// Counts a retry that the worker's retry budget did not allow.
    pub fn retry_budget_exhausted(&self, rule: usize, target: usize) {
        if let Some(r) = self.target(rule, target).and_then(|t| t.retry.as_ref()) {
            increment(r.budget_exhausted, 1);
        }
    }

    pub fn dead_letter(&self, rule: usize, target: usize, outcome: Outcome) {
        let ids = self
            .target(rule, target)
            .and_then(|t| t.dead_letters.as_ref());
        if let Some(&id) = ids.and_then(|ids| ids.get(outcome.index())) {
            increment(id, 1);
        }
    }

    /// Counts a response paused to wait for awaited targets.
    pub fn held(&self, rule: usize) {
        if let Some(f) = self.fanout(rule) {
            increment(f.held, 1);
        }
    }

    /// Records how long a fan-out response waited after the primary's
    /// headers arrived; 0 when nothing was left to wait for.
    pub fn held_ms(&self, rule: usize, ms: u64) {
        if let Some(f) = self.fanout(rule) {
            record(f.held_ms, ms);
        }
    }

    /// Counts a response replaced by a 502 because an awaited target failed.
    pub fn failed(&self, rule: usize) {
        if let Some(f) = self.fanout(rule) {
            increment(f.failed, 1);
        }
    }

    fn fanout(&self, rule: usize) -> Option<&FanoutMetrics> {
        self.rules.get(rule)?.fanout.as_ref()
    }

    pub fn handoff_delay(&self, micros: u64) {
        record(self.handoff_delay_us, micros);
    }

    fn target(&self, rule: usize, target: usize) -> Option<&TargetMetrics> {
        self.rules.get(rule)?.targets.get(target)
    }
}

fn define_per_outcome(prefix: &str, suffix: &str) -> Result<PerOutcome, (String, Status)> {
    let mut ids = [0; Outcome::ALL.len()];
    for (id, outcome) in ids.iter_mut().zip(Outcome::ALL) {
        *id = define(
            MetricType::Counter,
            format!("{prefix}.outcome.{}.{suffix}", outcome.as_str()),
        )?;
    }
    Ok(ids)
}

/// Defines the stat `{prefix}.{suffix}`.
fn define_stat(
    metric_type: MetricType,
    prefix: &str,
    suffix: &str,
) -> Result<u32, (String, Status)> {
    define(metric_type, format!("{prefix}.{suffix}"))
}

fn define(metric_type: MetricType, name: String) -> Result<u32, (String, Status)> {
    hostcalls::define_metric(metric_type, &name).map_err(|status| (name, status))
}

// A failed stat update must not disturb the request. Envoy fails one only
// for an unknown id or the wrong metric type, both bugs here, so a warning
// is enough.
fn increment(id: u32, offset: i64) {
    if let Err(status) = hostcalls::increment_metric(id, offset) {
        warn!("updating stat id {id} failed: {status:?}");
    }
}

fn record(id: u32, value: u64) {
    if let Err(status) = hostcalls::record_metric(id, value) {
        warn!("recording stat id {id} failed: {status:?}");
    }
}
