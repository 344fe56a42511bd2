//! JSON projection: decodes only the members a route reads.
//!
//! A route whose columns, TTL, timestamp and `table_from` are all field paths (no CEL expression
//! sees the whole message) needs only a few members of each JSON object. Decoding the whole
//! document into a `serde_json::Value` allocates a map node and a key string for every member
//! and a value for members no column reads; the projection matches each key against the names
//! the route's paths use at that depth, without allocating, and keeps only what it needs: a
//! number, boolean, `null` or unescaped string stays a slice of the payload (coerced straight
//! into its column's CQL value), an object read only through longer paths is projected in turn,
//! and anything else a path ends at (an array, an object read whole, an escaped string) is
//! decoded. Every other member is still parsed (as `IgnoredAny`), so a malformed document is
//! refused exactly as before.
//!
//! Runs on the core that maps the message. Invariant: for any payload, a projected document
//! answers every path the route reads with the same value the full decode would (a duplicate
//! key keeps its last value, as `serde_json::Map` does; a number is read as serde_json keeps it
//! — the literal as written, or decoded when it has an exponent, which serde_json rewrites), and
//! any payload the projection cannot take — not JSON, not an object, trailing bytes — is decoded
//! in full by the caller, which reports the error the full decode gives. One difference, on
//! purpose: serde_json refuses a document nested more than 128 levels deep when it builds a
//! `Value` (its guard against stack overflow), but skips unread members iteratively, without
//! that limit — so a message whose deep nesting is only in members the route does not read is
//! now mapped instead of dead-lettered as `not_json`. A member the route reads is refused when
//! it nests more than 128 levels itself.

use serde::de::{DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;

use crate::mapping::coerce::Json;

/// Up to this many projected names are matched by a scan, more by binary search.
const LINEAR_SCAN_NAMES_MAX: usize = 16;

/// The members of one JSON object a route reads, by name, and within each what it reads.
#[derive(Debug, Clone)]
pub struct Projection {
    /// Distinct names, sorted.
    names: Vec<String>,
    /// For each name, what is read inside it: `None` when some path ends at the member (it is
    /// read whole), else the projection of the rest of every path through it.
    inner: Vec<Option<Projection>>,
}

/// One decoded object: each projected member, `None` when absent.
#[derive(Debug)]
pub struct Projected<'de> {
    members: Vec<Option<Member<'de>>>,
}

