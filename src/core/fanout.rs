//! Fan-out bookkeeping for one request: which awaited targets are still
//! running, whether the client's response may go, and what it reports.

use super::config::{OnFailure, Rule};
use super::outcome::{Outcome, Skip};

/// The state of one target of a fan-out request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetResult {
    /// Dispatched (or about to be) and not finished.
    Pending,
    Done {
        outcome: Outcome,
        status: Option<u16>,
    },
    Skipped(Skip),
}

impl TargetResult {
    fn label(self) -> &'static str {
        match self {
            TargetResult::Pending => "pending",
            TargetResult::Done { outcome, .. } => outcome.as_str(),
            TargetResult::Skipped(skip) => skip.as_str(),
        }
    }
}

/// The action to take on the primary's response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// An awaited target is still running.
    Hold,
    /// Send the primary's response.
    Release,
    /// Replace the primary's response with a 502 and this JSON body.
    Fail { body: Vec<u8> },
}

/// One entry per target of the rule, in configured order.
#[derive(Debug, Clone)]
pub struct FanoutState {
    results: Vec<(bool, TargetResult)>,
}

impl FanoutState {
    /// Starts with every target pending; `awaited` comes from the rule.
    pub fn new(rule: &Rule) -> FanoutState {
        FanoutState {
            results: rule
                .targets
                .iter()
                .map(|t| (t.awaited, TargetResult::Pending))
                .collect(),
        }
    }

    pub fn set(&mut self, target: usize, result: TargetResult) {
        if let Some((_, slot)) = self.results.get_mut(target) {
            *slot = result;
        }
    }

    /// Reports whether an awaited target has no outcome yet.
    pub fn awaiting(&self) -> bool {
        self.results
            .iter()
            .any(|(awaited, result)| *awaited && *result == TargetResult::Pending)
    }

    /// Stops waiting for every target, for a request whose side calls
    /// cannot start before the response is due.
    pub fn stop_awaiting(&mut self) {
        for (awaited, _) in &mut self.results {
            *awaited = false;
        }
    }

    /// Decides once per response, after the primary's headers arrived.
    ///
    /// An awaited target fails when its outcome is not success, or when it
    /// was skipped because of a size or load limit: the client must not
    /// believe a target got data that it never received. A target sampled
    /// out was left out on purpose and does not fail the request.
    pub fn decide(&self, rule: &Rule) -> Decision {
        if self.awaiting() {
            return Decision::Hold;
        }
        if rule.on_failure == OnFailure::Ignore {
            return Decision::Release;
        }
        let failed: Vec<(usize, TargetResult)> = self
            .results
            .iter()
            .enumerate()
            .filter(|(_, (awaited, result))| *awaited && is_failure(*result))
            .map(|(i, (_, result))| (i, *result))
            .collect();
        if failed.is_empty() {
            Decision::Release
        } else {
            Decision::Fail {
                body: failure_body(rule, &failed),
            }
        }
    }

    /// Formats the result header value, for example
    /// `inventory=success;audit=pending`.
    pub fn result_header(&self, rule: &Rule) -> String {
        let mut value = String::new();
        for (target, (_, result)) in rule.targets.iter().zip(&self.results) {
            if !value.is_empty() {
                value.push(';');
            }
            value.push_str(&target.name);
            value.push('=');
            value.push_str(result.label());
        }
        value
    }
}

fn is_failure(result: TargetResult) -> bool {
    match result {
        TargetResult::Done { outcome, .. } => !outcome.is_success(),
        TargetResult::Skipped(Skip::BodyTooLarge | Skip::InFlightLimit | Skip::BufferLimit) => true,
        TargetResult::Skipped(_) | TargetResult::Pending => false,
    }
}

