//! `HfConfig`: the subset of a Hugging Face `config.json` (LlamaForCausalLM)
//! that caramba reads, with Hugging Face's defaults filled in at parse time.
//!
//! Unlike caramba's own configuration structs this one ignores unknown fields:
//! Hugging Face configs carry dozens of keys (generation settings,
//! `transformers_version`, ...) that do not change the weights' meaning.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::CheckpointError;

/// A Llama-family model's hyperparameters, as in Hugging Face `config.json`.
///
/// Optional keys are resolved when parsing: `num_key_value_heads` defaults to
/// `num_attention_heads`, `head_dim` to `hidden_size / num_attention_heads`,
/// `rope_theta` to 10000 and `tie_word_embeddings` to false.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawHfConfig")]
pub struct HfConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub architectures: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    pub vocab_size: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    pub max_position_embeddings: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub torch_dtype: Option<String>,
}

/// `eos_token_id` is either one id or a list of ids (Llama 3 Instruct).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// All ids, in order.
    pub fn ids(&self) -> Vec<u32> {
        match self {
            TokenIds::One(id) => vec![*id],
            TokenIds::Many(ids) => ids.clone(),
        }
    }
}

/// The RoPE frequency scalings caramba implements.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRopeScaling", into = "RawRopeScaling")]
pub enum RopeScaling {
    /// Llama 3.1's piecewise scaling of the inverse frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor`.
    Linear { factor: f64 },
}

impl HfConfig {
    /// Parses a `config.json` file.
    pub fn from_file(path: &Path) -> Result<Self, CheckpointError> {
        let text = std::fs::read_to_string(path).map_err(|e| CheckpointError::io(path, e))?;
        Self::from_json(&text).map_err(|message| CheckpointError::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses `config.json` text; the error is a human-readable message.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| e.to_string())
    }

    /// Pretty JSON, readable by Hugging Face transformers.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).expect("HfConfig always serializes")
    }

    /// Checks the relations between sizes that the rest of caramba relies on.
    pub fn check(&self) -> Result<(), String> {
        let nonzero = [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("vocab_size", self.vocab_size),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(format!("{name} must be positive, found 0"));
            }
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return Err(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        Ok(())
    }
}

/// The JSON as written, before defaults are applied.
#[derive(Deserialize)]
struct RawHfConfig {
    #[serde(default)]
    architectures: Vec<String>,
    #[serde(default)]
    model_type: Option<String>,
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    #[serde(default)]
    num_key_value_heads: Option<usize>,
    #[serde(default)]
    head_dim: Option<usize>,
    intermediate_size: usize,
    #[serde(default)]
    hidden_act: Option<String>,
    #[serde(default)]
    rope_theta: Option<f64>,
    #[serde(default)]
    rope_scaling: Option<RopeScaling>,
    rms_norm_eps: f64,
    #[serde(default)]
    tie_word_embeddings: Option<bool>,
    vocab_size: usize,
    #[serde(default)]
    bos_token_id: Option<u32>,
    #[serde(default)]
    eos_token_id: Option<TokenIds>,
    max_position_embeddings: usize,
    #[serde(default)]
    torch_dtype: Option<String>,
}

impl TryFrom<RawHfConfig> for HfConfig {
    type Error = String;

    fn try_from(raw: RawHfConfig) -> Result<Self, String> {
        if raw.num_attention_heads == 0 {
            return Err("num_attention_heads must be positive, found 0".into());
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size % raw.num_attention_heads == 0 => {
                raw.hidden_size / raw.num_attention_heads
            }
            None => {
                return Err(format!(
                    "no head_dim given and hidden_size ({}) is not a multiple of \
                     num_attention_heads ({})",
                    raw.hidden_size, raw.num_attention_heads
                ))
            }
        };
        let config = HfConfig {
            architectures: raw.architectures,
            model_type: raw.model_type,
            hidden_size: raw.hidden_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(raw.num_attention_heads),
            head_dim,
            intermediate_size: raw.intermediate_size,
            hidden_act: raw.hidden_act,
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            rope_scaling: raw.rope_scaling,
            rms_norm_eps: raw.rms_norm_eps,
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            vocab_size: raw.vocab_size,
            bos_token_id: raw.bos_token_id,
            eos_token_id: raw.eos_token_id,
            max_position_embeddings: raw.max_position_embeddings,
            torch_dtype: raw.torch_dtype,
        };
        config.check()?;
        Ok(config)
    }
}

/// `rope_scaling` as written. Older configs name the kind `type`, newer ones
/// `rope_type`.
#[derive(Serialize, Deserialize)]
struct RawRopeScaling {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rope_type: Option<String>,
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    original_max_position_embeddings: Option<usize>,
}

impl TryFrom<RawRopeScaling> for RopeScaling {
    type Error = String;