/// One projected member, as cheap as it can be kept.
#[derive(Debug)]
enum Member<'de> {
    /// A number, `true`, `false`, `null` or a string without escapes, borrowed from the payload.
    Scalar(Json<'de>),
    /// A member read whole that is an array, an object or an escaped string, decoded.
    Value(Value),
    /// An object read only in part: its projected members.
    Object(Projected<'de>),
}

impl Projection {
    /// A projection over these paths of object keys (an empty path reads nothing).
    pub fn new<'a>(paths: impl IntoIterator<Item = &'a [String]>) -> Projection {
        Projection::of(paths.into_iter().filter(|p| !p.is_empty()).collect())
    }

    /// The projection of non-empty paths.
    fn of(mut paths: Vec<&[String]>) -> Projection {
        paths.sort_unstable();
        let mut names = Vec::new();
        let mut inner = Vec::new();
        for group in paths.chunk_by(|a, b| a[0] == b[0]) {
            names.push(group[0][0].clone());
            let whole = group.iter().any(|p| p.len() == 1);
            inner.push((!whole).then(|| Projection::of(group.iter().map(|p| &p[1..]).collect())));
        }
        Projection { names, inner }
    }

    /// Decodes the members of one JSON object payload; `None` when the payload is not one JSON
    /// object (the caller decodes it in full to say why).
    pub fn decode<'de>(&self, payload: &'de [u8]) -> Option<Projected<'de>> {
        // The full decode refuses any payload that is not UTF-8 (every string in it is checked),
        // so one check up front keeps that rule for the members skipped unread, and spares the
        // per-string checks.
        let text = std::str::from_utf8(payload).ok()?;
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let members = deserializer.deserialize_map(MembersVisitor { projection: self }).ok()?;
        deserializer.end().ok()?;
        Some(Projected { members })
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

    /// The value at `parts` (a path of object keys the projection was built with) in a
    /// projected document; `None` when any step is absent or not an object.
    pub fn lookup<'d>(&self, document: &'d Projected<'_>, parts: &[String]) -> Option<Json<'d>> {
        let (first, rest) = parts.split_first()?;
        let index = self.index(first)?;
        match document.members.get(index)?.as_ref()? {
            Member::Object(members) => self.inner[index].as_ref()?.lookup(members, rest),
            member => member.read(rest),
        }
    }

    /// The position of each step of `parts` among the projected names at its depth, so that a
    /// column can be looked up per message without matching names ([`Projection::at`]);
    /// `None` when the projection was not built with this path.
    pub fn slots(&self, parts: &[String]) -> Option<Box<[usize]>> {
        let mut slots = Vec::with_capacity(parts.len());
        let mut projection = self;
        for (depth, part) in parts.iter().enumerate() {
            let index = projection.index(part)?;
            slots.push(index);
            match &projection.inner[index] {
                Some(inner) => projection = inner,
                None if depth + 1 < parts.len() => {
                    // Read whole here: the rest of the path is followed by name.
                    return None;
                }
                None => {}
            }
        }
        (slots.len() == parts.len()).then(|| slots.into_boxed_slice())
    }

    /// [`Projection::lookup`] by the slots [`Projection::slots`] gave for a path.
    pub fn at<'d>(&self, document: &'d Projected<'_>, slots: &[usize]) -> Option<Json<'d>> {
        let (&first, rest) = slots.split_first()?;
        match document.members.get(first)?.as_ref()? {
            Member::Object(members) => self.inner.get(first)?.as_ref()?.at(members, rest),
            member if rest.is_empty() => member.read(&[]),
            _ => None,
        }
    }

    /// One member read whole, from its JSON text; `None` when it cannot be decoded (nested too
    /// deep, a bad escape), so that the whole payload goes to the full decode.
    fn member(raw: &str) -> Option<Member<'_>> {
        let member = match raw.as_bytes().first()? {
            b'"' if !raw.contains('\\') => Member::Scalar(Json::String(&raw[1..raw.len() - 1])),
            // serde_json writes an exponent as `e` with a sign; a literal without one is kept
            // as written.
            b'-' | b'0'..=b'9' if !raw.contains(['e', 'E']) => Member::Scalar(Json::Number(raw)),
            b't' => Member::Scalar(Json::Bool(true)),
            b'f' => Member::Scalar(Json::Bool(false)),
            b'n' => Member::Scalar(Json::Null),
            _ => Member::Value(serde_json::from_str(raw).ok()?),
        };
        Some(member)
    }
}

impl Member<'_> {
    /// The value at `parts` (object keys) inside a member read whole; `None` for an object
    /// read in part, or when a step is absent or not an object.
    fn read(&self, parts: &[String]) -> Option<Json<'_>> {
        match self {
            Member::Scalar(json) => parts.is_empty().then_some(*json),
            Member::Value(value) => parts
                .iter()
                .try_fold(value, |node, part| node.as_object()?.get(part))
                .map(Json::from),
            Member::Object(_) => None,
        }
    }
}

/// Visits one object, keeping the projected members.
struct MembersVisitor<'p> {
    projection: &'p Projection,
}

impl<'de> Visitor<'de> for MembersVisitor<'_> {
    type Value = Vec<Option<Member<'de>>>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members: Vec<Option<Member<'de>>> = Vec::with_capacity(self.projection.names.len());
        members.resize_with(self.projection.names.len(), || None);
        while let Some(slot) = map.next_key_seed(KeySeed {
            projection: self.projection,
        })? {
            let Some(index) = slot else {
                map.next_value::<IgnoredAny>()?;
                continue;
            };
            let member = match &self.projection.inner[index] {
                // Read only in part: projected in place. A member that is neither an object nor
                // `null` fails here, and the payload goes to the full decode (which finds no
                // value there).
                Some(inner) => map.next_value_seed(BranchSeed { projection: inner })?,
                // Read whole: its text is checked as JSON while it is read; only what a column
                // needs is decoded from it.
                None => {
                    let raw: &'de RawValue = map.next_value()?;
                    Projection::member(raw.get()).ok_or_else(|| A::Error::custom("member not decodable"))?
                }
            };
            members[index] = Some(member);
        }
        Ok(members)
    }
}

impl<'de> DeserializeSeed<'de> for MembersVisitor<'_> {
    type Value = Vec<Option<Member<'de>>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

/// Reads a member read only in part: an object, projected, or `null`.
struct BranchSeed<'p> {
    projection: &'p Projection,
}

