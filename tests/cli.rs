//! The `caramba` binary as a user meets it: exit codes (0 ok, 2 for the
//! user's input, non-zero for what is not implemented yet), errors on stderr
//! only, and never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the binary from the repo root, so relative paths read as in the docs.
fn caramba(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caramba"))
        .args(args)
        .current_dir(repo())
        .output()
        .expect("the caramba binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Fails with everything the command printed.
fn show(what: &str, o: &Output) -> String {
    format!(
        "{what}: {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status,
        stdout(o),
        stderr(o)
    )
}

fn assert_no_panic(what: &str, o: &Output) {
    assert!(
        !stdout(o).contains("panicked") && !stderr(o).contains("panicked"),
        "{}",
        show(what, o)
    );
}

fn presets() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo().join("presets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yml"))
        .map(|p| format!("presets/{}", p.file_name().unwrap().to_string_lossy()))
        .collect();
    v.sort();
    assert!(!v.is_empty());
    v
}

#[test]
fn bad_manifests_exit_2_with_the_diagnostic_on_stderr() {
    for (file, message) in [
        (
            "tests/data/manifests/err/unknown_layer_field.yml",
            "error: unknown field `n_head`",
        ),
        (
            "tests/data/manifests/err/yaml_tab.yml",
            "error: YAML syntax error",
        ),
        (
            "tests/data/manifests/err/width_mismatch.yml",
            "receives width 128 from the layer before it",
        ),
        (
            "tests/data/manifests/err/several_parse_errors.yml",
            "5 errors in tests/data/manifests/err/several_parse_errors.yml",
        ),
        (
            "tests/data/manifests/err/empty_file.yml",
            "error: the manifest is empty",
        ),
    ] {
        for args in [
            vec!["compile", file],
            vec!["compile", file, "--emit", "ir"],
            vec!["run", file],
        ] {
            let o = caramba(&args);
            let what = args.join(" ");
            assert_eq!(o.status.code(), Some(2), "{}", show(&what, &o));
            assert!(stderr(&o).contains(message), "{}", show(&what, &o));
            assert!(
                stderr(&o).contains(&format!("--> {file}")),
                "the error names the file: {}",
                show(&what, &o)
            );
            assert!(o.stdout.is_empty(), "{}", show(&what, &o));
            assert_no_panic(&what, &o);
        }
    }
}

#[test]
fn every_preset_emits_ir_and_a_plan() {
    for p in presets() {
        let o = caramba(&["compile", &p, "--emit", "ir"]);
        assert_eq!(o.status.code(), Some(0), "{}", show(&p, &o));
        assert!(stdout(&o).starts_with("graph "), "{}", show(&p, &o));
        assert_no_panic(&p, &o);

        let o = caramba(&["compile", &p, "--print-plan"]);
        assert_eq!(o.status.code(), Some(0), "{}", show(&p, &o));
        assert!(stdout(&o).starts_with("manifest "), "{}", show(&p, &o));
        assert!(stdout(&o).contains("model student"), "{}", show(&p, &o));
        if p.ends_with("llama32_1b_dba.yml") {
            // Its 16 identical layers are optimized once (`reuse-layers`).
            assert!(
                stdout(&o).contains("16 layers optimized as one (reuse-layers"),
                "{}",
                show(&p, &o)
            );
        }
        assert_no_panic(&p, &o);

        let o = caramba(&["compile", &p]);
        assert_eq!(o.status.code(), Some(0), "{}", show(&p, &o));
        assert!(stdout(&o).starts_with("ok: "), "{}", show(&p, &o));
    }
}

/// The upcycle presets need distillation, which this version does not
/// execute: `run` refuses them before running anything, listing why.
#[test]
fn run_says_execution_is_not_implemented() {
    let o = caramba(&["run", "presets/llama32_1b_dba.yml", "--group", "quick"]);
    assert!(!o.status.success(), "{}", show("run", &o));
    assert_ne!(
        o.status.code(),
        Some(2),
        "the manifest is fine; exit 2 means bad input: {}",
        show("run", &o)
    );
    assert!(
        stderr(&o).contains("not implemented"),
        "{}",
        show("run", &o)
    );
    assert!(
        stdout(&o).contains("model student"),
        "run prints the plan it would execute: {}",
        show("run", &o)
    );
    assert_no_panic("run", &o);
}

