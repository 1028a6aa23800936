//! A JSON object of strings, read into a `Vec` sorted by key.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};

/// The members of a JSON object of strings, sorted by key, with the last
/// value kept when a key repeats. `BTreeMap<String, String>` contains the
/// same, but its B-tree code made the release module about 5 KB larger
/// (rustc 1.95, `make build`).
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct SortedStringMap(pub(super) Vec<(String, String)>);

impl SortedStringMap {
    /// Inserts a member, or replaces the value of an equal key.
    fn insert(&mut self, key: String, value: String) {
        match self
            .0
            .binary_search_by(|(existing, _)| existing.as_str().cmp(&key))
        {
            Ok(found) => {
                if let Some(member) = self.0.get_mut(found) {
                    member.1 = value;
                }
            }
            Err(position) => self.0.insert(position, (key, value)),
        }
    }
}

impl<'de> Deserialize<'de> for SortedStringMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(SortedStringMapVisitor)
    }
}

struct SortedStringMapVisitor;

impl<'de> Visitor<'de> for SortedStringMapVisitor {
    type Value = SortedStringMap;

    // The same as serde's for `BTreeMap`, so error messages do not change.
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut members: A) -> Result<SortedStringMap, A::Error> {
        let mut map = SortedStringMap::default();
        while let Some((key, value)) = members.next_entry::<String, String>()? {
            map.insert(key, value);
        }
        Ok(map)
    }
}

/// Lets the JSON Schema show the default, `{}`, as it did for the
/// `BTreeMap`.
#[cfg(feature = "schema")]
impl serde::Serialize for SortedStringMap {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(key, value)| (key, value)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn parse(json: &str) -> Result<SortedStringMap, String> {
        serde_json::from_str(json).map_err(|e| e.to_string())
    }

    #[test]
    fn members_sorted_by_key() {
        let map = parse(r#"{"x-b": "2", "X-A": "1", "x-a": "3", "": "4"}"#);
        let expected = [("", "4"), ("X-A", "1"), ("x-a", "3"), ("x-b", "2")]
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .to_vec();
        assert_eq!(map, Ok(SortedStringMap(expected)));
    }

    #[test]
    fn repeated_key_keeps_last_value() {
        let map = parse(r#"{"x-a": "1", "x-b": "2", "x-a": "3"}"#);
        let expected = [("x-a", "3"), ("x-b", "2")]
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .to_vec();
        assert_eq!(map, Ok(SortedStringMap(expected)));
    }

    #[test]
    fn same_as_btree_map() {
        for json in [
            "{}",
            r#"{"b": "1", "a": "2", "c": "3", "a": "4", "é": "5", "e": "6", "B": "7"}"#,
            r#"{"k": "v", "k": "w", "k": "x"}"#,
            r#"{"a": 1}"#,
            r#"{"a": "1",}"#,
            r#"["a"]"#,
            "null",
            r#""a""#,
        ] {
            let btree: Result<BTreeMap<String, String>, String> =
                serde_json::from_str(json).map_err(|e| e.to_string());
            let expected = btree.map(|map| SortedStringMap(map.into_iter().collect()));
            assert_eq!(parse(json), expected, "{json}");
        }
    }
}
