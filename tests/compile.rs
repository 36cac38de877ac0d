//! Golden tests for the compile stage (parse → validate → lower → plan).
//!
//! Inputs live under `tests/data/manifests/{ok,err}/`; every preset in
//! `presets/` is an `ok` input too. Each `err` manifest must fail, and its
//! rendered diagnostics are snapshotted: error messages are part of the
//! interface. Each `ok` manifest must compile to IR that verifies; its IR
//! text and its plan are snapshotted. Snapshots live in `tests/snapshots/`.
//!
//! A failing file does not hide the others: every file is checked and the
//! test then fails naming each file that went wrong.

use caramba_compiler::{compile, plan, Compiled};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `.yml` files of a directory under the repo root, sorted.
fn manifests(dir: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
        .unwrap_or_else(|e| panic!("cannot read {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no manifests in {dir}");
    out
}

/// The path as the user would type it from the repo root, so snapshots do
/// not depend on where the checkout lives.
fn rel(path: &Path) -> String {
    path.strip_prefix(repo())
        .unwrap()
        .to_string_lossy()
        .replace('\\', "/")
}

fn stem(path: &Path) -> String {
    path.file_stem().unwrap().to_string_lossy().into_owned()
}

/// Runs `check` on every file, then fails listing every file whose check panicked.
fn each(files: &[PathBuf], check: impl Fn(&Path)) {
    let failed: Vec<String> = files
        .iter()
        .filter(|f| catch_unwind(AssertUnwindSafe(|| check(f))).is_err())
        .map(|f| rel(f))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} manifests failed their check:\n  {}",
        failed.len(),
        files.len(),
        failed.join("\n  ")
    );
}

fn snapshot(name: &str, source: &str, text: &str) {
    insta::with_settings!({ description => source, omit_expression => true }, {
        insta::assert_snapshot!(name, text);
    });
}

/// An `err` manifest: compiling fails, with located, distinct diagnostics.
fn check_err(path: &Path) {
    let src = std::fs::read_to_string(path).unwrap();
    let file = rel(path);
    assert!(
        src.starts_with('#'),
        "{file}: an err manifest starts with a comment saying what is wrong"
    );
    let diags = match compile(&src) {
        Ok(_) => panic!("{file} compiled, but it is in err/"),
        Err(d) => d,
    };
    assert!(!diags.is_empty(), "{file}: an error without diagnostics");
    let rendered = diags.render(&file, &src);
    assert!(
        !rendered.contains("internal error"),
        "{file}: a user mistake reported as a compiler bug:\n{rendered}"
    );
    for (i, d) in diags.0.iter().enumerate() {
        assert!(
            !diags.0[..i].contains(d),
            "{file}: diagnostic reported twice:\n{rendered}"
        );
    }
    snapshot(&stem(path), &file, &rendered);
}

/// An `ok` manifest: it compiles, its IR verifies, and its IR and plan match the snapshots.
fn check_ok(path: &Path, prefix: &str) {
    let src = std::fs::read_to_string(path).unwrap();
    let file = rel(path);
    let c: Compiled = match compile(&src) {
        Ok(c) => c,
        Err(d) => panic!("{file} does not compile:\n{}", d.render(&file, &src)),
    };
    if let Err(errs) = caramba_ir::verify(&c.student.graph) {
        panic!("{file}: the student's IR does not verify: {errs:?}");
    }
    if let Some(t) = &c.teacher {
        if let Err(errs) = caramba_ir::verify(&t.graph) {
            panic!("{file}: the teacher's IR does not verify: {errs:?}");
        }
    }
    let name = format!("{prefix}{}", stem(path));
    snapshot(
        &format!("{name}.ir"),
        &file,
        &caramba_ir::to_text(&c.student.graph),
    );
    snapshot(&format!("{name}.plan"), &file, &plan::render(&c, None));
}

#[test]
fn err_manifests_fail_with_snapshotted_diagnostics() {
    let files = manifests("tests/data/manifests/err");
    assert!(
        files.len() >= 30,
        "the err corpus shrank to {} files",
        files.len()
    );
    each(&files, check_err);
}

#[test]
fn ok_manifests_compile_to_verified_ir() {
    each(&manifests("tests/data/manifests/ok"), |p| {
        check_ok(p, "ok.")
    });
}

#[test]
fn presets_compile_to_verified_ir() {
    each(&manifests("presets"), |p| check_ok(p, "preset."));
}

/// The ok corpus exercises every topology and layer of the manifest
/// language; a new one without an example fails here.
#[test]
fn ok_corpus_covers_the_language() {
    let all: String = manifests("tests/data/manifests/ok")
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    let mut missing = Vec::new();
    for t in [
        "type: StackedTopology",
        "type: SequentialTopology",
        "type: ResidualTopology",
        "type: NestedTopology",
        "type: ParallelTopology",
        "combine: sum",
        "combine: mean",
        "type: BranchingTopology",
        "type: CyclicTopology",
        "type: RecurrentTopology",
        "type: AttentionLayer",
        "mode: standard",
        "mode: gqa",
        "mode: decoupled",
        "decoupled_gate: true",
        "rope_enabled: false",
        "type: llama3",
        "type: linear",
        "type: RMSNormLayer",
        "type: LayerNormLayer",
        "type: SwiGLULayer",
        "type: LinearLayer",
        "type: DropoutLayer",
        "type: RoPE",
        "type: compare",
        "type: eval",
        "$${",
    ] {
        if !all.contains(t) {
            missing.push(t);
        }
    }
    assert!(missing.is_empty(), "no ok manifest contains: {missing:?}");
}
