//! `caramba compile --emit kernels`: the generated GPU kernel source of a
//! preset, as the user gets it from the binary.
//!
//! Both targets compile offline, for a device described by constants:
//! WGSL for Mesa's lavapipe, CUDA C++ (with the `cuda` feature) for an
//! H100. Neither needs a GPU, and the text is the same on every machine.
//! Where the described device is present, one more test each checks the
//! offline text against what the device's own client compiles. The whole output holds cubek's
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

/// The WGSL of `presets/dba.yml`: compiled offline for lavapipe, so it
/// needs no adapter and is the same on every machine.
fn dba_wgsl() -> String {
    let o = dba_kernels("wgsl");
    assert!(o.status.success(), "{}", show(&o));
    String::from_utf8(o.stdout).expect("utf-8 output")
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
            .find(|(t, _)| t.contains(needle))
            .unwrap_or_else(|| panic!("no kernel for {needle:?} in:\n{titles:#?}"));
        format!("// === {title}\n{}", source.trim_end())
    };
    let rms = pick("RmsNormVecKernel");
    let rope = pick("RopeInPlaceKernel");
    let attn = pick("attention @");
    titles.insert(0, header);
    format!("{}\n\n{rms}\n\n{rope}\n\n{attn}\n", titles.join("\n"))
}

#[test]
fn dba_wgsl_kernels() {
    let text = dba_wgsl();
    insta::assert_snapshot!("dba_wgsl", digest(&text, "@compute"));
}

/// Two runs print the same text (the WGSL compiler declares locals in hash
/// order; the output sorts them).
#[test]
fn dba_wgsl_is_deterministic() {
    assert!(
        dba_wgsl() == dba_wgsl(),
        "two runs of --emit kernels differ"
    );
}

/// `presets/dba.yml` compiled and optimized, as `compile --emit kernels`
/// does.
fn dba_graph() -> caramba_ir::Graph {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("presets/dba.yml");
    let src = std::fs::read_to_string(path).expect("presets/dba.yml");
    let compiled = caramba_compiler::compile(&src).expect("dba.yml compiles");
    caramba_compiler::optimize(&compiled.student.graph)
        .expect("optimizes")
        .0
}

/// Skips a comparison with a live device loudly, or fails it where
/// `CARAMBA_REQUIRE_GPU` is set.
fn skip_live(why: &str) {
    if std::env::var_os("CARAMBA_REQUIRE_GPU").is_some() {
        panic!("CARAMBA_REQUIRE_GPU is set but {why}");
    }
    eprintln!(
        "\n*** SKIPPED: {why}; the offline source was not compared with a device's \
         (set CARAMBA_REQUIRE_GPU to make this fail) ***\n"
    );
}

/// The offline WGSL runtime describes lavapipe as cubecl-wgpu reads it:
/// the same device properties, and so the same text, as a live client on
/// the machine's lavapipe. Skipped loudly without one, or where this
/// machine's lavapipe is another (llvmpipe's subgroup size follows the
/// CPU's vector width).
#[test]
fn offline_wgsl_source_matches_lavapipe() {
    let (live, properties) =
        match caramba_runtime::gpu::source::kernel_sources_on_wgpu_adapter(&dba_graph()) {
            Ok(k) => k,
            Err(e) if e.to_string().contains("no CPU wgpu adapter") => {
                return skip_live("no CPU wgpu adapter (lavapipe)");
            }
            Err(e) => panic!("wgpu capture failed: {e}"),
        };
    let described = caramba_runtime::gpu::source::offline::wgsl::lavapipe();
    if properties.hardware.plane_size_max != described.hardware.plane_size_max {
        return skip_live(&format!(
            "this lavapipe's subgroups have {} lanes, the described one's {}",
            properties.hardware.plane_size_max, described.hardware.plane_size_max
        ));
    }
    assert_eq!(
        properties, described,
        "the live lavapipe's properties (left) are not those described"
    );
    let offline = sections(&dba_wgsl());
    for ((title, source), k) in offline.iter().zip(&live) {
        assert_eq!(title, &k.title, "kernel titles differ");
        assert_eq!(
            source.trim_end(),
            k.source.trim_end(),
            "{title}: offline and lavapipe sources differ"
        );
    }
    assert_eq!(offline.len(), live.len(), "kernel counts differ");
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
    let device = match caramba_runtime::gpu::source::kernel_sources_on_cuda_device(&dba_graph()) {
        Ok(k) => k,
        Err(e) if e.to_string().contains("no CUDA device") => {
            return skip_live("no CUDA device exists");
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
