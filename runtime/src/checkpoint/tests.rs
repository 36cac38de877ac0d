//! Tests across the checkpoint module: small GGUF and safetensors files built
//! here byte by byte, and the real SmolLM2 fixture when it has been fetched.

use std::path::{Path, PathBuf};

use half::{bf16, f16};

use super::*;

// ---------------------------------------------------------------------------
// Synthetic GGUF files
// ---------------------------------------------------------------------------

/// Builds GGUF bytes: metadata values are written pre-encoded.
struct GgufBuilder {
    version: u32,
    alignment: u64,
    kv: Vec<(String, u32, Vec<u8>)>,
    /// (name, dims innermost first, type id, data bytes)
    tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
}

fn gguf_string(s: &str) -> Vec<u8> {
    let mut b = (s.len() as u64).to_le_bytes().to_vec();
    b.extend(s.as_bytes());
    b
}

impl GgufBuilder {
    fn new() -> Self {
        GgufBuilder {
            version: 3,
            alignment: 32,
            kv: Vec::new(),
            tensors: Vec::new(),
        }
    }

    fn kv(&mut self, key: &str, ty: u32, payload: Vec<u8>) -> &mut Self {
        self.kv.push((key.to_string(), ty, payload));
        self
    }
    fn u32(&mut self, key: &str, v: u32) -> &mut Self {
        self.kv(key, 4, v.to_le_bytes().to_vec())
    }
    fn f32(&mut self, key: &str, v: f32) -> &mut Self {
        self.kv(key, 6, v.to_le_bytes().to_vec())
    }
    fn str(&mut self, key: &str, v: &str) -> &mut Self {
        self.kv(key, 8, gguf_string(v))
    }
    fn bool(&mut self, key: &str, v: bool) -> &mut Self {
        self.kv(key, 7, vec![v as u8])
    }
    fn str_array(&mut self, key: &str, items: &[&str]) -> &mut Self {
        let mut b = 8u32.to_le_bytes().to_vec();
        b.extend((items.len() as u64).to_le_bytes());
        for s in items {
            b.extend(gguf_string(s));
        }
        self.kv(key, 9, b)
    }
    fn i32_array(&mut self, key: &str, items: &[i32]) -> &mut Self {
        let mut b = 5u32.to_le_bytes().to_vec();
        b.extend((items.len() as u64).to_le_bytes());
        for v in items {
            b.extend(v.to_le_bytes());
        }
        self.kv(key, 9, b)
    }

    fn tensor(&mut self, name: &str, dims: &[u64], ty: GgmlType, data: Vec<u8>) -> &mut Self {
        self.tensors
            .push((name.to_string(), dims.to_vec(), ty.id(), data));
        self
    }

