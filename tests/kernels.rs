//! `caramba compile --emit kernels`: the generated GPU kernel source of a
//! preset, as the user gets it from the binary.
//!
//! WGSL is generated on a wgpu adapter (lavapipe, a CPU Vulkan driver, on a
//! machine without a GPU). With no adapter the WGSL tests print a loud
//! SKIPPED line, and fail when `CARAMBA_REQUIRE_GPU` is set. The whole
//! output holds cubek's matmul kernels (thousands of lines): the snapshot
//! is the list of kernel titles plus the full source of the rms_norm and
//! attention kernels.

use std::path::PathBuf;
use std::process::{Command, Output};

fn caramba(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caramba"))
        .args(args)
        .current_dir(PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("the caramba binary runs")
}

fn show(o: &Output) -> String {
    format!(
        "{:?}\n--- stdout (head)\n{}\n--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n"),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The WGSL of `presets/dba.yml`, or `None` (after a SKIPPED line) when
/// this machine has no wgpu adapter.
fn dba_wgsl() -> Option<String> {
    let o = caramba(&[
        "compile",
        "presets/dba.yml",
        "--emit",
        "kernels",
        "--target",
        "wgsl",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    if !o.status.success() && stderr.contains("no wgpu adapter") {
        if std::env::var_os("CARAMBA_REQUIRE_GPU").is_some() {
            panic!("CARAMBA_REQUIRE_GPU is set but no wgpu adapter exists:\n{stderr}");
        }
        eprintln!(
            "\n*** SKIPPED: no wgpu adapter; `--emit kernels --target wgsl` was not tested \
             (install mesa-vulkan-drivers; set CARAMBA_REQUIRE_GPU to make this fail) ***\n"
        );
        return None;
    }
    assert!(o.status.success(), "{}", show(&o));
    Some(String::from_utf8(o.stdout).expect("utf-8 output"))
}

/// `(title, source)` of each `// === kernel N: title` section.
fn sections(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("// === kernel ") {
            let title = rest.split_once(": ").map_or(rest, |(_, t)| t);
            out.push((title.to_string(), String::new()));
        } else if let Some((_, source)) = out.last_mut() {
            source.push_str(line);
            source.push('\n');
        }
    }
    out
}

#[test]
fn dba_wgsl_kernels() {
    let Some(text) = dba_wgsl() else { return };
    let header = text.lines().next().unwrap_or_default();
    let kernels = sections(&text);
    assert_eq!(
        header,
        format!("// {} distinct kernels", kernels.len()),
        "header counts the sections"
    );
    let mut titles: Vec<&str> = kernels.iter().map(|(t, _)| t.as_str()).collect();
    let mut seen = std::collections::HashSet::new();
    for (title, source) in &kernels {
        assert!(
            source.contains("@compute"),
            "{title}: not a WGSL compute shader"
        );
        assert!(seen.insert(source.clone()), "{title}: duplicate kernel");
    }
    let pick = |needle: &str| -> String {
        let (title, source) = kernels
            .iter()
            .find(|(t, _)| t.starts_with(needle))
            .unwrap_or_else(|| panic!("no kernel for {needle:?} in:\n{titles:#?}"));
        format!("// === {title}\n{}", source.trim_end())
    };
    let rms = pick("rms_norm @");
    let attn = pick("attention @");
    titles.insert(0, header);
    insta::assert_snapshot!(
        "dba_wgsl",
        format!("{}\n\n{rms}\n\n{attn}\n", titles.join("\n"))
    );
}

/// Two runs print the same text (the WGSL compiler declares locals in hash
/// order; the output sorts them).
#[test]
fn dba_wgsl_is_deterministic() {
    let Some(a) = dba_wgsl() else { return };
    let Some(b) = dba_wgsl() else { return };
    assert!(a == b, "two runs of --emit kernels differ");
}

/// Without the `cuda` feature (or a CUDA device), `--target cuda` says why
/// it cannot run offline instead of printing nothing.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_target_needs_a_device() {
    let o = caramba(&[
        "compile",
        "presets/dba.yml",
        "--emit",
        "kernels",
        "--target",
        "cuda",
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("error: cannot generate kernel source")
            && stderr.contains("cuda")
            && stderr.contains("offline"),
        "{}",
        show(&o)
    );
    assert!(o.stdout.is_empty(), "{}", show(&o));
}

#[test]
fn target_without_emit_kernels_is_a_usage_error() {
    for args in [
        &["compile", "presets/dba.yml", "--target", "wgsl"][..],
        &[
            "compile",
            "presets/dba.yml",
            "--emit",
            "ir",
            "--target",
            "cuda",
        ][..],
    ] {
        let o = caramba(args);
        assert_eq!(o.status.code(), Some(2), "{}", show(&o));
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(
            stderr.contains("--target only applies to `--emit kernels`"),
            "{}",
            show(&o)
        );
    }
}

#[test]
fn unknown_target_is_a_usage_error() {
    let o = caramba(&[
        "compile",
        "presets/dba.yml",
        "--emit",
        "kernels",
        "--target",
        "spirv",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
}