#[test]
fn legacy_train_flags_behave_like_run() {
    let run = caramba(&["run", "presets/llama32_1b_dba.yml"]);
    let legacy = caramba(&[
        "--manifest",
        "presets/llama32_1b_dba.yml",
        "--mode",
        "train",
    ]);
    assert_eq!(
        legacy.status.code(),
        run.status.code(),
        "{}",
        show("legacy", &legacy)
    );
    assert_eq!(stdout(&legacy), stdout(&run));
    assert_eq!(stderr(&legacy), stderr(&run));
    // Train is the legacy default mode.
    let default = caramba(&["--manifest", "presets/llama32_1b_dba.yml"]);
    assert_eq!(
        default.status.code(),
        run.status.code(),
        "{}",
        show("legacy default", &default)
    );
    // A bad manifest through the legacy flags is still bad input.
    let bad = caramba(&[
        "--manifest",
        "tests/data/manifests/err/lr_zero.yml",
        "--mode",
        "train",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", show("legacy bad", &bad));
    assert!(
        stderr(&bad).contains("`lr` must be positive"),
        "{}",
        show("legacy bad", &bad)
    );
    assert_no_panic("legacy bad", &bad);
}

#[test]
fn legacy_sample_needs_a_checkpoint() {
    let o = caramba(&["--manifest", "presets/tiny.yml", "--mode", "sample"]);
    assert_eq!(o.status.code(), Some(2), "{}", show("sample", &o));
    assert!(stderr(&o).contains("--ckpt"), "{}", show("sample", &o));
    assert!(o.stdout.is_empty(), "{}", show("sample", &o));
    assert_no_panic("sample", &o);
}

#[test]
fn a_missing_manifest_is_bad_input() {
    for args in [
        vec!["compile", "presets/no_such.yml"],
        vec!["run", "presets/no_such.yml"],
        vec!["--manifest", "presets/no_such.yml"],
    ] {
        let o = caramba(&args);
        let what = args.join(" ");
        assert_eq!(o.status.code(), Some(2), "{}", show(&what, &o));
        assert!(
            stderr(&o).contains("cannot read manifest presets/no_such.yml"),
            "{}",
            show(&what, &o)
        );
        assert!(o.stdout.is_empty(), "{}", show(&what, &o));
        assert_no_panic(&what, &o);
    }
}

/// The subcommands `caramba --help` lists.
fn subcommands() -> Vec<String> {
    let o = caramba(&["--help"]);
    assert_eq!(o.status.code(), Some(0), "{}", show("--help", &o));
    let out = stdout(&o);
    let section = out
        .split("Commands:")
        .nth(1)
        .expect("--help lists the commands");
    section
        .lines()
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

#[test]
fn every_subcommand_has_help() {
    let cmds = subcommands();
    for must in ["compile", "run"] {
        assert!(
            cmds.iter().any(|c| c == must),
            "--help does not list `{must}`: {cmds:?}"
        );
    }
    for c in &cmds {
        let o = caramba(&[c, "--help"]);
        assert_eq!(o.status.code(), Some(0), "{}", show(c, &o));
        assert!(stdout(&o).contains("Usage:"), "{}", show(c, &o));
        assert!(o.stderr.is_empty(), "{}", show(c, &o));
    }
}

#[test]
fn the_manifest_path_in_errors_is_as_given() {
    // An absolute path is echoed as is, so a user can click it.
    let abs = repo().join("tests/data/manifests/err/lr_zero.yml");
    let o = caramba(&["compile", abs.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", show("abs", &o));
    let want = format!("--> {}:", Path::new(&abs).display());
    assert!(stderr(&o).contains(&want), "{}", show("abs", &o));
}

/// `perplexity` on a device whose largest buffer cannot hold a window's
/// logits (lavapipe: 128 MiB; SmolLM2's 1024 × 49,152 f32 logits take 192
/// MiB) is refused before the run with the largest `--block-size` that
/// fits, not a failed allocation half-way (which used to abort).
#[test]
fn perplexity_too_wide_for_the_device_is_bad_input() {
    use caramba_runtime::backend::Backend;
    use caramba_runtime::checkpoint::testing::{fixture_path, SMOLLM2_GGUF};
    let Some(gguf) = fixture_path(SMOLLM2_GGUF) else {
        return;
    };
    let vocab_bytes = 49_152 * 4;
    let Some(max) = Backend::Wgpu.max_buffer_bytes() else {
        eprintln!("*** SKIPPED: no wgpu adapter ***");
        return;
    };
    if max > 1 << 30 {
        eprintln!("*** SKIPPED: this wgpu device's buffers hold any window here ***");
        return;
    }
    let block = max / vocab_bytes + 1;
    // About 12 tokens a sentence: more than a window's worth.
    let text = "In the beginning God created the heaven and the earth. ";
    let corpus = std::env::temp_dir().join("caramba_cli_ppl.txt");
    std::fs::write(&corpus, text.repeat(1 + block as usize / 8)).unwrap();
    let block = block.to_string();
    let o = caramba(&[
        "perplexity",
        "--ckpt",
        gguf.to_str().unwrap(),
        "--text",
        corpus.to_str().unwrap(),
        "--block-size",
        &block,
        "--device",
        "wgpu",
    ]);
    assert_no_panic("perplexity", &o);
    assert_eq!(o.status.code(), Some(2), "{}", show("perplexity", &o));
    let fits = (max / vocab_bytes).to_string();
    assert!(
        stderr(&o).contains(&format!("--block-size {fits} or less")),
        "{}",
        show("perplexity", &o)
    );
}

#[test]
fn prefill_chunk_is_checked_before_the_checkpoint_opens() {
    for (args, says) in [
        (
            &["--prefill-chunk", "0"][..],
            "--prefill-chunk must be at least 1",
        ),
        (
            &["--prefill-chunk", "8", "--kv-cache", "none"][..],
            "--prefill-chunk needs a KV cache",
        ),
    ] {
        let mut all = vec!["sample", "--ckpt", "missing.gguf", "--prompt", "hi"];
        all.extend_from_slice(args);
        let o = caramba(&all);
        assert_eq!(o.status.code(), Some(2), "{}", show("sample", &o));
        assert!(stderr(&o).contains(says), "{}", show("sample", &o));
        assert_no_panic("sample", &o);
    }
}