    fn build(&self) -> Vec<u8> {
        let align = |n: usize| n.div_ceil(self.alignment as usize) * self.alignment as usize;
        let mut b = b"GGUF".to_vec();
        b.extend(self.version.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (key, ty, payload) in &self.kv {
            b.extend(gguf_string(key));
            b.extend(ty.to_le_bytes());
            b.extend(payload);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            b.extend(gguf_string(name));
            b.extend((dims.len() as u32).to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend((offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = align(offset + data.len());
        }
        let data_start = align(b.len());
        b.resize(data_start, 0);
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            b.resize(data_start + off, 0);
            b.extend(data);
        }
        b
    }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_bits().to_le_bytes()
}

/// Deterministic pseudo-random bytes (xorshift), for quantized payloads.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// `n_blocks` blocks of `ty` with valid f16 scales and noisy quants.
fn quant_blocks(ty: GgmlType, n_blocks: usize, seed: u64) -> Vec<u8> {
    let q = noise(seed, n_blocks * 32);
    let mut b = Vec::new();
    for i in 0..n_blocks {
        let d = 0.01 * (1 + i % 5) as f32;
        match ty {
            GgmlType::Q8_0 => {
                b.extend(h(d));
                b.extend(&q[i * 32..i * 32 + 32]);
            }
            GgmlType::Q4_0 => {
                b.extend(h(d));
                b.extend(&q[i * 32..i * 32 + 16]);
            }
            GgmlType::Q4_1 => {
                b.extend(h(d));
                b.extend(h(-0.05 * (i % 3) as f32));
                b.extend(&q[i * 32..i * 32 + 16]);
            }
            other => panic!("quant_blocks: {other}"),
        }
    }
    b
}

fn f16_bytes(n: usize, seed: u64) -> Vec<u8> {
    noise(seed, n)
        .iter()
        .flat_map(|&x| h((x as f32 - 128.0) / 64.0))
        .collect()
}

fn bf16_bytes(n: usize, seed: u64) -> Vec<u8> {
    noise(seed, n)
        .iter()
        .flat_map(|&x| {
            bf16::from_f32((x as f32 - 128.0) / 32.0)
                .to_bits()
                .to_le_bytes()
        })
        .collect()
}

fn f32_noise(n: usize, seed: u64) -> Vec<u8> {
    let v: Vec<f32> = noise(seed, n)
        .iter()
        .map(|&x| (x as f32 - 128.0) / 100.0)
        .collect();
    f32_bytes(&v)
}

// The tiny model: hidden 32, 4 heads of 8, 2 KV heads, ff 64, 2 layers, vocab 6.
const D: u64 = 32;
const HEADS: u32 = 4;
const KV_HEADS: u32 = 2;
const HEAD_DIM: u64 = 8;
const FF: u64 = 64;
const LAYERS: u32 = 2;
const TOKENS: [&str; 6] = ["<unk>", "<s>", "</s>", "a", "b", "ab"];

/// Metadata and tensors of a tiny llama GGUF using every supported type.
fn tiny_llama(tied: bool) -> GgufBuilder {
    let mut g = GgufBuilder::new();
    g.str("general.architecture", "llama")
        .str("general.name", "tiny")
        .u32("llama.context_length", 128)
        .u32("llama.embedding_length", D as u32)
        .u32("llama.block_count", LAYERS)
        .u32("llama.feed_forward_length", FF as u32)
        .u32("llama.rope.dimension_count", HEAD_DIM as u32)
        .u32("llama.attention.head_count", HEADS)
        .u32("llama.attention.head_count_kv", KV_HEADS)
        .f32("llama.rope.freq_base", 100000.0)
        .f32("llama.attention.layer_norm_rms_epsilon", 1e-5)
        .str("tokenizer.ggml.model", "gpt2")
        .str("tokenizer.ggml.pre", "smollm")
        .str_array("tokenizer.ggml.tokens", &TOKENS)
        .i32_array("tokenizer.ggml.token_type", &[2, 3, 3, 1, 1, 1])
        .str_array("tokenizer.ggml.merges", &["a b"])
        .u32("tokenizer.ggml.bos_token_id", 1)
        .u32("tokenizer.ggml.eos_token_id", 2)
        .bool("tokenizer.ggml.add_bos_token", false)
        .str("tokenizer.chat_template", "{{ messages }}");
    let vocab = TOKENS.len() as u64;
    let q_rows = HEADS as u64 * HEAD_DIM;
    let kv_rows = KV_HEADS as u64 * HEAD_DIM;
    g.tensor(
        "token_embd.weight",
        &[D, vocab],
        GgmlType::Q8_0,
        quant_blocks(GgmlType::Q8_0, vocab as usize, 1),
    );
    for l in 0..LAYERS as u64 {
        let n = |s: &str| format!("blk.{l}.{s}.weight");
        let seed = 100 * (l + 1);
        g.tensor(
            &n("attn_norm"),
            &[D],
            GgmlType::F32,
            f32_noise(D as usize, seed),
        )
        .tensor(
            &n("attn_q"),
            &[D, q_rows],
            GgmlType::Q4_0,
            quant_blocks(GgmlType::Q4_0, q_rows as usize, seed + 1),
        )
        .tensor(
            &n("attn_k"),
            &[D, kv_rows],
            GgmlType::Q4_1,
            quant_blocks(GgmlType::Q4_1, kv_rows as usize, seed + 2),
        )
        .tensor(
            &n("attn_v"),
            &[D, kv_rows],
            GgmlType::F16,
            f16_bytes((D * kv_rows) as usize, seed + 3),
        )
        .tensor(
            &n("attn_output"),
            &[q_rows, D],
            GgmlType::BF16,
            bf16_bytes((D * q_rows) as usize, seed + 4),
        )
        .tensor(
            &n("ffn_norm"),
            &[D],
            GgmlType::F32,
            f32_noise(D as usize, seed + 5),
        )
        .tensor(
            &n("ffn_gate"),
            &[D, FF],
            GgmlType::F32,
            f32_noise((D * FF) as usize, seed + 6),
        )
        .tensor(
            &n("ffn_up"),
            &[D, FF],
            GgmlType::Q8_0,
            quant_blocks(GgmlType::Q8_0, FF as usize, seed + 7),
        )
        .tensor(
            &n("ffn_down"),
            &[FF, D],
            GgmlType::Q4_1,
            quant_blocks(GgmlType::Q4_1, (FF * D / 32) as usize, seed + 8),
        );
    }
    g.tensor(
        "output_norm.weight",
        &[D],
        GgmlType::F32,
        f32_noise(D as usize, 7),
    );
    if !tied {
        g.tensor(
            "output.weight",
            &[D, vocab],
            GgmlType::F16,
            f16_bytes((D * vocab) as usize, 8),
        );
    }
    g
}

/// A fresh, empty scratch directory for one test.
fn scratch(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("caramba-checkpoint-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

// ---------------------------------------------------------------------------
// GGUF: header, metadata, tensors
// ---------------------------------------------------------------------------

#[test]
fn gguf_reads_every_metadata_value_type() {
    let dir = scratch("meta-types");
    let mut g = GgufBuilder::new();
    g.kv("u8", 0, vec![200])
        .kv("i8", 1, vec![(-5i8) as u8])
        .kv("u16", 2, 60000u16.to_le_bytes().to_vec())
        .kv("i16", 3, (-300i16).to_le_bytes().to_vec())
        .u32("u32", 4_000_000_000)
        .kv("i32", 5, (-70000i32).to_le_bytes().to_vec())
        .f32("f32", 1.5)
        .bool("bool", true)
        .str("string", "héllo")
        .kv("u64", 10, u64::MAX.to_le_bytes().to_vec())
        .kv("i64", 11, (-1i64 << 40).to_le_bytes().to_vec())
        .kv("f64", 12, 0.1f64.to_le_bytes().to_vec());
    // An array of arrays of u16.
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend(2u64.to_le_bytes());
    for row in [[1u16, 2], [3, 4]] {
        nested.extend(2u32.to_le_bytes());
        nested.extend(2u64.to_le_bytes());
        for v in row {
            nested.extend(v.to_le_bytes());
        }
    }
    g.kv("nested", 9, nested);
    let path = write(&dir, "m.gguf", &g.build());
    let f = Gguf::open(&path).unwrap();
    assert_eq!(f.version, 3);
    assert_eq!(f.get("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(f.get("i8"), Some(&GgufValue::I8(-5)));
    assert_eq!(f.get("u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(f.get("i16"), Some(&GgufValue::I16(-300)));
    assert_eq!(f.get("u32"), Some(&GgufValue::U32(4_000_000_000)));
    assert_eq!(f.get("i32"), Some(&GgufValue::I32(-70000)));
    assert_eq!(f.get("f32"), Some(&GgufValue::F32(1.5)));
    assert_eq!(f.get("bool"), Some(&GgufValue::Bool(true)));
    assert_eq!(f.get("string").and_then(|v| v.as_str()), Some("héllo"));
    assert_eq!(f.get("u64"), Some(&GgufValue::U64(u64::MAX)));
    assert_eq!(f.get("i64"), Some(&GgufValue::I64(-1 << 40)));
    assert_eq!(f.get("f64"), Some(&GgufValue::F64(0.1)));
    let u16s = |a: u16, b: u16| GgufValue::Array(vec![GgufValue::U16(a), GgufValue::U16(b)]);
    assert_eq!(
        f.get("nested"),
        Some(&GgufValue::Array(vec![u16s(1, 2), u16s(3, 4)]))
    );
    assert_eq!(f.metadata().len(), 13);
    assert_eq!(f.metadata()[0].0, "u8");
    assert!(f.tensors().is_empty());
}

#[test]
fn gguf_version_2_and_custom_alignment() {
    let dir = scratch("v2-align");
    let mut g = GgufBuilder::new();
    g.version = 2;
    g.alignment = 64;
    g.u32("general.alignment", 64)
        .tensor("a", &[3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0]))
        .tensor("b", &[2], GgmlType::F32, f32_bytes(&[4.0, 5.0]));
    let path = write(&dir, "v2.gguf", &g.build());
    let f = Gguf::open(&path).unwrap();
    assert_eq!(f.version, 2);
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_offset % 64, 0);
    assert_eq!(f.tensor_info("b").unwrap().offset, 64);
    assert_eq!(f.tensor_f32("a").unwrap(), (vec![3], vec![1.0, 2.0, 3.0]));
    assert_eq!(f.tensor_f32("b").unwrap(), (vec![2], vec![4.0, 5.0]));
}

#[test]
fn gguf_shape_is_dims_reversed() {
    let dir = scratch("shape");
    let data: Vec<f32> = (0..24).map(|x| x as f32).collect();
    let mut g = GgufBuilder::new();
    g.tensor("t", &[4, 3, 2], GgmlType::F32, f32_bytes(&data));
    let path = write(&dir, "s.gguf", &g.build());
    let f = Gguf::open(&path).unwrap();
    assert_eq!(f.tensor_info("t").unwrap().dims, vec![4, 3, 2]);
    let (shape, got) = f.tensor_f32("t").unwrap();
    assert_eq!(shape, vec![2, 3, 4]);
    assert_eq!(got, data);
}

#[test]
fn gguf_dequantizes_each_type_through_the_file() {
    let dir = scratch("dequant-file");
    // Q8_0: d = 0.5, q = -16..16.
    let mut q8 = h(0.5).to_vec();
    q8.extend((-16i8..16).map(|q| q as u8));
    // Q4_0: d = 2, byte j = (15 - j) << 4 | j.
    let mut q4_0 = h(2.0).to_vec();
    q4_0.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
    // Q4_1: d = 0.25, m = -1, same nibbles.
    let mut q4_1 = h(0.25).to_vec();
    q4_1.extend(h(-1.0));
    q4_1.extend((0u8..16).map(|j| j | ((15 - j) << 4)));
    let mut g = GgufBuilder::new();
    g.tensor("q8", &[32], GgmlType::Q8_0, q8)
        .tensor("q4_0", &[32], GgmlType::Q4_0, q4_0)
        .tensor("q4_1", &[32], GgmlType::Q4_1, q4_1)
        .tensor("f16", &[2], GgmlType::F16, [h(0.5), h(-2.0)].concat())
        .tensor(
            "bf16",
            &[1],
            GgmlType::BF16,
            bf16::from_f32(3.0).to_bits().to_le_bytes().to_vec(),
        );
    let path = write(&dir, "q.gguf", &g.build());
    let f = Gguf::open(&path).unwrap();
    let q8 = f.tensor_f32("q8").unwrap().1;
    assert_eq!(q8[0], -8.0);
    assert_eq!(q8[17], 0.5);
    assert_eq!(q8[31], 7.5);
    let q4_0 = f.tensor_f32("q4_0").unwrap().1;
    let want: Vec<f32> = (0..32)
        .map(|e| {
            let q = if e < 16 { e } else { 15 - (e - 16) };
            (q as f32 - 8.0) * 2.0
        })
        .collect();
    assert_eq!(q4_0, want);
    let q4_1 = f.tensor_f32("q4_1").unwrap().1;
    let want: Vec<f32> = (0..32)
        .map(|e| {
            let q = if e < 16 { e } else { 15 - (e - 16) };
            q as f32 * 0.25 - 1.0
        })
        .collect();
    assert_eq!(q4_1, want);
    assert_eq!(f.tensor_f32("f16").unwrap().1, vec![0.5, -2.0]);
    assert_eq!(f.tensor_f32("bf16").unwrap().1, vec![3.0]);
}

#[test]
fn gguf_bad_magic_and_version() {
    let dir = scratch("magic");
    let mut bytes = GgufBuilder::new().build();
    bytes[0..4].copy_from_slice(b"GGML");
    let path = write(&dir, "bad.gguf", &bytes);
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("bad.gguf") && err.contains("expected magic \"GGUF\""),
        "{err}"
    );

    let mut g = GgufBuilder::new();
    g.version = 1;
    let path = write(&dir, "v1.gguf", &g.build());
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("unsupported GGUF version 1 (supported: 2, 3)"),
        "{err}"
    );

    let path = write(&dir, "empty.gguf", b"");
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("truncated while reading the GGUF magic"),
        "{err}"
    );
}

#[test]
fn gguf_every_truncation_is_an_error_not_a_panic() {
    let dir = scratch("truncate");
    let bytes = tiny_llama(true).build();
    for len in (0..bytes.len()).step_by(7).chain([bytes.len() - 1]) {
        let path = write(&dir, "t.gguf", &bytes[..len]);
        assert!(
            Gguf::open(&path).is_err(),
            "a file cut to {len} of {} bytes opened",
            bytes.len()
        );
    }
    // Cut in the metadata: the message says what was being read.
    let path = write(&dir, "t.gguf", &bytes[..40]);
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(err.contains("t.gguf: truncated while reading"), "{err}");
    assert!(err.contains("but the file is 40 bytes"), "{err}");
    // Cut in the data: the last tensor is named.
    let path = write(&dir, "t.gguf", &bytes[..bytes.len() - 1]);
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(err.contains("tensor `output_norm.weight`"), "{err}");
    assert!(err.contains("lies past the end of the data"), "{err}");
}

#[test]
fn gguf_offset_past_end_and_bad_shapes() {
    let dir = scratch("offsets");
    let mut g = GgufBuilder::new();
    g.tensor("x", &[4], GgmlType::F32, f32_bytes(&[0.0; 4]));
    let mut bytes = g.build();
    // The tensor's offset field is the last 8 bytes of its info record,
    // just before the data section's padding: find it by its value (0).
    let info_end = 4 + 4 + 8 + 8 + (8 + 1) + 4 + 8 + 4 + 8;
    bytes[info_end - 8..info_end].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let path = write(&dir, "far.gguf", &bytes);
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("far.gguf: tensor `x`: data [1099511627776, 1099511627792)"),
        "{err}"
    );

    let mut g = GgufBuilder::new();
    g.tensor("odd", &[16], GgmlType::Q8_0, vec![0; 34]);
    let path = write(&dir, "odd.gguf", &g.build());
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("tensor `odd` has shape [16]: type Q8_0 needs the innermost dimension to be a multiple of 32"),
        "{err}"
    );

    let mut g = GgufBuilder::new();
    g.tensor("big", &[2, 2, 2, 2, 2], GgmlType::F32, vec![0; 128]);
    let path = write(&dir, "rank.gguf", &g.build());
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("tensor `big` has 5 dimensions; expected at most 4"),
        "{err}"
    );

    // A huge array count must not allocate or panic.
    let mut g = GgufBuilder::new();
    let mut arr = 4u32.to_le_bytes().to_vec();
    arr.extend(u64::MAX.to_le_bytes());
    g.kv("huge", 9, arr);
    let path = write(&dir, "huge.gguf", &g.build());
    let err = Gguf::open(&path).unwrap_err().to_string();
    assert!(err.contains("metadata `huge`"), "{err}");
}

#[test]
fn gguf_unsupported_types_are_named() {
    let dir = scratch("unsupported");
    let mut g = GgufBuilder::new();
    g.tensor("k", &[256], GgmlType::Q6K, vec![0; 210]).tensor(
        "iq",
        &[256],
        GgmlType::Other(20),
        vec![0; 136],
    );
    let path = write(&dir, "u.gguf", &g.build());
    let f = Gguf::open(&path).unwrap();
    let err = f.tensor_f32("k").unwrap_err().to_string();
    assert!(
        err.contains(
            "u.gguf: tensor `k` has type Q6_K, which is not supported \
             (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)"
        ),
        "{err}"
    );
    let err = f.tensor_f32("iq").unwrap_err().to_string();
    assert!(
        err.contains("tensor `iq` has type ggml type id 20"),
        "{err}"
    );
    let err = f.tensor_f32("nope").unwrap_err().to_string();
    assert!(err.contains("u.gguf: no tensor named `nope`"), "{err}");
}

// ---------------------------------------------------------------------------
// GGUF as a Hugging Face checkpoint
// ---------------------------------------------------------------------------

#[test]
fn tiny_gguf_config_and_tokenizer() {
    let dir = scratch("tiny-config");
    let path = write(&dir, "tiny.gguf", &tiny_llama(true).build());
    let ck = Checkpoint::open(&path).unwrap();
    assert_eq!(ck.format(), CheckpointFormat::Gguf);
    let c = &ck.config;
    assert_eq!(c.hidden_size, 32);
    assert_eq!(c.num_hidden_layers, 2);
    assert_eq!(c.num_attention_heads, 4);
    assert_eq!(c.num_key_value_heads, 2);
    assert_eq!(c.head_dim, 8);
    assert_eq!(c.intermediate_size, 64);
    assert_eq!(c.vocab_size, 6);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert_eq!(c.max_position_embeddings, 128);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_id, Some(TokenIds::One(2)));
    assert_eq!(c.architectures, vec!["LlamaForCausalLM".to_string()]);

