//! Finds the JSON path of the value at a byte offset of a JSON text, so
//! that a serde_json error, which carries only a line and a column, can
//! name the field it is about.
//!
//! serde_json 1.0 reports a data error where it stopped reading:
//! - after a scalar of the wrong type or value;
//! - before a `[` or `{` of the wrong type;
//! - right after an object key that is unknown or duplicate;
//! - right after the `}` of an object that lacks a field.
//!
//! [`path_at`] returns the path of the value or key being read there, in
//! the format of serde_path_to_error 0.1: `rules[0].targets[1].cluster`.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;

/// The path from the root of a JSON text to one of its values. It prints
/// as `rules[0].targets[1].cluster`, and the root prints as "".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonPath<'a> {
    /// The objects and arrays that contain the value, outermost first.
    open: Vec<Container<'a>>,
    /// An object that the last scanned byte, a `}`, closed right after a
    /// key, as in `{"key"}`.
    closed_after_key: Option<Container<'a>>,
}

impl JsonPath<'_> {
    /// Reports whether the path has no steps, so it names the whole text.
    pub fn is_root(&self) -> bool {
        self.open
            .iter()
            .all(|container| matches!(container, Container::Object { key: None, .. }))
    }

    /// Reports whether the path ends in an object key whose `:` has not
    /// been read yet.
    pub fn ends_in_pending_key(&self) -> bool {
        matches!(
            self.open.last(),
            Some(Container::Object {
                key: Some(_),
                in_value: false
            })
        )
    }

    /// Reopens an object that was closed right after a key, so that the
    /// path ends in that key. serde_json reads the key of `{"key"}`,
    /// reports an unknown field, and only then reads the `}`.
    pub fn reopen_closed_after_key(mut self) -> Self {
        if let Some(object) = self.closed_after_key.take() {
            self.open.push(object);
        }
        self
    }

    /// Drops the last step when it is a key whose value has not begun, so
    /// that the path names the object that contains the key.
    pub fn without_pending_key(mut self) -> Self {
        if let Some(Container::Object {
            key,
            in_value: false,
        }) = self.open.last_mut()
        {
            *key = None;
        }
        self
    }
}

impl fmt::Display for JsonPath<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for container in &self.open {
            match container {
                Container::Array { index } => {
                    f.write_str("[")?;
                    fmt::Display::fmt(index, f)?;
                    f.write_str("]")?;
                }
                Container::Object { key: None, .. } => continue,
                Container::Object { key: Some(raw), .. } => {
                    if !first {
                        f.write_str(".")?;
                    }
                    f.write_str(&decode_key(raw))?;
                }
            }
            first = false;
        }
        Ok(())
    }
}

/// Decodes a quoted JSON string. Text that serde_json read without a
/// syntax error always decodes, and anything else is shown as written.
fn decode_key(raw: &[u8]) -> Cow<'_, str> {
    let mut deserializer = serde_json::Deserializer::from_slice(raw);
    match String::deserialize(&mut deserializer) {
        Ok(key) => Cow::Owned(key),
        Err(_) => String::from_utf8_lossy(raw),
    }
}

/// Converts a serde_json error position into the byte offset where reading
/// stopped. serde_json counts lines from 1 and gives as the column the
/// number of bytes read on that line. Returns `None` for line 0, which
/// serde_json uses for errors without a position, and for positions
/// outside `text`.
pub fn offset_at(text: &[u8], line: usize, column: usize) -> Option<usize> {
    let line_start = match line {
        0 => return None,
        1 => 0,
        _ => {
            let (newline, _) = text
                .iter()
                .enumerate()
                .filter(|(_, byte)| **byte == b'\n')
                .nth(line - 2)?;
            newline + 1
        }
    };
    line_start
        .checked_add(column)
        .filter(|offset| *offset <= text.len())
}

/// An object or array that is open at the scanned position.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Container<'a> {
    Object {
        /// The key of the member being read, as written in the text with
        /// quotes and escapes, once the key has been read.
        key: Option<&'a [u8]>,
        /// The `:` after the key has been read.
        in_value: bool,
    },
    Array {
        /// The index of the element being read.
        index: usize,
    },
}

