//! Whole-model gradient checks: a tiny Llama (GQA) and a tiny DBA model
//! (gated, RoPE on the geometric path), lowered in f64, next-token loss,
//! every parameter's gradient sampled against central finite differences.

use caramba_ir::autodiff::{add_next_token_loss, differentiate, grad_name};
use caramba_ir::reference::{eval, Bindings, Tensor};
use caramba_ir::{DType, Sym};
use std::collections::BTreeMap;

const MODEL: &str = r#"
version: 1
name: tiny_grad
model:
  embedder: {type: token, vocab_size: 11, d_model: 8, tie_embeddings: TIE}
  topology:
    type: StackedTopology
    layers:
      - type: NestedTopology
        repeat: 2
        layers:
          - type: ResidualTopology
            layers:
              - {type: RMSNormLayer, d_model: 8}
              - ATTENTION
          - type: ResidualTopology
            layers:
              - {type: RMSNormLayer, d_model: 8}
              - {type: SwiGLULayer, d_model: 8, d_ff: 12}
      - {type: RMSNormLayer, d_model: 8}
"#;

fn check(attention: &str, tie: bool) {
    check_src(
        &MODEL
            .replace("ATTENTION", attention)
            .replace("TIE", if tie { "true" } else { "false" }),
    );
}

fn check_src(src: &str) {
    let src = src.to_string();
    let c =
        caramba_compiler::compile(&src).unwrap_or_else(|d| panic!("{}", d.render("tiny", &src)));
    let mut g = caramba_compiler::lower_model(&c.manifest.model, "tiny", DType::F64)
        .unwrap()
        .graph;
    add_next_token_loss(&mut g, "logits").unwrap();
    let names: Vec<String> = g.params().map(|(n, _)| n.to_string()).collect();
    // Both ways of differentiating attention: as primitives, and fused
    // first (as training does) so that its rule emits the flash backward.
    let fused = caramba_compiler::fuse_for_training(&g).unwrap();
    assert!(fused
        .node_ids()
        .any(|n| matches!(fused.node(n).op, caramba_ir::Op::Attention { .. })));
    for forward in [&g, &fused] {
        check_graph(&g, forward, &names);
    }
}

/// `g`'s loss against finite differences, for the gradients of `forward`
/// (`g` or an equivalent graph) differentiated.
fn check_graph(g: &caramba_ir::Graph, forward: &caramba_ir::Graph, names: &[String]) {
    // As training does: the backward's log-sum-exp taken from the forward
    // attention (nothing to do when attention was differentiated as
    // primitives).
    let dg = differentiate(forward, "loss", names).unwrap();
    let dg = caramba_compiler::reuse_attention_lse(&dg).unwrap();
    caramba_ir::verify(&dg).unwrap();
    let count = |g: &caramba_ir::Graph, mnemonic: &str| {
        g.node_ids()
            .filter(|&n| g.node(n).op.mnemonic() == mnemonic)
            .count()
    };
    assert_eq!(
        count(&dg, "attention_with_lse"),
        count(forward, "attention")
    );
    assert_eq!(count(&dg, "attention_lse"), 0);

    let mut seed = 12345u64;
    let mut rand = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let mut values: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, id) in g.params() {
        let shape: Vec<usize> = g
            .node(id)
            .ty
            .shape
            .dims()
            .iter()
            .map(|d| d.as_const().unwrap())
            .collect();
        let n: usize = shape.iter().product();
        let scale = if name.ends_with("layernorm.weight") || name.ends_with("norm.weight") {
            0.0
        } else {
            0.5
        };
        values.insert(
            name.to_string(),
            Tensor::f64(
                shape,
                (0..n)
                    .map(|_| 1.0 * (scale == 0.0) as u8 as f64 + scale * rand())
                    .collect(),
            ),
        );
    }
    let (b, t) = (2usize, 5usize);
    let ids: Vec<i32> = (0..b * t).map(|i| ((i * 7 + 3) % 11) as i32).collect();
    let targets: Vec<i32> = (0..b * t).map(|i| ((i * 5 + 1) % 11) as i32).collect();
    let run = |graph: &caramba_ir::Graph, values: &BTreeMap<String, Tensor>| {
        let bind = Bindings::new(values)
            .sym(Sym::B, b)
            .sym(Sym::T, t)
            .input("input_ids", Tensor::i32(vec![b, t], ids.clone()))
            .input("positions", Tensor::i32(vec![t], (0..t as i32).collect()))
            .input("targets", Tensor::i32(vec![b, t], targets.clone()));
        eval(graph, &bind).unwrap()
    };
    let analytic = run(&dg, &values);
    let eps = 1e-6;
    let mut checked = 0;
    for name in names {
        let grad = analytic[&grad_name(name)].to_f64_vec();
        let base = values[name].clone();
        let n = base.numel();
        for k in [0, n / 2, n - 1] {
            let mut at = |delta: f64| {
                let mut v = base.to_f64_vec();
                v[k] += delta;
                values.insert(name.clone(), Tensor::f64(base.shape().to_vec(), v));
                run(g, &values)["loss"].to_f64_vec()[0]
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
            values.insert(name.clone(), base.clone());
            let err = (numeric - grad[k]).abs();
            assert!(
                err <= 1e-6 * (1.0 + numeric.abs()),
                "{name}[{k}]: analytic {} vs numeric {numeric}",
                grad[k]
            );
            checked += 1;
        }
    }
    assert!(checked >= 3 * names.len());
}

#[test]
fn tiny_llama_gradients_match_finite_differences() {
    check(
        "{type: AttentionLayer, d_model: 8, n_heads: 2, n_kv_heads: 1}",
        true,
    );
}

#[test]
fn tiny_dba_gradients_match_finite_differences() {
    check(
        "{type: AttentionLayer, d_model: 8, n_heads: 2, n_kv_heads: 1, mode: decoupled, sem_dim: 4, geo_dim: 4, decoupled_gate: true}",
        false,
    );
}

/// The other layer types and topologies: LayerNorm, Linear, RoPE, Dropout,
/// standard attention without RoPE, parallel (sum), branching, cyclic and
/// recurrent topologies.
#[test]
fn every_layer_and_topology_gradient_matches_finite_differences() {
    check_src(
        r#"
version: 1
name: layers_grad
model:
  embedder: {type: token, vocab_size: 11, d_model: 8}
  topology:
    type: StackedTopology
    layers:
      - {type: LayerNormLayer, d_model: 8}
      - {type: RoPE, d_model: 8, n_heads: 2}
      - type: ParallelTopology
        combine: sum
        layers:
          - {type: LinearLayer, d_in: 8, d_out: 8, bias: true}
          - {type: AttentionLayer, d_model: 8, n_heads: 2, rope_enabled: false}
      - type: BranchingTopology
        layers:
          - {type: LinearLayer, d_in: 8, d_out: 4}
          - {type: LinearLayer, d_in: 8, d_out: 4}
      - type: CyclicTopology
        iterations: 2
        layers:
          - {type: DropoutLayer, p: 0.0}
          - {type: LinearLayer, d_in: 8, d_out: 8}
      - type: RecurrentTopology
        steps: 2
        layers:
          - {type: RMSNormLayer, d_model: 8}
          - {type: SwiGLULayer, d_model: 8, d_ff: 6}
      - {type: RMSNormLayer, d_model: 8}
"#,
    );
}