    let t = ck.tokenizer.as_ref().unwrap();
    assert_eq!(
        *t,
        GgufTokenizerMeta {
            model: "gpt2".into(),
            pre: Some("smollm".into()),
            tokens: TOKENS.iter().map(|s| s.to_string()).collect(),
            merges: vec!["a b".into()],
            token_types: vec![2, 3, 3, 1, 1, 1],
            bos_token_id: Some(1),
            eos_token_id: Some(2),
            unknown_token_id: None,
            padding_token_id: None,
            add_bos_token: Some(false),
            add_eos_token: None,
            chat_template: Some("{{ messages }}".into()),
        }
    );

    let untied = write(&dir, "untied.gguf", &tiny_llama(false).build());
    let ck = Checkpoint::open(&untied).unwrap();
    assert!(!ck.config.tie_word_embeddings);
    assert_eq!(ck.shape("lm_head.weight"), Some(vec![6, 32]));
    ck.validate(llama_tensor_shapes(&ck.config)).unwrap();
}

#[test]
fn tiny_gguf_names_shapes_and_validation() {
    let dir = scratch("tiny-names");
    let path = write(&dir, "tiny.gguf", &tiny_llama(true).build());
    let ck = Checkpoint::open(&path).unwrap();
    let expected = llama_tensor_shapes(&ck.config);
    assert_eq!(expected.len(), 1 + 9 * 2 + 1);
    let report = ck.validate(expected.clone()).unwrap();
    assert!(report.unused.is_empty());
    let mut names: Vec<String> = expected.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(ck.names(), names);
    assert_eq!(
        ck.shape("model.layers.1.self_attn.k_proj.weight"),
        Some(vec![16, 32])
    );
    assert_eq!(
        ck.shape("model.layers.1.mlp.down_proj.weight"),
        Some(vec![32, 64])
    );
    assert_eq!(ck.shape("lm_head.weight"), None);
}

