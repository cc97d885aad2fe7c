//! JSON objects read at their top level only.
//!
//! The gateway needs a handful of a request's fields (`model`, `max_tokens`, `stream`, …) and
//! must pass everything else to the upstream untouched; of an answer it needs `usage` and must
//! rename `model`. Building a `serde_json::Value` tree of the whole body and writing it out again
//! costs an allocation per string and per nested value, on every call. A [`RawObject`] instead
//! keeps the body's bytes and, for each top-level field, its key and where its value's text is;
//! a field is parsed only when asked for, and writing the object back copies every untouched
//! value's text as it came.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Keys beyond which repeated keys are looked up in a hash index.
const INDEX_FROM_FIELDS: usize = 16;

/// A JSON object whose values are kept as text.
#[derive(Clone)]
pub(crate) struct RawObject {
    /// The body, checked to be UTF-8 once.
    text: String,
    /// Each key once (the last value given for a key wins, as in `serde_json`), in the order of
    /// first appearance, with its value's byte range in `text`.
    fields: Vec<(String, Range<usize>)>,
}

/// Why bytes are not a [`RawObject`].
#[derive(Debug)]
pub(crate) enum RawError {
    /// Not JSON at all.
    Syntax(serde_json::Error),
    /// JSON, but not an object.
    NotObject,
}

impl RawObject {
    /// Reads the top level of a JSON object.
    pub(crate) fn parse(bytes: Bytes) -> Result<RawObject, RawError> {
        match String::from_utf8(Vec::from(bytes)) {
            Ok(text) => RawObject::parse_text(text),
            Err(error) => Err(RawError::Syntax(de::Error::custom(format!(
                "the body is not UTF-8 (at byte {})",
                error.utf8_error().valid_up_to()
            )))),
        }
    }

    /// Reads the top level of a JSON object already in a `String`.
    pub(crate) fn parse_text(text: String) -> Result<RawObject, RawError> {
        let entries: Entries<'_> = match serde_json::from_str(&text) {
            Ok(entries) => entries,
            // serde_json refuses a value of the wrong type as soon as it sees its first byte,
            // before the rest is read: so `0"` would be "not an object" when it is not JSON at
            // all. Read it again, as anything, to tell the two apart.
            Err(error) if error.classify() == serde_json::error::Category::Data => {
                return Err(match serde_json::from_str::<de::IgnoredAny>(&text) {
                    Ok(_) => RawError::NotObject,
                    Err(error) => RawError::Syntax(error),
                });
            }
            Err(error) => return Err(RawError::Syntax(error)),
        };
        let base = text.as_ptr() as usize;
        let mut fields: Vec<(String, Range<usize>)> = Vec::with_capacity(entries.0.len());
        // Past a few keys, repeated keys are found through an index, so that a body of many
        // keys costs linear time, not quadratic.
        let mut index: Option<HashMap<String, usize>> = None;
        for (key, value) in entries.0 {
            let start = value.get().as_ptr() as usize - base;
            let range = start..start + value.get().len();
            let seen = match &index {
                Some(index) => index.get(&key).copied(),
                None => fields.iter().position(|(name, _)| *name == key),
            };
            match seen {
                Some(at) => fields[at].1 = range,
                None => {
                    if let Some(index) = &mut index {
                        index.insert(key.clone(), fields.len());
                    }
                    fields.push((key, range));
                    if index.is_none() && fields.len() > INDEX_FROM_FIELDS {
                        index = Some(
                            fields
                                .iter()
                                .enumerate()
                                .map(|(at, (name, _))| (name.clone(), at))
                                .collect(),
                        );
                    }
                }
            }
        }
        Ok(RawObject { text, fields })
    }

    /// The text of `key`'s value, if the object has it.
    pub(crate) fn raw(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, range)| self.slice(range))
    }

    /// `key`'s value parsed as `T`, if present.
    pub(crate) fn get<'a, T: Deserialize<'a>>(
        &'a self,
        key: &str,
    ) -> Option<Result<T, serde_json::Error>> {
        self.raw(key).map(serde_json::from_str)
    }

    /// The object written out again with `replace`d values (raw JSON text; a key not present is
    /// added at the end) and without the `remove`d keys. Untouched values are copied as they
    /// came.
    pub(crate) fn write(&self, replace: &[(&str, &str)], remove: &[&str]) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.text.len() + 64);
        out.push(b'{');
        let mut first = true;
        let mut field = |out: &mut Vec<u8>, key: &str, value: &str| {
            if !first {
                out.push(b',');
            }
            first = false;
            // Writing a string into a Vec cannot fail.
            let _ = serde_json::to_writer(&mut *out, key);
            out.push(b':');
            out.extend_from_slice(value.as_bytes());
        };
        for (key, range) in &self.fields {
            if remove.contains(&key.as_str()) {
                continue;
            }
            match replace.iter().find(|(name, _)| name == key) {
                Some((_, value)) => field(&mut out, key, value),
                None => field(&mut out, key, self.slice(range)),
            }
        }
        for (key, value) in replace {
            if !self.fields.iter().any(|(name, _)| name == key) {
                field(&mut out, key, value);
            }
        }
        out.push(b'}');
        out
    }

    /// The whole object as a `serde_json` map (for the embedded backend, which reads every
    /// field anyway).
    pub(crate) fn to_map(&self) -> serde_json::Map<String, serde_json::Value> {
        self.fields
            .iter()
            .filter_map(|(key, range)| {
                serde_json::from_str(self.slice(range))
                    .ok()
                    .map(|value| (key.clone(), value))
            })
            .collect()
    }

    fn slice(&self, range: &Range<usize>) -> &str {
        // The ranges are values' texts as serde_json read them, so they start and end at ASCII
        // delimiters, on character boundaries.
        self.text.get(range.clone()).unwrap_or("null")
    }
}

