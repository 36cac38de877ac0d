//! `caramba compile --emit kernels`: the generated GPU kernel source of a
//! preset, as the user gets it from the binary.
//!
//! WGSL is generated on a wgpu adapter (lavapipe, a CPU Vulkan driver, on a
//! machine without a GPU). With no adapter the WGSL tests print a loud
//! SKIPPED line, and fail when `CARAMBA_REQUIRE_GPU` is set. CUDA C++ (with
//! the `cuda` feature) is compiled offline for an H100 and needs no GPU;
//! on a machine with a CUDA device, one more test checks it against the
//! text the device's own client compiles. The whole output holds cubek's
//! matmul kernels (thousands of lines): each snapshot is the list of kernel
//! titles plus the full source of the rms_norm and attention kernels.

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

/// `caramba compile presets/dba.yml --emit kernels --target <target>`.
fn dba_kernels(target: &str) -> Output {
    caramba(&[
        "compile",
        "presets/dba.yml",
        "--emit",
        "kernels",
        "--target",
        target,
    ])
}

/// The WGSL of `presets/dba.yml`, or `None` (after a SKIPPED line) when
/// this machine has no wgpu adapter.
fn dba_wgsl() -> Option<String> {
    let o = dba_kernels("wgsl");
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

/// The snapshot of one `--emit kernels` output: the header, the title of
/// every kernel, then the first kernel of the rms_norm_matmul (the norm,
/// before the GEMM at the stand-in rows) and attention in full. Each
/// section must look like `marker` says a kernel of the target does.
fn digest(text: &str, marker: &str) -> String {
    let header = text.lines().next().unwrap_or_default();
    let kernels = sections(text);
    assert_eq!(
        header,
        format!("// {} distinct kernels", kernels.len()),
        "header counts the sections"
    );
    let mut titles: Vec<&str> = kernels.iter().map(|(t, _)| t.as_str()).collect();
    let mut seen = std::collections::HashSet::new();
    for (title, source) in &kernels {
        assert!(
            source.contains(marker),
            "{title}: no {marker:?} in:\n{source}"
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
    let rms = pick("rms_norm_matmul @");
    let attn = pick("attention @");
    titles.insert(0, header);
    format!("{}\n\n{rms}\n\n{attn}\n", titles.join("\n"))
}

#[test]
fn dba_wgsl_kernels() {
    let Some(text) = dba_wgsl() else { return };
    insta::assert_snapshot!("dba_wgsl", digest(&text, "@compute"));
}

/// Two runs print the same text (the WGSL compiler declares locals in hash
/// order; the output sorts them).
#[test]
fn dba_wgsl_is_deterministic() {
    let Some(a) = dba_wgsl() else { return };
    let Some(b) = dba_wgsl() else { return };
    assert!(a == b, "two runs of --emit kernels differ");
}

/// The CUDA C++ of `presets/dba.yml`: compiled offline for an H100, so it
/// needs no GPU and is the same on every machine.
#[cfg(feature = "cuda")]
fn dba_cuda() -> String {
    let o = dba_kernels("cuda");
    assert!(o.status.success(), "{}", show(&o));
    String::from_utf8(o.stdout).expect("utf-8 output")
}

#[cfg(feature = "cuda")]
#[test]
fn dba_cuda_kernels() {
    let text = dba_cuda();
    insta::assert_snapshot!("dba_cuda", digest(&text, "__global__"));
}

#[cfg(feature = "cuda")]
#[test]
fn dba_cuda_is_deterministic() {
    assert!(
        dba_cuda() == dba_cuda(),
        "two runs of --emit kernels differ"
    );
}

/// The offline CUDA runtime writes what a real H100's client compiles (on
/// another card, shape choices such as the shared-memory size may differ),
/// but for where each shared memory sits in the dynamic shared buffer:
/// cubecl-opt picks that in hash order, the offline runtime in id order, so
/// the offsets are masked. The device's text is captured in this process,
/// the offline text by the binary. Skipped loudly without a CUDA device.
#[cfg(feature = "cuda")]
#[test]
fn offline_cuda_source_matches_the_device() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/dba.yml");
    let src = std::fs::read_to_string(path).expect("presets/dba.yml");
    let compiled = caramba_compiler::compile(&src).expect("dba.yml compiles");
    let (graph, _) = caramba_compiler::optimize(&compiled.student.graph).expect("optimizes");
    let device = match caramba_runtime::gpu::source::kernel_sources_on_cuda_device(&graph) {
        Ok(k) => k,
        Err(e) if e.to_string().contains("no CUDA device") => {
            if std::env::var_os("CARAMBA_REQUIRE_GPU").is_some() {
                panic!("CARAMBA_REQUIRE_GPU is set but no CUDA device exists");
            }
            eprintln!(
                "\n*** SKIPPED: no CUDA device; the offline CUDA source was not compared \
                 with a device's (set CARAMBA_REQUIRE_GPU to make this fail) ***\n"
            );
            return;
        }
        Err(e) => panic!("CUDA device capture failed: {e}"),
    };
    let offline = sections(&dba_cuda());
    let mask = |source: &str| -> String {
        let mut out = String::new();
        let mut rest = source.trim_end();
        while let Some((head, tail)) = rest.split_once("dynamic_shared_mem[") {
            out.push_str(head);
            out.push_str("dynamic_shared_mem[_");
            rest = tail.trim_start_matches(|c: char| c.is_ascii_digit());
        }
        out + rest
    };
    for ((title, source), k) in offline.iter().zip(&device) {
        assert_eq!(title, &k.title, "kernel titles differ");
        assert_eq!(
            mask(source),
            mask(&k.source),
            "{title}: offline and device sources differ"
        );
    }
    assert_eq!(offline.len(), device.len(), "kernel counts differ");
}

/// Without the `cuda` feature, `--target cuda` says how to get it instead
/// of printing nothing.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_target_needs_the_cuda_feature() {
    let o = dba_kernels("cuda");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.contains("error: cannot generate kernel source")
            && stderr.contains("`cuda` feature"),
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