#[test]
fn validation_reports_all_missing_and_mismatched_tensors() {
    let dir = scratch("validate");
    let path = write(&dir, "tiny.gguf", &tiny_llama(true).build());
    let ck = Checkpoint::open(&path).unwrap();
    let mut expected = llama_tensor_shapes(&ck.config);
    expected.push(("lm_head.weight".into(), vec![6, 32]));
    expected.push(("model.layers.2.input_layernorm.weight".into(), vec![32]));
    expected[1].1 = vec![33];
    let err = ck.validate(expected).unwrap_err();
    let CheckpointError::Mismatch { report, .. } = &err else {
        panic!("expected a mismatch, got {err}");
    };
    assert_eq!(report.missing.len(), 2);
    assert_eq!(report.shape_mismatches.len(), 1);
    let msg = err.to_string();
    assert!(
        msg.contains("tiny.gguf: checkpoint does not match the model"),
        "{msg}"
    );
    assert!(
        msg.contains("missing tensor `lm_head.weight` (expected shape [6, 32])"),
        "{msg}"
    );
    assert!(
        msg.contains("missing tensor `model.layers.2.input_layernorm.weight`"),
        "{msg}"
    );
    assert!(
        msg.contains(
            "tensor `model.layers.0.input_layernorm.weight`: expected shape [33], found [32]"
        ),
        "{msg}"
    );

    let err = ck.tensor_f32("lm_head.weight").unwrap_err().to_string();
    assert!(
        err.contains("tiny.gguf: no tensor named `lm_head.weight` (GGUF `output.weight`)"),
        "{err}"
    );
    let err = ck
        .tensor_f32("model.rotary.inv_freq")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("no tensor named `model.rotary.inv_freq`"),
        "{err}"
    );
}

