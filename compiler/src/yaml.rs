//! Parses YAML into a tree of [`Node`]s that remember where they came from,
//! so every later error can point at a line and column. Anchors and aliases
//! are resolved here; duplicate keys are errors.

use crate::diag::{Diagnostic, Span};
use yaml_rust2::parser::{Event, Parser};
use yaml_rust2::scanner::TScalarStyle;
use yaml_rust2::Yaml;

/// A YAML value with its source position.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub value: Value,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    /// Entries in source order; keys are scalars.
    Map(Vec<(Node, Node)>),
}

impl Node {
    pub fn new(value: Value, span: Span) -> Node {
        Node { value, span }
    }

    /// What the value is, for messages ("a string", "a mapping", ...).
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Null => "null",
            Value::Bool(_) => "a boolean",
            Value::Int(_) => "an integer",
            Value::Float(_) => "a number",
            Value::Str(_) => "a string",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.value {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_map(&self) -> Option<&[(Node, Node)]> {
        match &self.value {
            Value::Map(m) => Some(m),
            _ => None,
        }
    }

    /// The entry under `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Node> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// A copy of a mapping without the entries under `keys`.
    pub fn without(&self, keys: &[&str]) -> Node {
        match &self.value {
            Value::Map(m) => Node::new(
                Value::Map(
                    m.iter()
                        .filter(|(k, _)| !k.as_str().is_some_and(|s| keys.contains(&s)))
                        .cloned()
                        .collect(),
                ),
                self.span,
            ),
            _ => self.clone(),
        }
    }

    /// Back to a plain `serde_yaml::Value` (for the resolved manifest).
    pub fn to_serde(&self) -> serde_yaml::Value {
        use serde_yaml::Value as V;
        match &self.value {
            Value::Null => V::Null,
            Value::Bool(b) => V::Bool(*b),
            Value::Int(i) => V::Number((*i).into()),
            Value::Float(f) => V::Number((*f).into()),
            Value::Str(s) => V::String(s.clone()),
            Value::Seq(xs) => V::Sequence(xs.iter().map(Node::to_serde).collect()),
            Value::Map(m) => V::Mapping(
                m.iter()
                    .map(|(k, v)| (k.to_serde(), v.to_serde()))
                    .collect(),
            ),
        }
    }
}

/// Parses one YAML document. An empty document is an empty mapping.
pub fn parse(src: &str) -> Result<Node, Diagnostic> {
    let mut parser = Parser::new_from_str(src);
    let mut b = Builder {
        stack: Vec::new(),
        anchors: Default::default(),
        root: None,
        src,
    };
    loop {
        let (ev, mark) = parser
            .next_token()
            .map_err(|e| syntax_error(src, e.info(), e.marker().line(), e.marker().col() + 1))?;
        let span = Span::new(mark.line(), mark.col() + 1, 1);
        match ev {
            Event::StreamEnd => break,
            Event::DocumentStart => {
                if b.root.is_some() {
                    return Err(Diagnostic::new(
                        "a manifest holds one YAML document, found a second",
                    )
                    .at(span));
                }
            }
            other => b.event(other, span)?,
        }
    }
    Ok(b.root
        .unwrap_or(Node::new(Value::Map(Vec::new()), Span::new(1, 1, 0))))
}

/// A scanner error, located where a reader would look for the mistake.
fn syntax_error(src: &str, info: &str, line: usize, col: usize) -> Diagnostic {
    let lines: Vec<&str> = src.lines().collect();
    let mut at = Span::new(line, col, 1);
    let mut help = None;
    if info.contains("tab") {
        // The scanner reports where the enclosing token started; point at the tab itself.
        let found = lines
            .iter()
            .enumerate()
            .skip(line.saturating_sub(1))
            .find_map(|(i, l)| {
                let from = if i + 1 == line {
                    col.saturating_sub(1)
                } else {
                    0
                };
                let c = l.chars().skip(from).position(|c| c == '\t')?;
                Some(Span::new(i + 1, from + c + 1, 1))
            });
        if let Some(sp) = found {
            at = sp;
        }
        help = Some("YAML indentation must use spaces, not tabs");
    } else if info.contains("mapping values are not allowed") {
        help = Some("check this line's indentation against the line above, or quote a value that contains `: `");
    }
    if line > lines.len() {
        // Errors at the end of the input (an unclosed bracket or quote) point
        // just past the last written character instead of a line that doesn't exist.
        if let Some((i, l)) = lines
            .iter()
            .enumerate()
            .rev()
            .find(|(_, l)| !l.trim().is_empty())
        {
            at = Span::new(i + 1, l.chars().count() + 1, 1);
        }
    }
    let d = Diagnostic::new(format!("YAML syntax error: {info}")).at(at);
    match help {
        Some(h) => d.help(h),
        None => d,
    }
}

enum Frame {
    Seq(Vec<Node>, Span, usize),
    Map(Vec<(Node, Node)>, Option<Node>, Span, usize),
}

struct Builder<'s> {
    stack: Vec<Frame>,
    anchors: std::collections::HashMap<usize, Node>,
    root: Option<Node>,
    src: &'s str,
}