impl<'de, 'p> DeserializeSeed<'de> for BranchSeed<'p> {
    type Value = Member<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for BranchSeed<'_> {
    type Value = Member<'de>;

    fn expecting(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        formatter.write_str("a JSON object or null")
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Self::Value, E> {
        Ok(Member::Scalar(Json::Null))
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        let members = deserializer.deserialize_map(MembersVisitor {
            projection: self.projection,
        })?;
        Ok(Member::Object(Projected { members }))
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
        Projection::new(paths.iter().map(Vec::as_slice))
    }

    /// A looked-up value as JSON text, to compare with the full document's.
    fn text(json: Option<Json<'_>>) -> Option<String> {
        json.map(|j| j.to_string())
    }

    /// Every path answers as the full decode's lookup does.
    fn assert_same(payload: &str) {
        let full: Value = serde_json::from_str(payload).expect("valid JSON object");
        let projection = projection();
        let projected = projection.decode(payload.as_bytes()).expect("projected");
        for path in paths() {
            let expected = path.iter().try_fold(&full, |node, part| node.as_object()?.get(part));
            assert_eq!(
                text(projection.lookup(&projected, &path)),
                expected.map(Value::to_string),
                "path {path:?} of {payload}"
            );
            let slots = projection.slots(&path).expect("every path has slots");
            assert_eq!(
                text(projection.at(&projected, &slots)),
                expected.map(Value::to_string),
                "slots of {path:?} of {payload}"
            );
        }
    }

    #[test]
    fn projected_paths_answer_as_the_full_document() {
        assert_same(
            r#"{"id":"a1","amount":12.50,"tags":["x","y"],"customer":{"id":7,"address":{"city":"Oslo"}},"skip":{"deep":[1,2,{"z":null}]}}"#,
        );
        assert_same(r#"{"id":null,"customer":{}}"#);
        assert_same(r#"{}"#);
        // A duplicate key keeps its last value; an escaped key matches its unescaped name.
        assert_same(r#"{"id":"first","id":"last","\u00e9\"x":1}"#);
        assert_same(r#" { "amount" : 123456789012345678901234567890.000000001 } "#);
        // Escaped strings are decoded, number literals kept as written, scalars borrowed.
        assert_same(r#"{"id":"a\"b\u00e9\n","amount":-1.5E+3,"tags":true,"absent":false}"#);
        // An object read in part: a repeated member is replaced whole, as in the full decode.
        assert_same(r#"{"customer":{"id":1,"x":[{}]},"customer":{"address":{"city":"x","zip":1},"id":[1]}}"#);
        assert_same(r#"{"customer":{"address":null,"id":{"a":"b"}}}"#);
    }

    #[test]
    fn many_names_are_matched_as_few_are() {
        let payload = r#"{"f3":3,"f17":"x","g":1,"f0":{"a":0}}"#;
        let full: Value = serde_json::from_str(payload).expect("valid JSON object");
        for count in [4, LINEAR_SCAN_NAMES_MAX, LINEAR_SCAN_NAMES_MAX + 1, 40] {
            let names: Vec<String> = (0..count).map(|i| format!("f{i}")).collect();
            let paths: Vec<Vec<String>> = names.iter().map(|n| vec![n.clone()]).collect();
            let projection = Projection::new(paths.iter().map(Vec::as_slice));
            let projected = projection.decode(payload.as_bytes()).expect("projected");
            for name in names.iter().chain([&"g".to_string()]) {
                let expected = if names.contains(name) { full.get(name) } else { None };
                assert_eq!(
                    text(projection.lookup(&projected, std::slice::from_ref(name))),
                    expected.map(Value::to_string),
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
            text(projection.lookup(&projected, &["id".to_string()])),
            Some("\"a\"".to_string())
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
            // A member read only in part that is not an object.
            r#"{"id":null,"customer":"not an object"}"#,
            r#"{"customer":[{"id":1}]}"#,
            r#"{"customer":{"address":"Oslo","id":"7"}}"#,
        ] {
            assert!(projection.decode(payload.as_bytes()).is_none(), "{payload:?}");
        }
        // Not UTF-8, even where nothing is read (the full decode checks every string).
        assert!(serde_json::from_slice::<Value>(b"{\"skip\":\"\xff\"}").is_err());
        assert!(projection.decode(b"{\"skip\":\"\xff\"}").is_none());
    }
}
