//! Bad input is a diagnostic, never a crash: every ok manifest and preset,
//! mutated a few hundred deterministic ways (a line deleted, duplicated or
//! re-indented, a number made -1, 0, huge or a string, a value swapped with
//! another's, the file truncated), must compile to `Ok` or `Err` without
//! panicking. When it compiles, its IR must verify and render, and its plan
//! must render.

use caramba_compiler::{compile, plan};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

const MUTATIONS_PER_FILE: usize = 200;

/// Knuth's MMIX linear congruential generator: deterministic, no dependency.
struct Lcg(u64);

impl Lcg {
    fn new(seed: &str) -> Lcg {
        // FNV-1a of the file name, so each file gets its own fixed sequence.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        Lcg(h)
    }

    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Byte ranges of the numbers in `src` (digits with an optional sign,
/// decimal point and exponent), skipping comments.
fn numbers(src: &str) -> Vec<(usize, usize)> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut in_comment = false;
    while i < b.len() {
        match b[i] {
            b'\n' => in_comment = false,
            b'#' => in_comment = true,
            c if c.is_ascii_digit()
                && !in_comment
                && (i == 0 || !b[i - 1].is_ascii_alphanumeric() && b[i - 1] != b'_') =>
            {
                let start = if i > 0 && b[i - 1] == b'-' { i - 1 } else { i };
                let mut j = i;
                while j < b.len()
                    && (b[j].is_ascii_digit()
                        || b"._eE".contains(&b[j])
                        || (b"+-".contains(&b[j]) && b"eE".contains(&b[j - 1])))
                {
                    j += 1;
                }
                out.push((start, j));
                i = j;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    out
}

/// One mutation of `src`, and a short description of it.
fn mutate(src: &str, rng: &mut Lcg) -> (String, String) {
    let lines: Vec<&str> = src.lines().collect();
    let n = lines.len();
    let join = |ls: Vec<String>| ls.join("\n") + "\n";
    let owned = || lines.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    match rng.below(8) {
        0 => {
            let i = rng.below(n);
            let mut ls = owned();
            ls.remove(i);
            (join(ls), format!("delete line {}", i + 1))
        }
        1 => {
            let i = rng.below(n);
            let mut ls = owned();
            ls.insert(i, lines[i].to_string());
            (join(ls), format!("duplicate line {}", i + 1))
        }
        2..=4 => {
            let nums = numbers(src);
            if nums.is_empty() {
                return (src.to_string(), "unchanged".into());
            }
            let (a, b) = nums[rng.below(nums.len())];
            let with = ["-1", "0", "\"x\"", "4611686018427387904"][rng.below(4)];
            (
                format!("{}{with}{}", &src[..a], &src[b..]),
                format!("number `{}` at byte {a} → {with}", &src[a..b]),
            )
        }
        5 => {
            // Re-indent one line by ±2 spaces, or swap two lines' indentation.
            let i = rng.below(n);
            let mut ls = owned();
            let indent = |l: &str| l.len() - l.trim_start_matches(' ').len();
            match rng.below(3) {
                0 => ls[i] = format!("  {}", lines[i]),
                1 => ls[i] = lines[i].strip_prefix("  ").unwrap_or(lines[i]).to_string(),
                _ => {
                    let j = (i + 1).min(n - 1);
                    ls[i] = format!(
                        "{}{}",
                        " ".repeat(indent(lines[j])),
                        lines[i].trim_start_matches(' ')
                    );
                    ls[j] = format!(
                        "{}{}",
                        " ".repeat(indent(lines[i])),
                        lines[j].trim_start_matches(' ')
                    );
                }
            }
            (join(ls), format!("re-indent line {}", i + 1))
        }
        6 => {
            // Give one `key: value` line the value of another.
            let kv: Vec<usize> = (0..n)
                .filter(|&i| lines[i].contains(": ") && !lines[i].trim_start().starts_with('#'))
                .collect();
            if kv.len() < 2 {
                return (src.to_string(), "unchanged".into());
            }
            let (i, j) = (kv[rng.below(kv.len())], kv[rng.below(kv.len())]);
            let key = lines[i].split_once(": ").unwrap().0;
            let value = lines[j].split_once(": ").unwrap().1;
            let mut ls = owned();
            ls[i] = format!("{key}: {value}");
            (
                join(ls),
                format!("line {} gets the value of line {}", i + 1, j + 1),
            )
        }
        _ => {
            let mut at = rng.below(src.len());
            while !src.is_char_boundary(at) {
                at -= 1;
            }
            (src[..at].to_string(), format!("truncate at byte {at}"))
        }
    }
}

/// Everything a command does with a manifest, short of running it.
fn exercise(src: &str) {
    if let Ok(c) = compile(src) {
        if let Err(e) = caramba_ir::verify(&c.student.graph) {
            panic!("compiled, but the IR does not verify: {e:?}");
        }
        let _ = caramba_ir::to_text(&c.student.graph);
        if let Some(t) = &c.teacher {
            let _ = caramba_ir::to_text(&t.graph);
        }
        let _ = plan::render(&c, None);
    }
}

fn inputs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut out = Vec::new();
    for dir in ["tests/data/manifests/ok", "presets"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "yml") {
                out.push(p);
            }
        }
    }
    out.sort();
    assert!(out.len() >= 10, "too few inputs to mutate: {out:?}");
    out
}

#[test]
fn mutated_manifests_never_panic() {
    // Panics are caught and listed below; keep their default report from
    // flooding the output. This file holds one test, so the hook is ours alone.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    let mut outcomes = (0usize, 0usize);
    for path in inputs() {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let src = std::fs::read_to_string(&path).unwrap();
        let mut rng = Lcg::new(&name);
        for k in 0..MUTATIONS_PER_FILE {
            let (mutated, what) = mutate(&src, &mut rng);
            match catch_unwind(AssertUnwindSafe(|| exercise(&mutated))) {
                Ok(()) => {
                    if compile(&mutated).is_ok() {
                        outcomes.0 += 1;
                    } else {
                        outcomes.1 += 1;
                    }
                }
                Err(e) => {
                    let msg = e
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    failures.push(format!("{name} mutation #{k} ({what}): {msg}"));
                }
            }
        }
    }
    std::panic::set_hook(hook);
    assert!(
        failures.is_empty(),
        "{} mutations panicked:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The mutations must actually produce errors, or this test checks nothing.
    assert!(
        outcomes.1 > outcomes.0 / 4,
        "too few mutations broke a manifest: {outcomes:?} (ok, err)"
    );
}
