//! Diagnostics: what went wrong, where in the manifest (path, line, column),
//! and how to fix it, rendered like a compiler error with the source line.

use std::fmt::Write;

/// A 1-based line/column position and the width to underline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Span {
    pub line: usize,
    pub col: usize,
    pub len: usize,
}

impl Span {
    pub fn new(line: usize, col: usize, len: usize) -> Span {
        Span { line, col, len }
    }
}

/// One error about the user's input.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnostic {
    /// The manifest path, e.g. `model.topology.layers[0].n_heads`; empty for the whole file.
    pub path: String,
    pub span: Option<Span>,
    pub message: String,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn new(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            path: String::new(),
            span: None,
            message: message.into(),
            help: None,
        }
    }

    pub fn at(mut self, span: Span) -> Diagnostic {
        self.span = Some(span);
        self
    }

    pub fn path(mut self, path: impl Into<String>) -> Diagnostic {
        self.path = path.into();
        self
    }

    pub fn help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    /// Renders the diagnostic against the source it refers to.
    pub fn render(&self, file: &str, src: &str) -> String {
        let mut s = format!("error: {}\n", self.message);
        // The gutter is as wide as the line number, so `-->`, `|` and `=`
        // line up whatever the number of digits (as rustc lays them out).
        let w = self.span.map_or(2, |sp| sp.line.to_string().len());
        match self.span {
            Some(sp) => {
                let _ = writeln!(s, "{:w$}--> {file}:{}:{}", "", sp.line, sp.col);
                if let Some(line) = src.lines().nth(sp.line.saturating_sub(1)) {
                    let _ = writeln!(s, "{:w$} |", "");
                    let _ = writeln!(s, "{} | {}", sp.line, line);
                    let _ = writeln!(
                        s,
                        "{:w$} | {}{}",
                        "",
                        " ".repeat(sp.col.saturating_sub(1)),
                        "^".repeat(sp.len.max(1))
                    );
                }
            }
            None => {
                let _ = writeln!(s, "{:w$}--> {file}", "");
            }
        }
        if !self.path.is_empty() {
            let _ = writeln!(s, "{:w$} = at: {}", "", self.path);
        }
        if let Some(h) = &self.help {
            let _ = writeln!(s, "{:w$} = help: {h}", "");
        }
        s
    }
}

/// All the errors found in one manifest.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Sorted by position so the report reads top to bottom.
    pub fn render(&self, file: &str, src: &str) -> String {
        let mut ds = self.0.clone();
        ds.sort_by_key(|d| d.span.map(|s| (s.line, s.col)).unwrap_or((usize::MAX, 0)));
        let mut out = String::new();
        for d in &ds {
            out += &d.render(file, src);
            out.push('\n');
        }
        let n = ds.len();
        let _ = writeln!(out, "{n} error{} in {file}", if n == 1 { "" } else { "s" });
        out
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Diagnostics {
        Diagnostics(vec![d])
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(ca != *cb))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The closest candidate to `word`, if it is close enough to be a typo.
pub fn suggest<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (edit_distance(&word.to_lowercase(), &c.to_lowercase()), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}