/// Builds `{"error":"fanout_failed","rule":…,"failed":[{"target":…,"outcome":…,"status":…}]}`.
/// Names are validated to letters, digits, `_` and `-`, so they need no
/// escaping.
fn failure_body(rule: &Rule, failed: &[(usize, TargetResult)]) -> Vec<u8> {
    let mut body = format!(
        r#"{{"error":"fanout_failed","rule":"{}","failed":["#,
        rule.name
    );
    for (i, (index, result)) in failed.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        let name = rule.targets.get(*index).map_or("?", |t| t.name.as_str());
        let status = match result {
            TargetResult::Done {
                status: Some(code), ..
            } => code.to_string(),
            _ => "null".to_string(),
        };
        body.push_str(&format!(
            r#"{{"target":"{name}","outcome":"{}","status":{status}}}"#,
            result.label()
        ));
    }
    body.push_str("]}");
    body.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::config;

    fn fanout_rule(on_failure: &str) -> Rule {
        let json = format!(
            r#"{{"rules": [{{"name": "orders", "mode": "fanout", "on_failure": "{on_failure}", "targets": [
                {{"name": "inventory", "cluster": "inventory", "await": true}},
                {{"name": "audit", "cluster": "audit", "await": false}},
                {{"name": "billing", "cluster": "billing", "await": true}}
            ]}}]}}"#
        );
        config::parse(json.as_bytes())
            .unwrap()
            .config
            .rules
            .remove(0)
    }

    fn done(outcome: Outcome, status: Option<u16>) -> TargetResult {
        TargetResult::Done { outcome, status }
    }

    #[test]
    fn holds_until_awaited_done() {
        let rule = fanout_rule("fail");
        let mut state = FanoutState::new(&rule);
        assert_eq!(state.decide(&rule), Decision::Hold);
        state.set(0, done(Outcome::Success, Some(200)));
        assert_eq!(state.decide(&rule), Decision::Hold);
        state.set(2, done(Outcome::Success, Some(201)));
        // The unawaited audit target is still pending and does not hold.
        assert_eq!(state.decide(&rule), Decision::Release);
    }

    #[test]
    fn fail_names_failed_targets() {
        let rule = fanout_rule("fail");
        let mut state = FanoutState::new(&rule);
        state.set(0, done(Outcome::Status5xx, Some(500)));
        state.set(1, done(Outcome::Timeout, Some(504)));
        state.set(2, done(Outcome::Timeout, Some(504)));
        let expected = r#"{"error":"fanout_failed","rule":"orders","failed":[{"target":"inventory","outcome":"5xx","status":500},{"target":"billing","outcome":"timeout","status":504}]}"#;
        assert_eq!(
            state.decide(&rule),
            Decision::Fail {
                body: expected.as_bytes().to_vec()
            }
        );
        let ignoring = fanout_rule("ignore");
        assert_eq!(state.decide(&ignoring), Decision::Release);
    }

    #[test]
    fn reset_has_null_status() {
        let rule = fanout_rule("fail");
        let mut state = FanoutState::new(&rule);
        state.set(0, done(Outcome::Reset, None));
        state.set(2, done(Outcome::Success, Some(200)));
        let Decision::Fail { body } = state.decide(&rule) else {
            panic!("expected a failure");
        };
        let body = String::from_utf8(body).unwrap();
        assert!(
            body.contains(r#"{"target":"inventory","outcome":"reset","status":null}"#),
            "{body}"
        );
    }

    #[test]
    fn skips_count_by_reason() {
        let rule = fanout_rule("fail");
        let mut state = FanoutState::new(&rule);
        state.set(0, TargetResult::Skipped(Skip::SampledOut));
        state.set(2, done(Outcome::Success, Some(200)));
        assert_eq!(state.decide(&rule), Decision::Release);
        state.set(0, TargetResult::Skipped(Skip::BodyTooLarge));
        assert!(matches!(state.decide(&rule), Decision::Fail { .. }));
    }

    #[test]
    fn result_header_lists_all_targets() {
        let rule = fanout_rule("ignore");
        let mut state = FanoutState::new(&rule);
        state.set(0, done(Outcome::Success, Some(200)));
        state.set(2, TargetResult::Skipped(Skip::SampledOut));
        assert_eq!(
            state.result_header(&rule),
            "inventory=success;audit=pending;billing=sampled_out"
        );
    }

    #[test]
    fn stop_awaiting_releases() {
        let rule = fanout_rule("fail");
        let mut state = FanoutState::new(&rule);
        state.stop_awaiting();
        assert!(!state.awaiting());
        assert_eq!(state.decide(&rule), Decision::Release);
    }
}
