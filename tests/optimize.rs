//! Golden tests for the optimize stage: the optimized IR of two presets and
//! the kernel plan of the smallest DBA model, snapshotted in
//! `tests/snapshots/`. The rules' proofs and the whole-model comparisons
//! against the reference interpreter live with the rules
//! (`compiler/src/optimize/tests.rs`).

use caramba_compiler::{compile, optimize, plan, Stage};

fn preset(name: &str) -> caramba_compiler::Compiled {
    let path = format!("{}/presets/{name}", env!("CARGO_MANIFEST_DIR"));
    let src = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    compile(&src).unwrap_or_else(|e| panic!("{path}: {e:?}"))
}

fn optimized_ir(name: &str) -> String {
    let c = preset(name);
    let (g, report) = optimize(&c.student.graph).expect("optimizes");
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    caramba_ir::verify(&g).expect("the optimized graph verifies");
    let mut s = caramba_ir::to_text(&g);
    s.push_str("\nfused nodes and the rules that formed them:\n");
    let num: std::collections::HashMap<_, _> = g
        .topo_order()
        .into_iter()
        .enumerate()
        .map(|(i, n)| (n, i))
        .collect();
    for f in &report.fused {
        s.push_str(&format!(
            "  %{} {} @ {}: {}\n",
            num[&f.node],
            f.op.mnemonic(),
            f.scope,
            f.rules.join(", ")
        ));
    }
    s
}

#[test]
fn dba_optimized_ir() {
    insta::assert_snapshot!("optimize.dba.ir", optimized_ir("dba.yml"));
}

#[test]
fn llama_block_optimized_ir() {
    insta::assert_snapshot!("optimize.llama_block.ir", optimized_ir("llama_block.yml"));
}

#[test]
fn dba_kernel_plan() {
    let c = preset("dba.yml");
    let (g, report) = optimize(&c.student.graph).unwrap();
    insta::assert_snapshot!(
        "optimize.dba.kernels",
        plan::render_kernels(&c.student.layers, &g, &report)
    );
}

#[test]
fn stages_parse_and_apply() {
    let c = preset("dba.yml");
    let lowered: Stage = "lowered".parse().unwrap();
    let optimized: Stage = "optimized".parse().unwrap();
    assert_eq!(
        caramba_ir::to_text(&lowered.apply(&c.student.graph).unwrap()),
        caramba_ir::to_text(&c.student.graph)
    );
    let g = optimized.apply(&c.student.graph).unwrap();
    assert!(g.node_count() < c.student.graph.node_count());
    assert_eq!(
        "fused".parse::<Stage>().unwrap_err(),
        "unknown stage \"fused\": expected one of lowered, optimized"
    );
}

#[test]
fn repeated_blocks_fold_in_the_kernel_plan() {
    let c = preset("llama32_1b_dba.yml");
    let (g, report) = optimize(&c.student.graph).unwrap();
    let text = plan::render_kernels(&c.student.layers, &g, &report);
    assert!(
        text.contains("  model.layers.*.self_attn ×16  (DBA attention"),
        "{text}"
    );
    assert_eq!(
        text.matches("attention {causal=true, scale=1.0}").count(),
        1,
        "{text}"
    );
    assert!(
        text.contains("← merge-dba-scores + fuse-attention"),
        "{text}"
    );
}
