//! `vars:` and `${name}` substitution.
//!
//! A string that is exactly `${name}` is replaced by the variable's value,
//! keeping its type (`"${d_model}"` becomes the integer 2048). A variable
//! inside a longer string is interpolated as text. Variables may use other
//! variables; a cycle or an undefined name is an error at the place of use.
//! `$${` writes a literal `${`.

use crate::diag::{suggest, Diagnostic, Diagnostics};
use crate::yaml::{Node, Value};
use std::collections::BTreeMap;

/// Removes `vars` from the root and substitutes them everywhere else.
/// Returns the substituted tree and the resolved variables.
pub fn substitute(root: &Node) -> Result<(Node, BTreeMap<String, Node>), Diagnostics> {
    let mut diags = Diagnostics::default();
    let mut raw: BTreeMap<String, Node> = BTreeMap::new();
    if let Some(vars) = root.get("vars") {
        match vars.as_map() {
            Some(m) => {
                for (k, v) in m {
                    raw.insert(k.as_str().unwrap_or_default().to_string(), v.clone());
                }
            }
            None if matches!(vars.value, Value::Null) => {}
            None => diags.push(
                Diagnostic::new(format!(
                    "`vars` must be a mapping of names to values, found {}",
                    vars.kind()
                ))
                .path("vars")
                .at(vars.span),
            ),
        }
    }
    let mut r = Resolver {
        raw: &raw,
        done: BTreeMap::new(),
        visiting: Vec::new(),
        diags: &mut diags,
    };
    let names: Vec<String> = raw.keys().cloned().collect();
    for name in &names {
        r.resolve_var(name);
    }
    let resolved = std::mem::take(&mut r.done);
    let mut r = Resolver {
        raw: &raw,
        done: resolved,
        visiting: Vec::new(),
        diags: &mut diags,
    };
    let out = r.subst(&root.without(&["vars"]), "");
    let resolved = r.done;
    if diags.is_empty() {
        Ok((out, resolved))
    } else {
        Err(diags)
    }
}

struct Resolver<'a> {
    raw: &'a BTreeMap<String, Node>,
    done: BTreeMap<String, Node>,
    visiting: Vec<String>,
    diags: &'a mut Diagnostics,
}

impl Resolver<'_> {
    fn resolve_var(&mut self, name: &str) -> Option<Node> {
        if let Some(n) = self.done.get(name) {
            return Some(n.clone());
        }
        if let Some(pos) = self.visiting.iter().position(|v| v == name) {
            let mut cycle = self.visiting[pos..].to_vec();
            cycle.push(name.to_string());
            let at = &self.raw[name];
            self.diags.push(
                Diagnostic::new(format!("variables form a cycle: {}", cycle.join(" → ")))
                    .path(format!("vars.{name}"))
                    .at(at.span),
            );
            return None;
        }
        let raw = self.raw.get(name)?.clone();
        self.visiting.push(name.to_string());
        let node = self.subst(&raw, &format!("vars.{name}"));
        self.visiting.pop();
        self.done.insert(name.to_string(), node.clone());
        Some(node)
    }

    fn subst(&mut self, node: &Node, path: &str) -> Node {
        let value = match &node.value {
            Value::Str(s) if s.contains("${") => return self.subst_str(node, s, path),
            Value::Seq(xs) => Value::Seq(
                xs.iter()
                    .enumerate()
                    .map(|(i, x)| self.subst(x, &format!("{path}[{i}]")))
                    .collect(),
            ),
            Value::Map(m) => Value::Map(
                m.iter()
                    .map(|(k, v)| {
                        let key = k.as_str().unwrap_or_default();
                        let p = if path.is_empty() {
                            key.to_string()
                        } else {
                            format!("{path}.{key}")
                        };
                        (k.clone(), self.subst(v, &p))
                    })
                    .collect(),
            ),
            other => other.clone(),
        };
        Node::new(value, node.span)
    }

    fn lookup(&mut self, name: &str, node: &Node, path: &str) -> Option<Node> {
        if self.raw.contains_key(name) {
            return self.resolve_var(name);
        }
        let names: Vec<&str> = self.raw.keys().map(String::as_str).collect();
        let mut d = Diagnostic::new(format!("undefined variable `{name}`"))
            .path(path)
            .at(node.span);
        d = match suggest(name, &names) {
            Some(s) => d.help(format!("did you mean `{s}`? define it under `vars:`")),
            None => d.help("define it under `vars:`"),
        };
        self.diags.push(d);
        None
    }

    fn subst_str(&mut self, node: &Node, s: &str, path: &str) -> Node {
        // A whole-string reference keeps the variable's type.
        if let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
            if !name.contains('}') && !name.contains("${") {
                return match self.lookup(name.trim(), node, path) {
                    Some(mut v) => {
                        v.span = node.span;
                        v
                    }
                    None => node.clone(),
                };
            }
        }
        let mut out = String::new();
        let mut rest = s;
        while let Some(i) = rest.find('$') {
            out += &rest[..i];
            let tail = &rest[i..];
            if let Some(t) = tail.strip_prefix("$${") {
                out += "${";
                rest = t;
            } else if let Some(t) = tail.strip_prefix("${") {
                let Some(end) = t.find('}') else {
                    self.diags.push(
                        Diagnostic::new("unterminated `${` in string")
                            .path(path)
                            .at(node.span),
                    );
                    return node.clone();
                };
                let name = t[..end].trim();
                match self.lookup(name, node, path) {
                    Some(v) => match &v.value {
                        Value::Str(x) => out += x,
                        Value::Int(x) => out += &x.to_string(),
                        Value::Float(x) => out += &x.to_string(),
                        Value::Bool(x) => out += &x.to_string(),
                        _ => {
                            self.diags.push(
                                Diagnostic::new(format!(
                                    "variable `{name}` is {} and cannot be interpolated into a string",
                                    v.kind()
                                ))
                                .path(path)
                                .at(node.span),
                            );
                        }
                    },
                    None => return node.clone(),
                }
                rest = &t[end + 1..];
            } else {
                out.push('$');
                rest = &tail[1..];
            }
        }
        out += rest;
        Node::new(Value::Str(out), node.span)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::parse;

    #[test]
    fn whole_references_keep_type_and_vars_chain() {
        let n = parse("vars:\n  a: 64\n  b: ${a}\n  s: run_${b}\nx: ${b}\ny: \"${s}\"\nz: $${a}\n")
            .unwrap();
        let (out, _) = substitute(&n).unwrap();
        assert_eq!(out.get("x").unwrap().value, Value::Int(64));
        assert_eq!(out.get("y").unwrap().value, Value::Str("run_64".into()));
        assert_eq!(out.get("z").unwrap().value, Value::Str("${a}".into()));
        assert!(out.get("vars").is_none());
    }

    #[test]
    fn cycles_and_undefined_names_are_errors() {
        let n = parse("vars:\n  a: ${b}\n  b: ${a}\nx: ${d_modle}\n").unwrap();
        let e = substitute(&n).unwrap_err();
        assert!(e
            .0
            .iter()
            .any(|d| d.message.starts_with("variables form a cycle")));
        assert!(e
            .0
            .iter()
            .any(|d| d.message == "undefined variable `d_modle`" && d.path == "x"));
    }
}
