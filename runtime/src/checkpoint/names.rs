//! llama.cpp ↔ Hugging Face Llama tensor names, and undoing the row
//! permutation llama.cpp's converter applies to the Q and K projections.

/// Per-layer suffixes: (GGUF `blk.N.<a>`, Hugging Face `model.layers.N.<b>`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_q.weight", "self_attn.q_proj.weight"),
    ("attn_k.weight", "self_attn.k_proj.weight"),
    ("attn_v.weight", "self_attn.v_proj.weight"),
    ("attn_output.weight", "self_attn.o_proj.weight"),
    ("attn_norm.weight", "input_layernorm.weight"),
    ("ffn_norm.weight", "post_attention_layernorm.weight"),
    ("ffn_gate.weight", "mlp.gate_proj.weight"),
    ("ffn_up.weight", "mlp.up_proj.weight"),
    ("ffn_down.weight", "mlp.down_proj.weight"),
];

/// Whole-model tensors: (GGUF, Hugging Face).
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// The Hugging Face name of a llama.cpp tensor, or `None` when it has no
/// Hugging Face counterpart (e.g. `rope_freqs.weight`).
pub fn gguf_to_hf_name(gguf: &str) -> Option<String> {
    if let Some((_, hf)) = GLOBAL_NAMES.iter().find(|(g, _)| *g == gguf) {
        return Some((*hf).to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (_, hf) = LAYER_NAMES.iter().find(|(g, _)| *g == suffix)?;
    Some(format!("model.layers.{layer}.{hf}"))
}

/// The llama.cpp name of a Hugging Face tensor, the inverse of
/// [`gguf_to_hf_name`].
pub fn hf_to_gguf_name(hf: &str) -> Option<String> {
    if let Some((g, _)) = GLOBAL_NAMES.iter().find(|(_, h)| *h == hf) {
        return Some((*g).to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, suffix) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (g, _) = LAYER_NAMES.iter().find(|(_, h)| *h == suffix)?;
    Some(format!("blk.{layer}.{g}"))
}

/// Which llama.cpp permutation, if any, a Hugging Face tensor carries in GGUF.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Permuted {
    /// `q_proj`: permuted with the number of query heads.
    Query,
    /// `k_proj`: permuted with the number of key/value heads.
    Key,
}

pub(crate) fn permutation_of(hf: &str) -> Option<Permuted> {
    if hf.ends_with(".self_attn.q_proj.weight") {
        Some(Permuted::Query)
    } else if hf.ends_with(".self_attn.k_proj.weight") {
        Some(Permuted::Key)
    } else {
        None
    }
}

/// Undoes llama.cpp's Q/K row permutation in place.
///
/// `convert_hf_to_gguf.py` stores `w.reshape(n_head, 2, half, cols)
/// .swapaxes(1, 2).reshape(rows, cols)` with `half = rows / n_head / 2`, so
/// GGUF row `h*2*half + i*2 + j` holds Hugging Face row `h*2*half + j*half + i`.
/// `w` is row-major `(rows, cols)`; the caller has checked that `rows` is a
/// multiple of `2 * n_head`.
pub fn unpermute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert_eq!(
        w.len(),
        rows * cols,
        "unpermute_rows: buffer is not rows * cols"
    );
    assert!(
        n_head > 0 && rows % (2 * n_head) == 0,
        "unpermute_rows: {rows} rows do not split into {n_head} heads of two halves"
    );
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()]; // (rows, cols)
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = h * 2 * half + i * 2 + j;
                let dst = h * 2 * half + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// llama.cpp's permutation itself, for tests and for a future HF → GGUF writer.
pub fn permute_rows(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    assert_eq!(
        w.len(),
        rows * cols,
        "permute_rows: buffer is not rows * cols"
    );
    assert!(n_head > 0 && rows % (2 * n_head) == 0);
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let dst = h * 2 * half + i * 2 + j;
                let src = h * 2 * half + j * half + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways() {
        let pairs = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            ),
            (
                "blk.3.attn_k.weight",
                "model.layers.3.self_attn.k_proj.weight",
            ),
            (
                "blk.12.attn_v.weight",
                "model.layers.12.self_attn.v_proj.weight",
            ),
            (
                "blk.29.attn_output.weight",
                "model.layers.29.self_attn.o_proj.weight",
            ),
            (
                "blk.1.attn_norm.weight",
                "model.layers.1.input_layernorm.weight",
            ),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            (
                "blk.2.ffn_gate.weight",
                "model.layers.2.mlp.gate_proj.weight",
            ),
            ("blk.2.ffn_up.weight", "model.layers.2.mlp.up_proj.weight"),
            (
                "blk.2.ffn_down.weight",
                "model.layers.2.mlp.down_proj.weight",
            ),
        ];
        for (g, h) in pairs {
            assert_eq!(gguf_to_hf_name(g).as_deref(), Some(h), "{g}");
            assert_eq!(hf_to_gguf_name(h).as_deref(), Some(g), "{h}");
        }
        for unmapped in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.0.attn_q.bias",
        ] {
            assert_eq!(gguf_to_hf_name(unmapped), None, "{unmapped}");
        }
        assert_eq!(
            hf_to_gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq"),
            None
        );
    }

    /// The permutation written as numpy would: out[h, i, j, :] = w[h, j, i, :]
    /// for `w.reshape(n_head, 2, half, cols)`.
    fn numpy_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let half = rows / n_head / 2;
        let mut out = Vec::with_capacity(w.len());
        for h in 0..n_head {
            for i in 0..half {
                for j in 0..2 {
                    let src_row = (h * 2 + j) * half + i;
                    out.extend_from_slice(&w[src_row * cols..(src_row + 1) * cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        for (n_head, head_dim, cols) in [(1, 2, 1), (3, 4, 5), (9, 64, 3), (2, 8, 1)] {
            let rows = n_head * head_dim;
            let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let permuted = numpy_permute(&w, rows, cols, n_head);
            assert_eq!(permute_rows(&w, rows, cols, n_head), permuted);
            assert_eq!(unpermute_rows(&permuted, rows, cols, n_head), w);
        }
    }

    #[test]
    fn unpermute_small_case_by_hand() {
        // One head of dim 4, one column: HF rows [a0 a1 b0 b1] (the two rotary
        // halves) are stored interleaved as [a0 b0 a1 b1].
        let gguf = [10.0, 20.0, 11.0, 21.0];
        assert_eq!(unpermute_rows(&gguf, 4, 1, 1), vec![10.0, 11.0, 20.0, 21.0]);
    }
}
