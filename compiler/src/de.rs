//! A serde `Deserializer` over spanned [`Node`]s. Typed manifest structs are
//! plain serde derives (`deny_unknown_fields`); this adapter makes each error
//! carry the manifest path and source position of the value it is about.

use crate::diag::{suggest, Diagnostic, Span};
use crate::yaml::{Node, Value};
use serde::de::{self, DeserializeOwned, IntoDeserializer, Visitor};
use std::fmt;

/// A deserialization error; located once by the innermost node that saw it.
#[derive(Debug)]
pub struct Error {
    msg: String,
    help: Option<String>,
    at: Option<(String, Span)>,
}

impl Error {
    fn locate(mut self, path: &str, span: Span) -> Error {
        if self.at.is_none() {
            self.at = Some((path.to_string(), span));
        }
        self
    }

    pub fn into_diagnostic(self) -> Diagnostic {
        let mut d = Diagnostic::new(tidy(&self.msg));
        if let Some((path, span)) = self.at {
            d = d.path(path).at(span);
        }
        if let Some(h) = self.help {
            d = d.help(h);
        }
        d
    }
}

/// serde speaks of `u64` and `usize`; users read "a non-negative integer".
fn tidy(msg: &str) -> String {
    msg.replace("expected u64", "expected a non-negative integer")
        .replace("expected usize", "expected a non-negative integer")
        .replace("expected u32", "expected a non-negative integer")
        .replace("expected f64", "expected a number")
        .replace("expected f32", "expected a number")
        .replace("expected i64", "expected an integer")
        .replace("expected a borrowed string", "expected a string")
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.msg)
    }
}

impl std::error::Error for Error {}

impl de::Error for Error {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Error {
            msg: msg.to_string(),
            help: None,
            at: None,
        }
    }

    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        unknown("field", field, expected)
    }

    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        unknown("value", variant, expected)
    }
}

/// "unknown field `n_head`" with a "did you mean" and the accepted names.
fn unknown(what: &str, found: &str, expected: &[&str]) -> Error {
    let list = expected
        .iter()
        .map(|f| format!("`{f}`"))
        .collect::<Vec<_>>()
        .join(", ");
    Error {
        msg: format!("unknown {what} `{found}`"),
        help: Some(match suggest(found, expected) {
            Some(s) => format!("did you mean `{s}`? expected one of {list}"),
            None => format!("expected one of {list}"),
        }),
        at: None,
    }
}

/// Deserializes `T` from `node`, which sits at manifest `path`.
pub fn from_node<T: DeserializeOwned>(node: &Node, path: &str) -> Result<T, Diagnostic> {
    T::deserialize(NodeDe {
        node,
        path: path.to_string(),
    })
    .map_err(|e| e.locate(path, node.span).into_diagnostic())
}

struct NodeDe<'a> {
    node: &'a Node,
    path: String,
}

impl NodeDe<'_> {
    fn wrap<T>(&self, r: Result<T, Error>) -> Result<T, Error> {
        r.map_err(|e| e.locate(&self.path, self.node.span))
    }
}

