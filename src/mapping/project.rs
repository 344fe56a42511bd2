//! JSON projection: decodes only the top-level fields a route reads.
//!
//! A route whose columns, TTL, timestamp and `table_from` are all field paths (no CEL expression
//! sees the whole message) needs only a few top-level members of each JSON object. Decoding the
//! whole document into a `serde_json::Value` allocates a map node and a key string for every
//! member and a value for members no column reads; the projection matches each key against the
//! route's first path segments without allocating and keeps only the members it needs. Every
//! other member is still parsed (as `IgnoredAny`), so a malformed document is refused exactly
//! as before.
//!
//! Runs on the core that maps the message. Invariant: for any payload, a projected document
//! answers every path the route reads with the same value the full decode would (a duplicate
//! key keeps its last value, as `serde_json::Map` does), and any payload the projection cannot
//! take — not JSON, not an object, trailing bytes — is decoded in full by the caller, which
//! reports the error the full decode gives. One difference, on purpose: serde_json refuses a
//! document nested more than 128 levels deep when it builds a `Value` (its guard against stack
//! overflow), but skips unread members iteratively, without that limit — so a message whose
//! deep nesting is only in members the route does not read is now mapped instead of
//! dead-lettered as `not_json`. A deep member the route reads is still refused.

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

/// Up to this many projected names are matched by a scan, more by binary search.
const LINEAR_SCAN_NAMES_MAX: usize = 16;

/// The top-level members a route reads, by name.
#[derive(Debug, Clone)]
pub struct Projection {
    /// Distinct first path segments, sorted.
    names: Vec<String>,
}

/// One decoded document: the value of each projected member, `None` when absent.
#[derive(Debug)]
pub struct Projected {
    values: Vec<Option<Value>>,
}

impl Projection {
    /// A projection over these first path segments.
    pub fn new<'a>(segments: impl IntoIterator<Item = &'a str>) -> Projection {
        let mut names: Vec<String> = segments.into_iter().map(str::to_string).collect();
        names.sort_unstable();
        names.dedup();
        Projection { names }
    }

    /// Decodes the members of one JSON object payload; `None` when the payload is not one JSON
    /// object (the caller decodes it in full to say why).
    pub fn decode(&self, payload: &[u8]) -> Option<Projected> {
        let mut deserializer = serde_json::Deserializer::from_slice(payload);
        let values = deserializer.deserialize_map(MembersVisitor { projection: self }).ok()?;
        deserializer.end().ok()?;
        Some(Projected { values })
    }

    /// The position of a member name among the projected ones. Few names (the usual case) are
    /// scanned comparing lengths first — at most one byte comparison per key, where a binary
    /// search makes three or four (byte comparisons were 4 % of the gateway's CPU in a profile).
    fn index(&self, key: &str) -> Option<usize> {
        if self.names.len() <= LINEAR_SCAN_NAMES_MAX {
            self.names
                .iter()
                .position(|name| name.len() == key.len() && name.as_str() == key)
        } else {
            self.names.binary_search_by(|name| name.as_str().cmp(key)).ok()
        }
    }

    /// The value at `parts` (a path of object keys) in a projected document; `None` when any
    /// step is absent or not an object.
    pub fn lookup<'d>(&self, document: &'d Projected, parts: &[String]) -> Option<&'d Value> {
        let (first, rest) = parts.split_first()?;
        let index = self.index(first)?;
        let top = document.values.get(index)?.as_ref()?;
        rest.iter().try_fold(top, |node, part| node.as_object()?.get(part))
    }
}

/// Visits the top-level object, keeping the projected members.
struct MembersVisitor<'p> {
    projection: &'p Projection,
}