#[test]
fn q_and_k_rows_are_unpermuted_by_the_direct_formula() {
    let dir = scratch("unpermute");
    let path = write(&dir, "tiny.gguf", &tiny_llama(true).build());
    let ck = Checkpoint::open(&path).unwrap();
    let gguf = ck.gguf().unwrap();
    for (hf, raw, n_head) in [
        (
            "model.layers.1.self_attn.q_proj.weight",
            "blk.1.attn_q.weight",
            HEADS as usize,
        ),
        (
            "model.layers.0.self_attn.k_proj.weight",
            "blk.0.attn_k.weight",
            KV_HEADS as usize,
        ),
    ] {
        let (shape, got) = ck.tensor_f32(hf).unwrap();
        let (raw_shape, raw) = gguf.tensor_f32(raw).unwrap();
        assert_eq!(shape, raw_shape);
        let (rows, cols) = (shape[0], shape[1]);
        let half = rows / n_head / 2;
        assert_ne!(got, raw, "{hf}: the permutation should move rows");
        for h in 0..n_head {
            for j in 0..2 {
                for i in 0..half {
                    let hf_row = h * 2 * half + j * half + i;
                    let gguf_row = h * 2 * half + 2 * i + j;
                    assert_eq!(
                        got[hf_row * cols..(hf_row + 1) * cols],
                        raw[gguf_row * cols..(gguf_row + 1) * cols],
                        "{hf}: row {hf_row}"
                    );
                }
            }
        }
    }
    // Other tensors pass through untouched.
    assert_eq!(
        ck.tensor_f32("model.layers.0.self_attn.v_proj.weight")
            .unwrap(),
        gguf.tensor_f32("blk.0.attn_v.weight").unwrap()
    );
}

