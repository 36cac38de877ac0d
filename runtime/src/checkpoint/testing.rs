//! Test support: locating the real-world fixtures that `scripts/fixtures.sh`
//! caches in `.fixtures/` at the repository root.
//!
//! A test that needs a fixture calls [`fixture_path`]; when the file is
//! missing it prints a `SKIPPED` line straight to the terminal (past the test
//! harness's output capture) and returns `None`, so a skip is never silent.
//! Setting `CARAMBA_REQUIRE_FIXTURES=1` (as CI does after running the script)
//! turns a missing fixture into a failure.

use std::io::Write;
use std::path::PathBuf;

/// `<repo>/.fixtures`, found from this crate's manifest directory.
pub fn fixtures_dir() -> PathBuf {
    // A test binary carried to another machine finds them where it is told.
    if let Some(dir) = std::env::var_os("CARAMBA_FIXTURES") {
        return PathBuf::from(dir);
    }
    let runtime = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    runtime
        .parent()
        .expect("caramba-runtime lives one level below the repository root")
        .join(".fixtures")
}

/// The path of fixture `name` if it has been fetched; otherwise announces the
/// skip loudly and returns `None` (or panics under `CARAMBA_REQUIRE_FIXTURES`).
pub fn fixture_path(name: &str) -> Option<PathBuf> {
    let path = fixtures_dir().join(name);
    if path.is_file() {
        return Some(path);
    }
    let message = format!(
        "SKIPPED: fixture {} is missing; run scripts/fixtures.sh to fetch it",
        path.display()
    );
    if std::env::var_os("CARAMBA_REQUIRE_FIXTURES").is_some() {
        panic!("{message} (CARAMBA_REQUIRE_FIXTURES is set)");
    }
    // Written to the process's stderr directly: `eprintln!` would be captured
    // and hidden for a passing test.
    let _ = writeln!(std::io::stderr(), "{message}");
    None
}

/// The SmolLM2-135M-Instruct Q4_1 GGUF file name in `.fixtures/`.
pub const SMOLLM2_GGUF: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// The King James Bible verses (`{"text": ...}` per line) in `.fixtures/`.
pub const KJV_JSONL: &str = "kjv.jsonl";
