//! Checking a checkpoint against the tensors a model graph expects, reporting
//! every missing tensor and shape mismatch at once.

use super::config::HfConfig;
use super::ValidationReport;

/// Compares `expected` (name, shape) pairs with what `lookup` finds.
/// `available` lists every tensor the checkpoint holds, for the unused list.
pub fn compare_shapes<I, S, D>(
    expected: I,
    available: &[String],
    lookup: impl Fn(&str) -> Option<Vec<usize>>,
) -> ValidationReport
where
    I: IntoIterator<Item = (S, D)>,
    S: AsRef<str>,
    D: AsRef<[usize]>,
{
    let mut report = ValidationReport::default();
    let mut wanted = std::collections::HashSet::new();
    for (name, shape) in expected {
        let (name, shape) = (name.as_ref(), shape.as_ref());
        wanted.insert(name.to_string());
        match lookup(name) {
            None => report.missing.push((name.to_string(), shape.to_vec())),
            Some(found) if found != shape => {
                report
                    .shape_mismatches
                    .push((name.to_string(), shape.to_vec(), found))
            }
            Some(_) => {}
        }
    }
    report.unused = available
        .iter()
        .filter(|n| !wanted.contains(n.as_str()))
        .cloned()
        .collect();
    report
}

/// The Hugging Face tensors of a LlamaForCausalLM with this config, with
/// their shapes, in layer order. `lm_head.weight` is listed only when the
/// embeddings are not tied.
pub fn llama_tensor_shapes(c: &HfConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, ff) = (c.hidden_size, c.head_dim, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![c.vocab_size, d],
    )];
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.extend([
            (format!("{p}.input_layernorm.weight"), vec![d]),
            (format!("{p}.self_attn.q_proj.weight"), vec![q, d]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kv, d]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kv, d]),
            (format!("{p}.self_attn.o_proj.weight"), vec![d, q]),
            (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            (format!("{p}.mlp.gate_proj.weight"), vec![ff, d]),
            (format!("{p}.mlp.up_proj.weight"), vec![ff, d]),
            (format!("{p}.mlp.down_proj.weight"), vec![d, ff]),
        ]);
    }
    out.push(("model.norm.weight".to_string(), vec![d]));
    if !c.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![c.vocab_size, d]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_problem_at_once() {
        let available = vec!["a".to_string(), "b".to_string(), "extra".to_string()];
        let lookup = |n: &str| match n {
            "a" => Some(vec![2, 3]),
            "b" => Some(vec![4]),
            "extra" => Some(vec![1]),
            _ => None,
        };
        let expected = [
            ("a", vec![2, 3]),
            ("b", vec![5]),
            ("c", vec![7, 7]),
            ("d", vec![1]),
        ];
        let report = compare_shapes(expected, &available, lookup);
        assert!(!report.is_ok());
        assert_eq!(
            report.missing,
            vec![("c".to_string(), vec![7, 7]), ("d".to_string(), vec![1])]
        );
        assert_eq!(
            report.shape_mismatches,
            vec![("b".to_string(), vec![5], vec![4])]
        );
        assert_eq!(report.unused, vec!["extra".to_string()]);
        assert_eq!(
            report.to_string(),
            "  missing tensor `c` (expected shape [7, 7])\n\
             \x20 missing tensor `d` (expected shape [1])\n\
             \x20 tensor `b`: expected shape [5], found [4]\n\
             \x20 (1 tensor(s) in the checkpoint are not used by the model)\n"
        );
    }
}