#[test]
fn gguf_without_required_metadata_names_the_key() {
    let dir = scratch("missing-meta");
    let mut g = GgufBuilder::new();
    g.str("general.architecture", "llama")
        .u32("llama.embedding_length", 32);
    let path = write(&dir, "m.gguf", &g.build());
    let err = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        err.contains("m.gguf: metadata key `llama.block_count` is missing"),
        "{err}"
    );

    let mut g = GgufBuilder::new();
    g.str("general.architecture", "gpt2");
    let path = write(&dir, "g.gguf", &g.build());
    let err = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(err.contains("only `llama` is supported"), "{err}");

    let mut g = tiny_llama(true);
    g.kv.retain(|(k, _, _)| k != "llama.attention.head_count");
    g.str("llama.attention.head_count", "nine");
    let path = write(&dir, "s.gguf", &g.build());
    let err = Checkpoint::open(&path).unwrap_err().to_string();
    assert!(
        err.contains(
            "metadata key `llama.attention.head_count`: expected a non-negative integer, \
             found string \"nine\""
        ),
        "{err}"
    );
}

#[test]
fn convert_round_trips_the_tiny_model() {
    let dir = scratch("convert-tiny");
    let gguf_path = write(&dir, "tiny.gguf", &tiny_llama(true).build());
    let out = dir.join("hf");
    let result = convert_gguf_to_hf(&gguf_path, &out, Some("{\"model\": {}}")).unwrap();
    assert_eq!(result.n_tensors, 20);
    assert!(result.skipped.is_empty());
    assert_eq!(result.files.len(), 3);
    let mut listing: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    listing.sort();
    assert_eq!(
        listing,
        ["config.json", "model.safetensors", "tokenizer.json"],
        "no temporary files are left behind"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("tokenizer.json")).unwrap(),
        "{\"model\": {}}\n"
    );

    let from_gguf = Checkpoint::open(&gguf_path).unwrap();
    let from_hf = Checkpoint::open(&out).unwrap();
    assert_eq!(from_hf.format(), CheckpointFormat::Safetensors);
    assert_eq!(from_hf.config, from_gguf.config);
    assert_eq!(from_hf.names(), from_gguf.names());
    for name in from_gguf.names() {
        assert_eq!(
            from_hf.tensor_f32(&name).unwrap(),
            from_gguf.tensor_f32(&name).unwrap(),
            "{name}"
        );
    }
    // The safetensors file alone (next to its config.json) opens too.
    let file = Checkpoint::open(out.join("model.safetensors")).unwrap();
    assert_eq!(file.names().len(), 20);
    // Converting again over the existing output works.
    convert_gguf_to_hf(&gguf_path, &out, None).unwrap();
}