impl<'de> de::Deserializer<'de> for NodeDe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        let r = match &self.node.value {
            Value::Null => v.visit_unit(),
            Value::Bool(b) => v.visit_bool(*b),
            Value::Int(i) => v.visit_i64(*i),
            Value::Float(f) => v.visit_f64(*f),
            Value::Str(s) => v.visit_str(s),
            Value::Seq(xs) => v.visit_seq(SeqDe {
                xs,
                i: 0,
                path: &self.path,
            }),
            Value::Map(m) => v.visit_map(MapDe {
                m,
                i: 0,
                path: &self.path,
                value: None,
            }),
        };
        self.wrap(r)
    }

    fn deserialize_option<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.node.value {
            Value::Null => self.wrap(v.visit_none()),
            _ => {
                let span = self.node.span;
                let path = self.path.clone();
                v.visit_some(self).map_err(|e| e.locate(&path, span))
            }
        }
    }

    fn deserialize_f64<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        match self.node.value {
            Value::Int(i) => self.wrap(v.visit_f64(i as f64)),
            _ => self.deserialize_any(v),
        }
    }

    fn deserialize_f32<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_f64(v)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        // Unit variants are written as strings; case is not significant
        // (`mode: DECOUPLED` and `mode: decoupled` are the same).
        match &self.node.value {
            Value::Str(s) => {
                let lower = s.to_lowercase();
                self.wrap(v.visit_enum(lower.as_str().into_deserializer()))
            }
            _ => self.wrap(Err(de::Error::custom(format!(
                "expected a string naming a variant, found {}",
                self.node.kind()
            )))),
        }
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        v: V,
    ) -> Result<V::Value, Error> {
        // serde would also fill a struct from a list, field by field; in a
        // manifest that is always a mistake, so say what was expected.
        match &self.node.value {
            Value::Map(_) => self.deserialize_any(v),
            _ => self.wrap(Err(de::Error::custom(format!(
                "invalid type: {}, expected a mapping",
                self.node.kind()
            )))),
        }
    }

    fn deserialize_string<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        // Numbers and booleans are accepted where a string is expected only
        // when they were written as strings; say so rather than coerce.
        match &self.node.value {
            Value::Str(s) => self.wrap(v.visit_str(s)),
            _ => self.wrap(Err(de::Error::custom(format!(
                "invalid type: {}, expected a string",
                self.node.kind()
            )))),
        }
    }

    fn deserialize_str<V: Visitor<'de>>(self, v: V) -> Result<V::Value, Error> {
        self.deserialize_string(v)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 char
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map identifier ignored_any
    }
}

struct SeqDe<'a> {
    xs: &'a [Node],
    i: usize,
    path: &'a str,
}

impl<'de> de::SeqAccess<'de> for SeqDe<'_> {
    type Error = Error;

    fn next_element_seed<T: de::DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        let Some(node) = self.xs.get(self.i) else {
            return Ok(None);
        };
        let path = format!("{}[{}]", self.path, self.i);
        self.i += 1;
        seed.deserialize(NodeDe {
            node,
            path: path.clone(),
        })
        .map(Some)
        .map_err(|e| e.locate(&path, node.span))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.xs.len() - self.i)
    }
}

struct MapDe<'a> {
    m: &'a [(Node, Node)],
    i: usize,
    path: &'a str,
    value: Option<(&'a Node, String)>,
}

impl<'de> de::MapAccess<'de> for MapDe<'_> {
    type Error = Error;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        let Some((k, v)) = self.m.get(self.i) else {
            return Ok(None);
        };
        self.i += 1;
        let key = k.as_str().unwrap_or_default();
        let path = if self.path.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.path)
        };
        self.value = Some((v, path.clone()));
        seed.deserialize(NodeDe {
            node: k,
            path: path.clone(),
        })
        .map(Some)
        .map_err(|e| e.locate(&path, k.span))
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let (node, path) = self
            .value
            .take()
            .expect("serde calls next_key before next_value");
        seed.deserialize(NodeDe {
            node,
            path: path.clone(),
        })
        .map_err(|e| e.locate(&path, node.span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n_heads: u64,
        theta: f64,
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        layers: Vec<Inner>,
    }

    #[test]
    fn errors_carry_path_and_position() {
        let n = parse("layers:\n  - n_heads: 4\n    theta: 1\n  - n_heads: -2\n    theta: 1\n")
            .unwrap();
        let e = from_node::<Outer>(&n, "model").unwrap_err();
        assert_eq!(e.path, "model.layers[1].n_heads");
        assert_eq!(e.span.unwrap().line, 4);
        assert!(
            e.message.contains("expected a non-negative integer"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unknown_fields_suggest_the_closest() {
        let n = parse("layers:\n  - n_head: 4\n    theta: 1\n").unwrap();
        let e = from_node::<Outer>(&n, "m").unwrap_err();
        assert_eq!(e.message, "unknown field `n_head`");
        assert!(e.help.unwrap().starts_with("did you mean `n_heads`?"));
        assert_eq!((e.span.unwrap().line, e.span.unwrap().col), (2, 5));
    }

    #[test]
    fn missing_fields_point_at_the_mapping() {
        let n = parse("layers:\n  - n_heads: 4\n").unwrap();
        let e = from_node::<Outer>(&n, "m").unwrap_err();
        assert_eq!(e.message, "missing field `theta`");
        assert_eq!(e.path, "m.layers[0]");
    }
}