    fn try_from(raw: RawRopeScaling) -> Result<Self, String> {
        let kind = raw
            .rope_type
            .or(raw.kind)
            .ok_or("rope_scaling has neither `rope_type` nor `type`")?;
        let need = |name: &str, v: Option<f64>| {
            v.ok_or_else(|| format!("rope_scaling of type `{kind}` needs `{name}`"))
        };
        match kind.as_str() {
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: need("factor", raw.factor)?,
                low_freq_factor: need("low_freq_factor", raw.low_freq_factor)?,
                high_freq_factor: need("high_freq_factor", raw.high_freq_factor)?,
                original_max_position_embeddings: raw.original_max_position_embeddings.ok_or(
                    "rope_scaling of type `llama3` needs `original_max_position_embeddings`",
                )?,
            }),
            "linear" => Ok(RopeScaling::Linear {
                factor: need("factor", raw.factor)?,
            }),
            other => Err(format!(
                "unsupported rope_scaling type `{other}` (supported: llama3, linear)"
            )),
        }
    }
}

impl From<RopeScaling> for RawRopeScaling {
    fn from(scaling: RopeScaling) -> Self {
        let empty = RawRopeScaling {
            rope_type: None,
            kind: None,
            factor: None,
            low_freq_factor: None,
            high_freq_factor: None,
            original_max_position_embeddings: None,
        };
        match scaling {
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => RawRopeScaling {
                rope_type: Some("llama3".into()),
                factor: Some(factor),
                low_freq_factor: Some(low_freq_factor),
                high_freq_factor: Some(high_freq_factor),
                original_max_position_embeddings: Some(original_max_position_embeddings),
                ..empty
            },
            RopeScaling::Linear { factor } => RawRopeScaling {
                rope_type: Some("linear".into()),
                factor: Some(factor),
                ..empty
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = r#"{
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": false,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "max_position_embeddings": 8192,
        "model_type": "llama",
        "num_attention_heads": 9,
        "num_hidden_layers": 30,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05,
        "rope_scaling": null,
        "rope_theta": 100000,
        "tie_word_embeddings": true,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.42.3",
        "use_cache": true,
        "vocab_size": 49152
    }"#;

    #[test]
    fn parses_smollm2_config_ignoring_extra_fields() {
        let c = HfConfig::from_json(SMOL).unwrap();
        assert_eq!(c.hidden_size, 576);
        assert_eq!(c.num_key_value_heads, 3);
        assert_eq!(c.head_dim, 64);
        assert_eq!(c.rope_theta, 100000.0);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.eos_token_id, Some(TokenIds::One(2)));
        assert_eq!(c.rope_scaling, None);
    }

    #[test]
    fn defaults_apply() {
        let c = HfConfig::from_json(
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 128, "rms_norm_eps": 1e-6, "vocab_size": 100,
                "max_position_embeddings": 256}"#,
        )
        .unwrap();
        assert_eq!(c.num_key_value_heads, 4);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10000.0);
        assert!(!c.tie_word_embeddings);
        assert_eq!(c.eos_token_id, None);
    }

    #[test]
    fn llama3_rope_scaling_and_eos_list() {
        let c = HfConfig::from_json(
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 2, "head_dim": 32,
                "intermediate_size": 128, "rms_norm_eps": 1e-6, "vocab_size": 100,
                "max_position_embeddings": 256, "eos_token_id": [128001, 128009],
                "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                   "rope_type": "llama3"}}"#,
        )
        .unwrap();
        assert_eq!(c.head_dim, 32);
        assert_eq!(c.eos_token_id.as_ref().unwrap().ids(), vec![128001, 128009]);
        assert_eq!(
            c.rope_scaling,
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            })
        );
        // Serializing and parsing again gives the same config.
        let back = HfConfig::from_json(&c.to_json_pretty()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn linear_rope_scaling_with_legacy_type_key() {
        let c = HfConfig::from_json(
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 128, "rms_norm_eps": 1e-6, "vocab_size": 100,
                "max_position_embeddings": 256,
                "rope_scaling": {"type": "linear", "factor": 2.0}}"#,
        )
        .unwrap();
        assert_eq!(c.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    }

    #[test]
    fn unsupported_rope_scaling_is_an_error() {
        let err = HfConfig::from_json(
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 128, "rms_norm_eps": 1e-6, "vocab_size": 100,
                "max_position_embeddings": 256,
                "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}"#,
        )
        .unwrap_err();
        assert!(
            err.contains("unsupported rope_scaling type `yarn` (supported: llama3, linear)"),
            "{err}"
        );
    }

    #[test]
    fn missing_required_field_is_named() {
        let err = HfConfig::from_json(r#"{"hidden_size": 64}"#).unwrap_err();
        assert!(err.contains("num_hidden_layers"), "{err}");
    }

    #[test]
    fn bad_head_ratio_is_an_error() {
        let err = HfConfig::from_json(
            r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                "num_key_value_heads": 3,
                "intermediate_size": 128, "rms_norm_eps": 1e-6, "vocab_size": 100,
                "max_position_embeddings": 256}"#,
        )
        .unwrap_err();
        assert!(err.contains("multiple of num_key_value_heads (3)"), "{err}");
    }
}