/// A JSON string literal for `text`.
pub(crate) fn string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_else(|_| "\"\"".to_string())
}

/// The top-level entries of an object, values as borrowed raw text.
struct Entries<'a>(Vec<(String, &'a RawValue)>);

impl<'de: 'a, 'a> Deserialize<'de> for Entries<'a> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor;
        impl<'de> Visitor<'de> for EntriesVisitor {
            type Value = Entries<'de>;
            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(8).min(64));
                while let Some((key, value)) = map.next_entry::<String, &'de RawValue>()? {
                    entries.push((key, value));
                }
                Ok(Entries(entries))
            }
        }
        deserializer.deserialize_map(EntriesVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> RawObject {
        RawObject::parse(Bytes::copy_from_slice(text.as_bytes())).unwrap()
    }

    #[test]
    fn fields_are_read_as_text_and_parsed_on_demand() {
        let object =
            parse(r#"{"model": "m", "messages": [{"role":"user","content":"hé \"x\""}], "n": 1}"#);
        assert_eq!(object.raw("model"), Some(r#""m""#));
        assert_eq!(
            object.raw("messages"),
            Some(r#"[{"role":"user","content":"hé \"x\""}]"#)
        );
        assert_eq!(object.get::<u64>("n").unwrap().unwrap(), 1);
        assert!(object.get::<u64>("model").unwrap().is_err());
        assert!(object.get::<u64>("absent").is_none());
    }

    #[test]
    fn writing_replaces_removes_and_appends_keeping_the_rest_verbatim() {
        let object = parse(r#"{"model":"m","max_completion_tokens":5,"x":{"a": [1, 2]},"y":null}"#);
        let written = object.write(
            &[("model", r#""up""#), ("max_tokens", "5")],
            &["max_completion_tokens"],
        );
        assert_eq!(
            std::str::from_utf8(&written).unwrap(),
            r#"{"model":"up","x":{"a": [1, 2]},"y":null,"max_tokens":5}"#
        );
        let round: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(round["x"]["a"][1], 2);
    }

    #[test]
    fn the_last_value_of_a_repeated_key_wins_as_in_serde_json() {
        let object = parse(r#"{"model":"a","n":1,"model":"b"}"#);
        assert_eq!(object.raw("model"), Some(r#""b""#));
        let value: serde_json::Value =
            serde_json::from_str(r#"{"model":"a","n":1,"model":"b"}"#).unwrap();
        assert_eq!(value["model"], "b");
        assert_eq!(object.write(&[], &[]), br#"{"model":"b","n":1}"#.to_vec());
    }

    #[test]
    fn many_keys_are_read_in_linear_time_and_repeats_still_resolve() {
        let mut text = String::from("{");
        for key in 0..200_000 {
            text.push_str(&format!("\"k{key}\":{key},"));
        }
        text.push_str("\"k7\":\"last\"}");
        let object = parse(&text);
        assert_eq!(object.raw("k7"), Some("\"last\""));
        assert_eq!(object.raw("k199999"), Some("199999"));
        assert_eq!(object.fields.len(), 200_000);
    }

    #[test]
    fn escaped_keys_are_read_and_written_back_escaped() {
        let object = parse(r#"{"mo\u0064el":"m","a\"b":1}"#);
        assert_eq!(object.raw("model"), Some(r#""m""#));
        let written = object.write(&[], &[]);
        let round: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(round["a\"b"], 1);
    }

    mod properties {
        //! `RawObject` against `serde_json` on generated objects: whatever the spacing, escapes,
        //! nesting and repeated keys, it reads, and writes back, the same object.

        use proptest::prelude::*;
        use serde_json::{Map, Value};

        use super::super::*;

        /// Short keys from a small alphabet, so that objects repeat keys; with escapes.
        fn key() -> impl Strategy<Value = String> {
            prop_oneof![
                "[abm]{1,2}",
                Just("model".to_string()),
                Just("a\"b".to_string()),
                Just("é\u{1F600}\n".to_string()),
            ]
        }

        fn value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                (-1e300f64..1e300).prop_map(Value::from),
                "\\PC{0,8}".prop_map(Value::from),
                "[\"\\\\/\u{0}-\u{1f}]{0,4}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 32, 4, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec((key(), inner), 0..4)
                        .prop_map(|entries| Value::Object(entries.into_iter().collect())),
                ]
            })
        }

        /// JSON whitespace, possibly none.
        fn space() -> impl Strategy<Value = String> {
            "[ \t\r\n]{0,2}"
        }

        /// An object's text with repeated keys allowed, values compact or pretty, and spacing
        /// between every token; and the object `serde_json` reads from it.
        fn object() -> impl Strategy<Value = (String, Map<String, Value>)> {
            prop::collection::vec((key(), value(), any::<bool>(), space(), space()), 0..8).prop_map(
                |entries| {
                    let mut text = String::from("{");
                    for (at, (key, value, pretty, before, after)) in entries.iter().enumerate() {
                        if at > 0 {
                            text.push(',');
                        }
                        text.push_str(before);
                        text.push_str(&serde_json::to_string(key).unwrap());
                        text.push_str(after);
                        text.push(':');
                        text.push_str(before);
                        let value = if *pretty {
                            serde_json::to_string_pretty(value)
                        } else {
                            serde_json::to_string(value)
                        };
                        text.push_str(&value.unwrap());
                        text.push_str(after);
                    }
                    text.push('}');
                    let expected = serde_json::from_str(&text).unwrap();
                    (text, expected)
                },
            )
        }

        proptest! {
            #[test]
            fn reads_every_field_as_serde_json_does((text, expected) in object()) {
                let object = RawObject::parse_text(text.clone()).unwrap();
                prop_assert_eq!(object.to_map(), expected.clone());
                for (key, value) in &expected {
                    let raw: Value = serde_json::from_str(object.raw(key).unwrap()).unwrap();
                    prop_assert_eq!(&raw, value);
                }
                prop_assert_eq!(object.raw("absent key"), None);
                let written: Map<String, Value> =
                    serde_json::from_slice(&object.write(&[], &[])).unwrap();
                prop_assert_eq!(written, expected);
            }

            #[test]
            fn writes_replacements_and_removals_as_serde_json_would(
                (text, mut expected) in object(),
                replaced in key(),
                replacement in value(),
                removed in key(),
            ) {
                let object = RawObject::parse_text(text).unwrap();
                let replacement_text = serde_json::to_string(&replacement).unwrap();
                let written = object.write(&[(&replaced, &replacement_text)], &[&removed]);
                let written: Map<String, Value> = serde_json::from_slice(&written).unwrap();
                // A key both replaced and removed is removed if it was there, and added (as
                // a replacement of nothing) if it was not.
                let had = expected.contains_key(&replaced);
                expected.remove(&removed);
                if !(had && replaced == removed) {
                    // As read back from its text: serde_json's float parsing is not exact.
                    expected.insert(replaced, serde_json::from_str(&replacement_text).unwrap());
                }
                prop_assert_eq!(written, expected);
            }

            #[test]
            fn any_text_is_an_object_exactly_when_serde_json_says_so(
                text in "[{}\\[\\]\":,0-9a-z\\\\ .eE+-]{0,24}",
            ) {
                let ours = RawObject::parse_text(text.clone());
                match serde_json::from_str::<Value>(&text) {
                    Ok(Value::Object(expected)) => {
                        prop_assert_eq!(ours.unwrap().to_map(), expected);
                    }
                    Ok(_) => prop_assert!(matches!(ours, Err(RawError::NotObject))),
                    Err(_) => prop_assert!(matches!(ours, Err(RawError::Syntax(_)))),
                }
            }
        }
    }

    #[test]
    fn non_objects_and_bad_json_are_told_apart() {
        for text in ["[1]", "3", "\"s\"", "null"] {
            assert!(matches!(
                RawObject::parse(Bytes::from(text)),
                Err(RawError::NotObject)
            ));
        }
        // Not JSON, also when it starts like a value of another type (a regression: `0"` was
        // once "not an object").
        for text in [
            "{",
            "{\"a\":}",
            "",
            "{\"a\":1} x",
            "\u{0}",
            "0\"",
            "[1] x",
            "nul",
        ] {
            assert!(matches!(
                RawObject::parse(Bytes::from(text)),
                Err(RawError::Syntax(_))
            ));
        }
        assert!(matches!(
            RawObject::parse(Bytes::from_static(b"{\"a\":\"\xff\"}")),
            Err(RawError::Syntax(_))
        ));
    }
}