impl<'de> Visitor<'de> for MembersVisitor<'_> {
    type Value = Vec<Option<Value>>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut values = vec![None; self.projection.names.len()];
        while let Some(slot) = map.next_key_seed(KeySeed {
            projection: self.projection,
        })? {
            match slot {
                Some(index) => values[index] = Some(map.next_value::<Value>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(values)
    }
}

/// Reads one key and answers its projected index, without allocating for unescaped keys.
struct KeySeed<'p> {
    projection: &'p Projection,
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_str<E: serde::de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(self.projection.index(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Vec<Vec<String>> {
        [
            "id",
            "customer.address.city",
            "customer.id",
            "tags",
            "amount",
            "absent",
            "é\"x",
        ]
        .iter()
        .map(|p| p.split('.').map(str::to_string).collect())
        .collect()
    }

    fn projection() -> Projection {
        let paths = paths();
        Projection::new(paths.iter().map(|p| p[0].as_str()))
    }

    /// Every path answers as the full decode's lookup does.
    fn assert_same(payload: &str) {
        let full: Value = serde_json::from_str(payload).expect("valid JSON object");
        let projection = projection();
        let projected = projection.decode(payload.as_bytes()).expect("projected");
        for path in paths() {
            let expected = path.iter().try_fold(&full, |node, part| node.as_object()?.get(part));
            assert_eq!(
                projection.lookup(&projected, &path),
                expected,
                "path {path:?} of {payload}"
            );
        }
    }

    #[test]
    fn projected_paths_answer_as_the_full_document() {
        assert_same(
            r#"{"id":"a1","amount":12.50,"tags":["x","y"],"customer":{"id":7,"address":{"city":"Oslo"}},"skip":{"deep":[1,2,{"z":null}]}}"#,
        );
        assert_same(r#"{"id":null,"customer":"not an object"}"#);
        assert_same(r#"{}"#);
        // A duplicate key keeps its last value; an escaped key matches its unescaped name.
        assert_same(r#"{"id":"first","id":"last","\u00e9\"x":1}"#);
        assert_same(r#" { "amount" : 123456789012345678901234567890.000000001 } "#);
    }

    #[test]
    fn many_names_are_matched_as_few_are() {
        let payload = r#"{"f3":3,"f17":"x","g":1,"f0":{"a":0}}"#;
        let full: Value = serde_json::from_str(payload).expect("valid JSON object");
        for count in [4, LINEAR_SCAN_NAMES_MAX, LINEAR_SCAN_NAMES_MAX + 1, 40] {
            let names: Vec<String> = (0..count).map(|i| format!("f{i}")).collect();
            let projection = Projection::new(names.iter().map(String::as_str));
            let projected = projection.decode(payload.as_bytes()).expect("projected");
            for name in names.iter().chain([&"g".to_string()]) {
                let expected = if names.contains(name) { full.get(name) } else { None };
                assert_eq!(
                    projection.lookup(&projected, std::slice::from_ref(name)),
                    expected,
                    "{name} of {count}"
                );
            }
        }
    }

    #[test]
    fn deep_nesting_is_refused_only_where_the_route_reads() {
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        let unread = format!(r#"{{"id":"a","skip":{deep}}}"#);
        let read = format!(r#"{{"id":"a","tags":{deep}}}"#);
        assert!(
            serde_json::from_str::<Value>(&unread).is_err(),
            "the full decode refuses it"
        );
        let projection = projection();
        let projected = projection.decode(unread.as_bytes()).expect("unread nesting is skipped");
        assert_eq!(
            projection.lookup(&projected, &["id".to_string()]),
            Some(&Value::from("a"))
        );
        assert!(projection.decode(read.as_bytes()).is_none());
    }

    #[test]
    fn what_the_projection_cannot_take_is_left_to_the_full_decode() {
        let projection = projection();
        for payload in [
            "",
            "[1,2]",
            "\"text\"",
            "{\"id\":1",
            "{\"id\":1} trailing",
            "{\"skip\":[1,}",
            "{\"id\":\"\\q\"}",
            "\u{feff}{}",
        ] {
            assert!(projection.decode(payload.as_bytes()).is_none(), "{payload:?}");
        }
    }
}
