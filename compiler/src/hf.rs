//! The model a Hugging Face Llama configuration describes, as a manifest
//! model: embedder, `n_layers` pre-norm blocks (GQA attention + SwiGLU) and a
//! final norm. Lowering it gives Hugging Face parameter names, so checkpoint
//! tensors bind by name.

use crate::manifest::*;

/// The numbers of a `LlamaForCausalLM` config.json that shape the model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaDims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScalingCfg>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
}

impl LlamaDims {
    /// The shapes the benchmarks run (random weights): `smollm2`
    /// (SmolLM2-135M), `llama1b` (Llama-3.2-1B, tied embeddings) and
    /// `tiny` (a smoke test for machines without a real GPU).
    pub fn benchmark_shape(name: &str) -> Option<LlamaDims> {
        let shape = |vocab, hidden, layers, heads, kv, inter, theta| LlamaDims {
            vocab_size: vocab,
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv,
            head_dim: hidden / heads,
            intermediate_size: inter,
            rope_theta: theta,
            rope_scaling: None,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
        };
        match name {
            "smollm2" => Some(shape(49152, 576, 30, 9, 3, 1536, 100000.0)),
            "llama1b" => Some(shape(128256, 2048, 16, 32, 8, 8192, 500000.0)),
            "tiny" => Some(shape(256, 64, 2, 4, 2, 128, 10000.0)),
            _ => None,
        }
    }
}

pub fn llama_model(d: &LlamaDims) -> ModelSpec {
    let layer = |kind| {
        Element::Layer(Layer {
            kind,
            loc: Loc::default(),
        })
    };
    let norm = || {
        layer(LayerKind::RmsNorm(NormCfg {
            d_model: d.hidden_size,
            eps: d.rms_norm_eps,
            bias: false,
        }))
    };
    let topo = |kind, layers| {
        Element::Topology(Topology {
            kind,
            layers,
            loc: Loc::default(),
        })
    };
    let attn = AttentionCfg {
        d_model: d.hidden_size,
        n_heads: d.num_attention_heads,
        n_kv_heads: Some(d.num_key_value_heads),
        mode: None,
        head_dim: Some(d.head_dim),
        sem_dim: None,
        geo_dim: None,
        rope_enabled: true,
        rope_theta: d.rope_theta,
        rope_scaling: d.rope_scaling.clone(),
        decoupled_gate: None,
        causal: true,
        dropout_p: 0.0,
        bias: false,
    };
    let block = vec![
        topo(
            TopologyKind::Residual,
            vec![norm(), layer(LayerKind::Attention(attn))],
        ),
        topo(
            TopologyKind::Residual,
            vec![
                norm(),
                layer(LayerKind::SwiGlu(SwiGluCfg {
                    d_model: d.hidden_size,
                    d_ff: d.intermediate_size,
                    bias: false,
                })),
            ],
        ),
    ];
    ModelSpec {
        embedder: Embedder {
            kind: "token".into(),
            vocab_size: d.vocab_size,
            d_model: d.hidden_size,
            tie_embeddings: d.tie_word_embeddings,
        },
        topology: Topology {
            kind: TopologyKind::Stacked,
            layers: vec![
                topo(
                    TopologyKind::Nested {
                        repeat: d.num_hidden_layers,
                    },
                    block,
                ),
                norm(),
            ],
            loc: Loc::default(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The benchmark shapes have the parameter counts the GPU runs printed
    /// (and Hugging Face gives for these configs with tied embeddings).
    #[test]
    fn benchmark_shapes_have_their_models_parameter_counts() {
        for (name, want) in [("smollm2", 134_515_008usize), ("llama1b", 1_235_814_400)] {
            let d = LlamaDims::benchmark_shape(name).expect("a benchmark shape");
            let lowered = crate::lower_model(&llama_model(&d), name, caramba_ir::DType::F32)
                .expect("the shape lowers");
            let g = &lowered.graph;
            let count: usize = g
                .params()
                .map(|(_, id)| g.node(id).ty.shape.numel().expect("constant shape"))
                .sum();
            assert_eq!(count, want, "{name}");
        }
        assert!(LlamaDims::benchmark_shape("gpt2").is_none());
    }
}
