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