// ---------------------------------------------------------------------------
// Safetensors
// ---------------------------------------------------------------------------

/// A safetensors file from (name, dtype, shape, bytes), in order.
fn raw_safetensors(entries: &[(&str, &str, Vec<usize>, Vec<u8>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, dtype, shape, bytes) in entries {
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape,
                               "data_offsets": [offset, offset + bytes.len()]}),
        );
        offset += bytes.len();
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend(header);
    for (_, _, _, bytes) in entries {
        out.extend(bytes);
    }
    out
}

const TINY_CONFIG: &str = r#"{"hidden_size": 4, "num_hidden_layers": 1,
    "num_attention_heads": 2, "intermediate_size": 8, "rms_norm_eps": 1e-6,
    "vocab_size": 3, "max_position_embeddings": 16, "extra_field": [1, 2]}"#;

#[test]
fn safetensors_dtypes_and_errors() {
    let dir = scratch("st-dtypes");
    write(&dir, "config.json", TINY_CONFIG.as_bytes());
    let bytes = raw_safetensors(&[
        ("f32", "F32", vec![2], f32_bytes(&[1.0, -2.5])),
        ("f16", "F16", vec![1, 2], [h(0.5), h(-4.0)].concat()),
        (
            "bf16",
            "BF16",
            vec![1],
            bf16::from_f32(-0.25).to_bits().to_le_bytes().to_vec(),
        ),
        ("ints", "I32", vec![1], 7i32.to_le_bytes().to_vec()),
    ]);
    write(&dir, "model.safetensors", &bytes);
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.config.hidden_size, 4);
    assert_eq!(ck.config.num_key_value_heads, 2);
    assert!(ck.tokenizer.is_none());
    assert_eq!(ck.names(), vec!["bf16", "f16", "f32", "ints"]);
    assert_eq!(ck.shape("f16"), Some(vec![1, 2]));
    assert_eq!(ck.tensor_f32("f32").unwrap(), (vec![2], vec![1.0, -2.5]));
    assert_eq!(ck.tensor_f32("f16").unwrap(), (vec![1, 2], vec![0.5, -4.0]));
    assert_eq!(ck.tensor_f32("bf16").unwrap(), (vec![1], vec![-0.25]));
    let err = ck.tensor_f32("ints").unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors: tensor `ints` has type I32, which is not supported (supported: F32, F16, BF16)"),
        "{err}"
    );
    let err = ck.tensor_f32("missing").unwrap_err().to_string();
    assert!(err.contains("no tensor named `missing`"), "{err}");

    // A truncated file is an error naming the file.
    write(&dir, "model.safetensors", &bytes[..bytes.len() - 2]);
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("model.safetensors: invalid safetensors file"),
        "{err}"
    );
}

#[test]
fn sharded_safetensors_directory() {
    let dir = scratch("st-sharded");
    write(&dir, "config.json", TINY_CONFIG.as_bytes());
    write(
        &dir,
        "model-00001-of-00002.safetensors",
        &raw_safetensors(&[("a", "F32", vec![1], f32_bytes(&[1.0]))]),
    );
    write(
        &dir,
        "model-00002-of-00002.safetensors",
        &raw_safetensors(&[
            ("b", "F32", vec![2], f32_bytes(&[2.0, 3.0])),
            ("c", "F32", vec![1], f32_bytes(&[4.0])),
        ]),
    );
    let index = r#"{"metadata": {"total_size": 16}, "weight_map": {
        "a": "model-00001-of-00002.safetensors",
        "b": "model-00002-of-00002.safetensors",
        "c": "model-00002-of-00002.safetensors"}}"#;
    write(&dir, "model.safetensors.index.json", index.as_bytes());
    let ck = Checkpoint::open(&dir).unwrap();
    assert_eq!(ck.names(), vec!["a", "b", "c"]);
    assert_eq!(ck.tensor_f32("b").unwrap().1, vec![2.0, 3.0]);
    assert_eq!(ck.tensor_f32("c").unwrap().1, vec![4.0]);
    // The index file itself opens too.
    let ck = Checkpoint::open(dir.join("model.safetensors.index.json")).unwrap();
    assert_eq!(ck.tensor_f32("a").unwrap().1, vec![1.0]);

    // An index naming a tensor its shard lacks.
    let bad = index.replace("\"c\": \"model-00002", "\"d\": \"model-00002");
    write(&dir, "model.safetensors.index.json", bad.as_bytes());
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("tensor `d` is listed for this shard in"),
        "{err}"
    );
}