/// Returns the path of the value or key that is being read, or was just
/// read, when a parser has consumed `text[..offset]`. The text before
/// `offset` is expected to be the start of valid JSON. On other input the
/// path may be wrong, but the scan indexes only through `get`, so it does
/// not panic.
pub fn path_at(text: &[u8], offset: usize) -> JsonPath<'_> {
    let scanned = text.get(..offset).unwrap_or(text);
    let mut open: Vec<Container<'_>> = Vec::new();
    // Offset of the opening quote while inside a string.
    let mut string_start: Option<usize> = None;
    let mut escaped = false;
    let mut closed_after_key = None;

    for (i, &byte) in scanned.iter().enumerate() {
        closed_after_key = None;
        if let Some(start) = string_start {
            if escaped {
                escaped = false;
            } else if byte == b'\\' {
                escaped = true;
            } else if byte == b'"' {
                string_start = None;
                // A string in an object before the `:` is a key.
                if let Some(Container::Object {
                    key,
                    in_value: false,
                }) = open.last_mut()
                {
                    *key = scanned.get(start..=i);
                }
            }
            continue;
        }
        match byte {
            b'"' => string_start = Some(i),
            b'{' => open.push(Container::Object {
                key: None,
                in_value: false,
            }),
            b'[' => open.push(Container::Array { index: 0 }),
            b'}' => {
                if let Some(
                    object @ Container::Object {
                        key: Some(_),
                        in_value: false,
                    },
                ) = open.pop()
                {
                    closed_after_key = Some(object);
                }
            }
            b']' => {
                open.pop();
            }
            b':' => {
                if let Some(Container::Object { in_value, .. }) = open.last_mut() {
                    *in_value = true;
                }
            }
            b',' => match open.last_mut() {
                Some(Container::Object { key, in_value }) => {
                    *key = None;
                    *in_value = false;
                }
                Some(Container::Array { index }) => *index = index.saturating_add(1),
                None => {}
            },
            _ => {}
        }
    }
    JsonPath {
        open,
        closed_after_key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Returns the path at the first occurrence of `marker` in `text`, with
    /// the marker removed, so each case shows where the position is.
    fn path_at_marker(text: &str, marker: &str) -> (String, bool) {
        let offset = text.find(marker).expect("marker in text");
        let cleaned = text.replacen(marker, "", 1);
        let path = path_at(cleaned.as_bytes(), offset);
        (path.to_string(), path.ends_in_pending_key())
    }

    fn path(text: &str) -> String {
        path_at_marker(text, "|").0
    }

    #[test]
    fn root_has_empty_path() {
        assert_eq!(path("|{}"), "");
        assert_eq!(path("{}|"), "");
        assert_eq!(path("{|}"), "");
        assert_eq!(path("5|"), "");
        assert!(path_at(b"{}", 0).is_root());
    }

    #[test]
    fn after_scalar_value() {
        assert_eq!(path(r#"{"a": 5|}"#), "a");
        assert_eq!(path(r#"{"a": 1, "b": "x"|}"#), "b");
        assert_eq!(path(r#"{"a": {"b": null|}}"#), "a.b");
        assert_eq!(path(r#"{"a": {"b": true|, "c": 1}}"#), "a.b");
        assert_eq!(path(r#"{"a": -1.5e3|}"#), "a");
    }

    #[test]
    fn before_container_value() {
        assert_eq!(path(r#"{"a": |{"b": 1}}"#), "a");
        assert_eq!(path(r#"{"a": |[1]}"#), "a");
        assert_eq!(path(r#"{"a": [|[1]]}"#), "a[0]");
        assert_eq!(path(r#"{"a": [1, |{}]}"#), "a[1]");
    }

    #[test]
    fn nested_arrays_count_elements() {
        assert_eq!(path(r#"[[1, 2], [3, 4|]]"#), "[1][1]");
        assert_eq!(path(r#"[[], [[]], 7|]"#), "[2]");
        assert_eq!(path(r#"{"a": [[{"b": [0, 0, 9|]}]]}"#), "a[0][0].b[2]");
        assert_eq!(
            path(r#"{"rules": [{"targets": [{"name": "a"}, {"name": 5|}]}]}"#),
            "rules[0].targets[1].name"
        );
    }

    #[test]
    fn after_closed_object_names_that_object() {
        // serde_json reports a missing field after the `}` of its struct.
        assert_eq!(path(r#"{"a": [{"x": 1}, {"y": 2}|]}"#), "a[1]");
        assert_eq!(path(r#"{"a": {"b": {}|}}"#), "a.b");
        assert_eq!(path(r#"{"a": [1, 2]|}"#), "a");
    }

    #[test]
    fn after_key_is_pending() {
        assert_eq!(
            path_at_marker(r#"{"a": {"bad"|: 1}}"#, "|"),
            ("a.bad".to_string(), true)
        );
        assert_eq!(
            path_at_marker(r#"{"a": 1, "bad" |: 1}"#, "|"),
            ("bad".to_string(), true)
        );
        assert_eq!(
            path_at_marker(r#"{"a": |[]}"#, "|"),
            ("a".to_string(), false)
        );
        assert_eq!(
            path_at_marker(r#"{"a": 1|}"#, "|"),
            ("a".to_string(), false)
        );
    }

    #[test]
    fn key_closed_by_brace_reopened() {
        let text = br#"{"a": {"bad"}"#;
        let path = path_at(text, text.len());
        assert_eq!(path.to_string(), "a");
        assert!(!path.ends_in_pending_key());

        let reopened = path.reopen_closed_after_key();
        assert_eq!(reopened.to_string(), "a.bad");
        assert!(reopened.ends_in_pending_key());

        // Only the last scanned byte counts, and only a key without value.
        for text in [
            &br#"{"a": {"bad"} "#[..],
            br#"{"a": {"b": 1}"#,
            br#"{"a": ["b"]"#,
        ] {
            let path = path_at(text, text.len());
            assert_eq!(path.clone().reopen_closed_after_key(), path);
        }
    }

    #[test]
    fn without_pending_key_names_the_object() {
        let text = r#"{"a": {"name": 1, "name": 2}}"#;
        let offset = text.rfind(':').expect("second colon");
        let path = path_at(text.as_bytes(), offset);
        assert_eq!(path.to_string(), "a.name");
        assert_eq!(path.without_pending_key().to_string(), "a");

        let path = path_at(br#"{"a": 1}"#, 7);
        assert_eq!(path.clone().without_pending_key(), path);
    }

    #[test]
    fn brackets_and_quotes_inside_strings_ignored() {
        assert_eq!(path(r#"{"a": "[{,:}]", "b": 1|}"#), "b");
        assert_eq!(path(r#"{"a": "x\"]}", "b": [1, "\\", 2|]}"#), "b[2]");
        assert_eq!(path(r#"{"a\"[b": 1|}"#), "a\"[b");
        assert_eq!(path(r#"{"a": ["\\\"", ",", 3|]}"#), "a[2]");
    }

    #[test]
    fn keys_decoded_from_escapes() {
        assert_eq!(path(r#"{"x-a\r\nx-b": 1|}"#), "x-a\r\nx-b");
        assert_eq!(path(r#"{"\u00e9t\u00e9": 1|}"#), "été");
        assert_eq!(path(r#"{"\ud83d\ude00": 1|}"#), "\u{1f600}");
        assert_eq!(path(r#"{"a.b": {"c\/d": 1|}}"#), "a.b.c/d");
        assert_eq!(path("{\"caf\u{e9}\": 1|}"), "caf\u{e9}");
    }

    #[test]
    fn comma_in_object_clears_key() {
        assert_eq!(path(r#"{"a": 1,| "b": 2}"#), "");
        assert_eq!(path(r#"{"a": {"b": 1,| "c": 2}}"#), "a");
    }

    #[test]
    fn whitespace_and_newlines_ignored() {
        let text = "{\n  \"a\" :\n  [\n    1 ,\n    \"x\"|\n  ]\n}";
        assert_eq!(path(text), "a[1]");
    }

    #[test]
    fn malformed_input_never_panics() {
        for text in [
            &b"}}]]"[..],
            b"\"unterminated",
            b"{\"a\\",
            b"[,,,",
            b":::",
            b"{\"\xff\": 1}",
            b"",
        ] {
            for offset in 0..=text.len() + 2 {
                let _ = path_at(text, offset).to_string();
            }
        }
        assert_eq!(path_at(b"{\"\xff\": 1}", 7).to_string(), "\"\u{fffd}\"");
    }

    #[test]
    fn offset_from_line_and_column() {
        let text = b"ab\ncd\n\nef";
        assert_eq!(offset_at(text, 1, 0), Some(0));
        assert_eq!(offset_at(text, 1, 2), Some(2));
        assert_eq!(offset_at(text, 2, 0), Some(3));
        assert_eq!(offset_at(text, 2, 1), Some(4));
        assert_eq!(offset_at(text, 3, 0), Some(6));
        assert_eq!(offset_at(text, 4, 2), Some(9));
    }

    #[test]
    fn offset_outside_text_rejected() {
        let text = b"ab\ncd";
        assert_eq!(offset_at(text, 0, 0), None);
        assert_eq!(offset_at(text, 2, 3), None);
        assert_eq!(offset_at(text, 3, 0), None);
        assert_eq!(offset_at(text, 1, usize::MAX), None);
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Item {
        name: String,
        count: u64,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Items {
        items: Vec<Item>,
    }

    /// Returns the path at the position of the error that serde_json
    /// reports for `text` read as `Items`.
    fn serde_error_path(text: &str) -> (String, bool) {
        let error = serde_json::from_str::<Items>(text).expect_err("an invalid input");
        let offset = offset_at(text.as_bytes(), error.line(), error.column())
            .expect("a position inside the text");
        let path = path_at(text.as_bytes(), offset);
        (path.to_string(), path.ends_in_pending_key())
    }

    #[test]
    fn serde_json_error_positions() {
        let cases = [
            // After a scalar of the wrong type.
            (
                r#"{"items": [{"name": "a", "count": "x"}]}"#,
                "items[0].count",
                false,
            ),
            (
                r#"{"items": [{"name": "a", "count": -1}]}"#,
                "items[0].count",
                false,
            ),
            // Before a container of the wrong type.
            (
                r#"{"items": [{"name": "a", "count": [1]}]}"#,
                "items[0].count",
                false,
            ),
            (
                r#"{"items": [{"name": {}, "count": 1}]}"#,
                "items[0].name",
                false,
            ),
            (r#"{"items": [5]}"#, "items[0]", false),
            (r#"{"items": {}}"#, "items", false),
            // Right after an unknown or a repeated key.
            (
                r#"{"items": [{"name": "a", "size": 1}]}"#,
                "items[0].size",
                true,
            ),
            (
                r#"{"items": [{"name": "a", "name": "b", "count": 1}]}"#,
                "items[0].name",
                true,
            ),
            // After the `}` of an object that lacks a field.
            (
                r#"{"items": [{"name": "a", "count": 1}, {"name": "b"}]}"#,
                "items[1]",
                false,
            ),
            ("{}", "", false),
        ];
        for (text, path, key_pending) in cases {
            assert_eq!(
                serde_error_path(text),
                (path.to_string(), key_pending),
                "{text}"
            );
        }
    }

    #[test]
    fn offset_matches_serde_json_position() {
        let text = "{\n  \"a\": [1,\n    \"x\"]\n}";
        let error = serde_json::from_str::<std::collections::BTreeMap<String, Vec<u8>>>(text)
            .expect_err("a string is not a byte");
        let offset = offset_at(text.as_bytes(), error.line(), error.column());
        assert_eq!(offset, text.find("\"]").map(|quote| quote + 1));
        let offset = offset.expect("position inside the text");
        assert_eq!(path_at(text.as_bytes(), offset).to_string(), "a[1]");
    }
}
