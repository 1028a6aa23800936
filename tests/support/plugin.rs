//! Plugin configurations and stat names shared by the integration tests.

use bytes::Bytes;

use super::upstream::Behaviour;

/// Builds a plugin configuration with one shadow rule, "signup", for
/// requests under /api. `extra_top_level` is spliced in before `rules`, for
/// example `"limits": {...}, ` with its trailing comma.
pub fn signup_rule(extra_top_level: &str, targets: &str) -> String {
    format!(
        r#"{{{extra_top_level}"rules": [{{"name": "signup", "match": {{"path": {{"prefix": "/api"}}}}, "targets": [{targets}]}}]}}"#
    )
}

/// Names a stat of target `target` of rule "signup", for example
/// `stat("side", "outcome.success.side_calls")`.
pub fn stat(target: &str, tail: &str) -> String {
    format!("wasmcustom.mesh_fanout.rule.signup.target.{target}.{tail}")
}

/// A primary that answers every request with 201 and the body "created".
pub fn created() -> Behaviour {
    Behaviour {
        status: 201,
        body: Bytes::from_static(b"created"),
        ..Behaviour::default()
    }
}