#[test]
fn open_explains_what_it_expected() {
    let dir = scratch("open-errors");
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("missing model.safetensors or model.safetensors.index.json"),
        "{err}"
    );
    write(
        &dir,
        "model.safetensors",
        &raw_safetensors(&[("a", "F32", vec![1], f32_bytes(&[1.0]))]),
    );
    let err = Checkpoint::open(dir.join("model.safetensors"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json (the model's Hugging Face config)"),
        "{err}"
    );
    write(&dir, "config.json", br#"{"hidden_size": 4}"#);
    let err = Checkpoint::open(&dir).unwrap_err().to_string();
    assert!(
        err.contains("config.json: invalid config: missing field `num_hidden_layers`"),
        "{err}"
    );
    let txt = write(&dir, "notes.txt", b"hello");
    let err = Checkpoint::open(&txt).unwrap_err().to_string();
    assert!(err.contains("notes.txt: not a checkpoint"), "{err}");
    let err = Checkpoint::open(dir.join("absent"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("absent"), "{err}");
}

// ---------------------------------------------------------------------------
// The real SmolLM2-135M-Instruct fixture
// ---------------------------------------------------------------------------

fn smollm2() -> Option<PathBuf> {
    testing::fixture_path(testing::SMOLLM2_GGUF)
}

#[test]
fn smollm2_metadata_and_config() {
    let Some(path) = smollm2() else { return };
    let ck = Checkpoint::open(&path).unwrap();
    let c = &ck.config;
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim, 64);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.rope_theta, 100000.0);
    assert_eq!(c.rms_norm_eps, 1e-5);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.bos_token_id, Some(1));
    assert_eq!(c.eos_token_id, Some(TokenIds::One(2)));
    assert_eq!(c.rope_scaling, None);

    let t = ck
        .tokenizer
        .as_ref()
        .expect("SmolLM2 GGUF carries a tokenizer");
    assert_eq!(t.model, "gpt2");
    assert_eq!(t.tokens.len(), 49152);
    assert_eq!(t.token_types.len(), 49152);
    assert!(!t.merges.is_empty());
    assert_eq!(t.bos_token_id, Some(1));
    assert_eq!(t.eos_token_id, Some(2));
}

#[test]
fn smollm2_tensor_inventory() {
    let Some(path) = smollm2() else { return };
    let f = Gguf::open(&path).unwrap();
    assert_eq!(f.tensors().len(), 272);
    let count = |ty: GgmlType| f.tensors().iter().filter(|t| t.ty == ty).count();
    assert_eq!(count(GgmlType::Q4_1), 210);
    assert_eq!(count(GgmlType::F32), 61);
    assert_eq!(count(GgmlType::Q8_0), 1);
    assert_eq!(
        f.tensor_info("token_embd.weight").unwrap().ty,
        GgmlType::Q8_0
    );

    let ck = Checkpoint::open(&path).unwrap();
    let expected = llama_tensor_shapes(&ck.config);
    assert_eq!(expected.len(), 272);
    let report = ck.validate(expected).unwrap();
    assert!(report.unused.is_empty(), "{:?}", report.unused);
    assert_eq!(
        ck.shape("model.layers.0.self_attn.q_proj.weight"),
        Some(vec![576, 576])
    );
    assert_eq!(
        ck.shape("model.layers.29.self_attn.k_proj.weight"),
        Some(vec![192, 576])
    );
    assert_eq!(
        ck.shape("model.embed_tokens.weight"),
        Some(vec![49152, 576])
    );
}

#[test]
fn smollm2_round_trips_through_safetensors() {
    let Some(path) = smollm2() else { return };
    let dir = scratch("smollm2-convert");
    let out = convert_gguf_to_hf(&path, &dir, None).unwrap();
    assert_eq!(out.n_tensors, 272);
    let from_gguf = Checkpoint::open(&path).unwrap();
    let from_hf = Checkpoint::open(&dir).unwrap();
    assert_eq!(from_hf.config, from_gguf.config);
    assert_eq!(from_hf.names(), from_gguf.names());
    let mut n_params = 0;
    for name in from_gguf.names() {
        let (shape_g, data_g) = from_gguf.tensor_f32(&name).unwrap();
        let (shape_h, data_h) = from_hf.tensor_f32(&name).unwrap();
        assert_eq!(shape_g, shape_h, "{name}");
        assert!(
            data_g == data_h,
            "{name}: data differs after the round trip"
        );
        assert!(
            data_g.iter().all(|x| x.is_finite()),
            "{name}: non-finite value"
        );
        n_params += data_g.len();
    }
    // 134.5M parameters, as FIXTURES.md says.
    assert_eq!(n_params, 134_515_008);
    let _ = std::fs::remove_dir_all(&dir);
}
