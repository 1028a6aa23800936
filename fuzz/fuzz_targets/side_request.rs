//! Fuzzes `side_request::build_headers` and `is_copyable`.
//!
//! An input is a request header block, a blank line, then bytes that
//! `arbitrary` turns into a target, a marker header and a body length:
//!
//! ```text
//! :method: POST
//! connection: keep-alive, x-a
//!
//! <bytes for `Spec`; none gives a target without edits>
//! ```
//!
//! Each header line is `name: value`, split at the first `:` after the
//! name's first byte, so pseudo-headers read naturally. Values are raw
//! bytes and cannot contain LF. Names are lowercased, and lines whose name
//! is neither a token nor `:` plus a token are dropped, because Envoy
//! hands the filter only such names. The target goes through
//! `config::parse`, so only targets that the filter accepts are checked.
#![no_main]

use arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use mesh_fanout::core::config;
use mesh_fanout::core::headers;
use mesh_fanout_fuzz::{check_build_headers, token_from, KNOWN_NAMES};
use serde_json::{json, Map, Value};

#[derive(Arbitrary, Debug)]
enum Name {
    /// An entry of `KNOWN_NAMES`, upper-cased when the flag is `true`. The
    /// config accepts mixed case in header edits.
    Known(u8, bool),
    Token(Vec<u8>),
    /// `:` plus a token, which the config rejects wherever it names headers.
    Pseudo(Vec<u8>),
}

impl Name {
    fn render(&self) -> String {
        match self {
            Name::Known(index, upper) => {
                let name = KNOWN_NAMES[usize::from(*index) % KNOWN_NAMES.len()];
                if *upper {
                    name.to_ascii_uppercase()
                } else {
                    name.to_string()
                }
            }
            Name::Token(bytes) => token_from(bytes),
            Name::Pseudo(bytes) => format!(":{}", token_from(bytes)),
        }
    }
}

#[derive(Arbitrary, Debug)]
struct TargetSpec {
    authority: Option<String>,
    /// Rendered with a leading `/`, so most paths pass validation.
    path: Option<String>,
    set: Vec<(Name, String)>,
    remove: Vec<Name>,
    strip_credentials: bool,
    fanout: bool,
    idempotency_header: Option<Name>,
}

#[derive(Arbitrary, Debug)]
struct Spec {
    marker_header: Option<Name>,
    target: TargetSpec,
    body_len: Option<usize>,
}

fn config_json(spec: &Spec) -> Value {
    let target_spec = &spec.target;
    let mut set = Map::new();
    for (name, value) in &target_spec.set {
        set.insert(name.render(), Value::String(value.clone()));
    }
    let remove: Vec<String> = target_spec.remove.iter().map(Name::render).collect();

    let mut target = json!({
        "name": "t",
        "cluster": "c",
        "headers": {"set": set, "remove": remove},
        "strip_credentials": target_spec.strip_credentials,
    });
    if let Some(authority) = &target_spec.authority {
        target["authority"] = Value::String(authority.clone());
    }
    if let Some(path) = &target_spec.path {
        target["path"] = Value::String(format!("/{path}"));
    }
    if let Some(name) = &target_spec.idempotency_header {
        target["idempotency_header"] = Value::String(name.render());
    }

    let mode = if target_spec.fanout {
        "fanout"
    } else {
        "shadow"
    };
    let mut config = json!({"rules": [{"name": "r", "mode": mode, "targets": [target]}]});
    if let Some(marker) = &spec.marker_header {
        config["marker_header"] = Value::String(marker.render());
    }
    config
}

/// Parses the header block, keeping the names that Envoy could send.
fn parse_header_block(block: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut request = Vec::new();
    for line in block.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().skip(1).position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = line.split_at(colon + 1);
        let Ok(name) = std::str::from_utf8(name) else {
            continue;
        };
        let name = name.to_ascii_lowercase();
        let token = name.strip_prefix(':').unwrap_or(&name);
        if !headers::is_valid_name(token) {
            continue;
        }
        let value = value.get(1..).unwrap_or_default();
        let value = value.strip_prefix(b" ").unwrap_or(value);
        request.push((name, value.to_vec()));
    }
    request
}

fuzz_target!(|data: &[u8]| {
    let (block, tail) = match data.windows(2).position(|pair| pair == b"\n\n") {
        Some(at) => data.split_at(at),
        None => (data, &[][..]),
    };
    let request = parse_header_block(block);
    let spec_bytes = tail.get(2..).unwrap_or_default();
    let Ok(spec) = Spec::arbitrary_take_rest(Unstructured::new(spec_bytes)) else {
        return;
    };

    let Ok(json) = serde_json::to_vec(&config_json(&spec)) else {
        return;
    };
    let Ok(mut parsed) = config::parse(&json) else {
        return;
    };
    let marker_header = parsed.config.marker_header.clone();
    let rule = parsed.config.rules.remove(0);
    let target = &rule.targets[0];
    let marker_value = format!("{}/{}", rule.name, target.name);

    check_build_headers(
        &request,
        target,
        &marker_header,
        &marker_value,
        spec.body_len,
    );
});