impl Builder<'_> {
    fn event(&mut self, ev: Event, span: Span) -> Result<(), Diagnostic> {
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let len = self.scalar_len(&text, style);
                let value = if style == TScalarStyle::Plain && tag.is_none() {
                    resolve_plain(&text)
                } else {
                    Value::Str(text)
                };
                let node = Node::new(value, Span { len, ..span });
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push(node)
            }
            Event::Alias(id) => {
                let mut node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| Diagnostic::new("alias to an unknown anchor").at(span))?;
                node.span = span;
                self.push(node)
            }
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Frame::Seq(Vec::new(), span, anchor));
                Ok(())
            }
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map(Vec::new(), None, span, anchor));
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq(xs, span, a)) => (Node::new(Value::Seq(xs), span), a),
                    Some(Frame::Map(m, _, span, a)) => {
                        // A block mapping's start event is marked at its first `:`;
                        // the mapping starts at its first key.
                        let span = match m.first() {
                            Some((k, _)) if (k.span.line, k.span.col) < (span.line, span.col) => {
                                Span { len: 1, ..k.span }
                            }
                            _ => span,
                        };
                        (Node::new(Value::Map(m), span), a)
                    }
                    None => return Err(Diagnostic::new("unbalanced YAML structure").at(span)),
                };
                if anchor > 0 {
                    self.anchors.insert(anchor, node.clone());
                }
                self.push(node)
            }
            _ => Ok(()),
        }
    }

    fn push(&mut self, node: Node) -> Result<(), Diagnostic> {
        match self.stack.last_mut() {
            None => {
                self.root = Some(node);
                Ok(())
            }
            Some(Frame::Seq(xs, _, _)) => {
                xs.push(node);
                Ok(())
            }
            Some(Frame::Map(m, pending, _, _)) => match pending.take() {
                None => {
                    if !matches!(
                        node.value,
                        Value::Str(_)
                            | Value::Int(_)
                            | Value::Bool(_)
                            | Value::Null
                            | Value::Float(_)
                    ) {
                        return Err(
                            Diagnostic::new("mapping keys must be plain scalars").at(node.span)
                        );
                    }
                    let key = Node::new(Value::Str(scalar_text(&node)), node.span);
                    if let Some((first, _)) = m.iter().find(|(k, _)| k.value == key.value) {
                        return Err(Diagnostic::new(format!(
                            "duplicate key `{}` (first defined at line {})",
                            scalar_text(&key),
                            first.span.line
                        ))
                        .at(key.span));
                    }
                    *pending = Some(key);
                    Ok(())
                }
                Some(key) => {
                    m.push((key, node));
                    Ok(())
                }
            },
        }
    }

    /// Length of the scalar's source text, for underlining.
    fn scalar_len(&self, text: &str, style: TScalarStyle) -> usize {
        let _ = self.src;
        match style {
            TScalarStyle::SingleQuoted | TScalarStyle::DoubleQuoted => text.chars().count() + 2,
            _ => text
                .lines()
                .next()
                .map(|l| l.chars().count())
                .unwrap_or(0)
                .max(1),
        }
    }
}

fn scalar_text(node: &Node) -> String {
    match &node.value {
        Value::Str(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Float(f) => f.to_string(),
        Value::Bool(b) => b.to_string(),
        Value::Null => "null".into(),
        _ => String::new(),
    }
}

/// YAML 1.2 core-schema resolution of a plain scalar.
fn resolve_plain(text: &str) -> Value {
    match Yaml::from_str(text) {
        Yaml::Null => Value::Null,
        Yaml::Boolean(b) => Value::Bool(b),
        Yaml::Integer(i) => Value::Int(i),
        Yaml::Real(r) => match r.parse::<f64>() {
            Ok(f) => Value::Float(f),
            Err(_) => match r.as_str() {
                ".inf" | ".Inf" | ".INF" | "+.inf" => Value::Float(f64::INFINITY),
                "-.inf" | "-.Inf" | "-.INF" => Value::Float(f64::NEG_INFINITY),
                ".nan" | ".NaN" | ".NAN" => Value::Float(f64::NAN),
                _ => Value::Str(text.to_string()),
            },
        },
        _ => Value::Str(text.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scalars_resolve_with_positions() {
        let n = parse("a: 1\nb: 1e-5\nc: 'x'\nd: true\ne: ~\nf: [1, two]\n").unwrap();
        assert_eq!(n.get("a").unwrap().value, Value::Int(1));
        assert_eq!(n.get("b").unwrap().value, Value::Float(1e-5));
        assert_eq!(n.get("c").unwrap().value, Value::Str("x".into()));
        assert_eq!(n.get("d").unwrap().value, Value::Bool(true));
        assert_eq!(n.get("e").unwrap().value, Value::Null);
        let b = n.get("b").unwrap();
        assert_eq!((b.span.line, b.span.col), (2, 4));
    }

    #[test]
    fn duplicate_keys_and_syntax_errors_are_located() {
        let e = parse("a: 1\na: 2\n").unwrap_err();
        assert!(e.message.contains("duplicate key `a`"), "{}", e.message);
        assert_eq!(e.span.unwrap().line, 2);
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert!(e.message.starts_with("YAML syntax error"), "{}", e.message);
    }

    #[test]
    fn aliases_copy_anchored_nodes() {
        let n = parse("a: &m {x: 1}\nb: *m\n").unwrap();
        assert_eq!(n.get("b").unwrap().get("x").unwrap().value, Value::Int(1));
    }
}
