//! A pretrained model ready to run: a checkpoint's configuration lowered to
//! IR, its tensors bound by Hugging Face name, its tokenizer, and a forward
//! pass on the CPU reference backend.

use crate::commands::Failure;
use caramba_compiler::hf::{llama_model, LlamaDims};
use caramba_compiler::manifest::{RopeScalingCfg, RopeScalingKind};
use caramba_compiler::{CacheEntry, KvCacheSpec};
use caramba_ir::reference::{round_bf16, round_f16, Bindings, Storage, SymValues, Tensor};
use caramba_ir::{DType, Graph, Sym};
use caramba_runtime::backend::{Backend, Executor};
use caramba_runtime::checkpoint::{Checkpoint, CheckpointFormat, HfConfig, RopeScaling};
use caramba_runtime::gpu::{DeviceTensor, GpuOptions};
use caramba_runtime::tokenizer::{GgufTokenizerOptions, Tokenizer};
use std::collections::BTreeMap;
use std::path::Path;

pub struct Model {
    pub graph: Graph,
    pub params: BTreeMap<String, Tensor>,
    pub config: HfConfig,
    /// Where the forward pass runs. GPU backends run the optimized (fused)
    /// graph; the CPU reference runs the lowered graph as it is.
    exec: Executor,
    /// The KV-cache tensors of a model loaded for cached generation.
    pub cache: Vec<CacheEntry>,
    /// Whether the graph gives the last position's logits only
    /// ([`Model::load_for_generation`] without a cache).
    last_position: bool,
}

/// The dimensions of a Hugging Face Llama config, for the compiler.
pub fn dims(c: &HfConfig) -> LlamaDims {
    LlamaDims {
        vocab_size: c.vocab_size,
        hidden_size: c.hidden_size,
        num_hidden_layers: c.num_hidden_layers,
        num_attention_heads: c.num_attention_heads,
        num_key_value_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        intermediate_size: c.intermediate_size,
        rope_theta: c.rope_theta,
        rope_scaling: c.rope_scaling.as_ref().map(|s| match *s {
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => RopeScalingCfg {
                kind: RopeScalingKind::Llama3,
                factor,
                low_freq_factor: Some(low_freq_factor),
                high_freq_factor: Some(high_freq_factor),
                original_max_position_embeddings: Some(original_max_position_embeddings),
            },
            RopeScaling::Linear { factor } => RopeScalingCfg {
                kind: RopeScalingKind::Linear,
                factor,
                low_freq_factor: None,
                high_freq_factor: None,
                original_max_position_embeddings: None,
            },
        }),
        rms_norm_eps: c.rms_norm_eps,
        tie_word_embeddings: c.tie_word_embeddings,
    }
}

impl Model {
    /// Opens a checkpoint (Hugging Face directory, `.safetensors`, `.gguf`),
    /// lowers its architecture and loads every parameter the graph reads.
    pub fn load(ckpt: &Checkpoint) -> Result<Model, Failure> {
        Model::load_on(ckpt, Backend::Cpu)
    }

    /// [`Model::load`] on a chosen backend.
    pub fn load_on(ckpt: &Checkpoint, backend: Backend) -> Result<Model, Failure> {
        Model::load_with(ckpt, backend, None)
    }

    /// [`Model::load_on`] lowered for generation with a KV cache stored as
    /// `cache` says (see `caramba_compiler::lower_model_cached`): its
    /// forward pass is [`Model::forward_cached`].
    pub fn load_with(
        ckpt: &Checkpoint,
        backend: Backend,
        cache: Option<KvCacheSpec>,
    ) -> Result<Model, Failure> {
        Model::load_with_options(ckpt, backend, cache, GpuOptions::default(), DType::F32)
    }

    /// [`Model::load_with`] with GPU options (TF32 matmuls, ignored on
    /// the CPU) and the dtype the model computes in (`f32`, `bf16`, `f16`:
    /// the checkpoint's weights are rounded to it).
    pub fn load_with_options(
        ckpt: &Checkpoint,
        backend: Backend,
        cache: Option<KvCacheSpec>,
        options: GpuOptions,
        dtype: DType,
    ) -> Result<Model, Failure> {
        Model::load_graph(ckpt, backend, cache, options, dtype, false)
    }

    /// [`Model::load_with_options`] for generation: without a cache, the
    /// graph computes the last position's logits only
    /// (`caramba_compiler::last_position`: the head, and the last layer's
    /// MLP and output projection, run on one row), read by
    /// [`Model::next_logits`]; [`Model::logits`] is then unavailable.
    pub fn load_for_generation(
        ckpt: &Checkpoint,
        backend: Backend,
        cache: Option<KvCacheSpec>,
        options: GpuOptions,
        dtype: DType,
    ) -> Result<Model, Failure> {
        Model::load_graph(ckpt, backend, cache, options, dtype, cache.is_none())
    }

    fn load_graph(
        ckpt: &Checkpoint,
        backend: Backend,
        cache: Option<KvCacheSpec>,
        options: GpuOptions,
        dtype: DType,
        last_only: bool,
    ) -> Result<Model, Failure> {
        let config = ckpt.config.clone();
        let spec = llama_model(&dims(&config));
        let lowered = match cache {
            None => caramba_compiler::lower_model(&spec, "checkpoint", dtype),
            Some(c) => caramba_compiler::lower_model_cached(&spec, "checkpoint", dtype, c),
        }
        .map_err(|d| {
            Failure::usage(format!(
                "the checkpoint's model cannot be lowered{}:\n{}",
                if cache.is_some() {
                    " with this KV cache"
                } else {
                    ""
                },
                d.render(&ckpt.path().display().to_string(), "")
            ))
        })?;
        let cache_entries = lowered.cache;
        let mut graph = lowered.graph;
        let mut last_position = false;
        if last_only {
            let last = caramba_compiler::last_position(&graph, "logits").map_err(|e| {
                Failure::runtime(format!(
                    "internal error: selecting the last position failed: {e}"
                ))
            })?;
            if let Some(g) = last {
                graph = g;
                last_position = true;
            }
        }
        let expected: Vec<(String, Vec<usize>)> = graph
            .params()
            .map(|(name, id)| {
                let shape = graph
                    .node(id)
                    .ty
                    .shape
                    .dims()
                    .iter()
                    .map(|d| d.as_const().unwrap_or(0))
                    .collect();
                (name.to_string(), shape)
            })
            .collect();
        let report = ckpt
            .validate(expected.iter().map(|(n, s)| (n, s)))
            .map_err(|e| Failure::runtime(e.to_string()))?;
        if !report.missing.is_empty() || !report.shape_mismatches.is_empty() {
            return Err(Failure::runtime(format!(
                "checkpoint {} does not fit its model:\n{report}",
                ckpt.path().display()
            )));
        }
        let mut params = BTreeMap::new();
        for (name, _) in &expected {
            let (shape, data) = ckpt
                .tensor_f32(name)
                .map_err(|e| Failure::runtime(e.to_string()))?;
            // Rounded once to a half-precision model's dtype (and labelled
            // so), so the reference does not round them again every call.
            let t = match dtype {
                DType::BF16 | DType::F16 => {
                    let round = if dtype == DType::BF16 {
                        round_bf16
                    } else {
                        round_f16
                    };
                    let v = data.into_iter().map(round).collect();
                    Tensor::new(dtype, shape, Storage::F32(v))
                }
                _ => Tensor::f32(shape, data),
            };
            params.insert(name.clone(), t);
        }
        let exec = match backend {
            Backend::Cpu => Executor::new(backend, &graph, &params),
            _ => {
                let (fused, _) = caramba_compiler::optimize(&graph).map_err(|e| {
                    Failure::runtime(format!(
                        "internal error: optimizing the model failed: {e:?}"
                    ))
                })?;
                // The weights never change under a loaded model: values
                // made from them alone (merged projections' stacked
                // weights) are made once, here, and replace the weights
                // they were made from (`fold-weights`).
                let folded = caramba_compiler::fold_weights(&fused, &params).map_err(|e| {
                    Failure::runtime(format!("internal error: folding the model's weights: {e}"))
                })?;
                Executor::with_options(backend, &folded.graph, &folded.params, options)
            }
        }
        .map_err(|e| Failure::runtime(format!("cannot prepare the model on {backend}: {e}")))?;
        Ok(Model {
            graph,
            params,
            config,
            exec,
            cache: cache_entries,
            last_position,
        })
    }

    /// The per-op profile of a model loaded with `GpuOptions::profile`:
    /// slowest op kind first (empty on the CPU).
    pub fn profile(&self) -> Vec<caramba_runtime::gpu::OpProfile> {
        self.exec.profile()
    }

    pub fn backend(&self) -> Backend {
        self.exec.backend()
    }

    /// One step of cached generation for one sequence: logits [T, vocab]
    /// of the new tokens `ids` at the positions after the `cache.len()`
    /// cached ones; the cache gets this step's rows appended. On a GPU the
    /// cache stays in device memory from step to step: only the tokens go
    /// up and the logits come back.
    pub fn forward_cached(&self, ids: &[u32], cache: &mut KvCache) -> Result<Tensor, Failure> {
        let t = ids.len();
        let start = cache.len;
        let mut host = BTreeMap::new();
        host.insert(
            "input_ids".to_string(),
            Tensor::i32(vec![1, t], ids.iter().map(|&i| i as i32).collect()),
        );
        host.insert(
            "positions".to_string(),
            Tensor::i32(vec![t], (start as i32..(start + t) as i32).collect()),
        );
        let missing =
            |name: &str| Failure::runtime(format!("internal error: KV cache {name} is missing"));
        let failed = |e: caramba_runtime::backend::BackendError| {
            Failure::runtime(format!("forward pass failed: {e}"))
        };
        let logits = if self.exec.is_device() {
            let mut device = BTreeMap::new();
            for e in &self.cache {
                let key = format!("past.{}", e.name);
                match (cache.device.remove(&e.name), cache.host.remove(&e.name)) {
                    (Some(d), _) => {
                        device.insert(key, d);
                    }
                    (None, Some(h)) => {
                        host.insert(key, h);
                    }
                    (None, None) => return Err(missing(&e.name)),
                }
            }
            let syms = SymValues {
                b: Some(1),
                t: Some(t),
                p: Some(start),
                ..Default::default()
            };
            // Moved in: each cache is appended in place where its buffer
            // has room (`run_appending`).
            let mut out = self
                .exec
                .run_appending(&host, device, syms, cache.reserve)
                .map_err(failed)?;
            for e in &self.cache {
                let c = out
                    .remove(&format!("present.{}", e.name))
                    .ok_or_else(|| missing(&e.name))?;
                cache.device.insert(e.name.clone(), c);
            }
            let l = out.remove("logits").ok_or_else(|| missing("logits"))?;
            self.exec.download(&l).map_err(failed)?
        } else {
            let mut b = Bindings::new(&self.params)
                .sym(Sym::B, 1)
                .sym(Sym::T, t)
                .sym(Sym::P, start);
            for (k, v) in host {
                b = b.input(&k, v);
            }
            for e in &self.cache {
                let c = cache.host.remove(&e.name).ok_or_else(|| missing(&e.name))?;
                b = b.input(&format!("past.{}", e.name), c);
            }
            let mut out = self.exec.run(&b).map_err(failed)?;
            for e in &self.cache {
                let c = out
                    .remove(&format!("present.{}", e.name))
                    .ok_or_else(|| missing(&e.name))?;
                cache.host.insert(e.name.clone(), c);
            }
            out.remove("logits").ok_or_else(|| missing("logits"))?
        };
        cache.len += t;
        Ok(logits.reshaped(vec![t, self.config.vocab_size]))
    }

    /// The prompt `ids` through the model into `cache`, `chunk` tokens at
    /// a time (all at once when `None`), each chunk over the cache of the
    /// ones before: logits `[T, vocab]` of every prompt position when
    /// `keep_all`, else of the last chunk's positions only (the last row is
    /// the next token's).
    pub fn prefill(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        chunk: Option<usize>,
        keep_all: bool,
    ) -> Result<Tensor, Failure> {
        let chunk = chunk.unwrap_or(ids.len()).max(1);
        if ids.len() <= chunk {
            return self.forward_cached(ids, cache);
        }
        let vocab = self.config.vocab_size;
        let mut rows: Vec<f32> = Vec::new();
        let mut last = None;
        for part in ids.chunks(chunk) {
            let logits = self.forward_cached(part, cache)?;
            if keep_all {
                rows.extend_from_slice(logits.as_f32().expect("logits are f32"));
            } else {
                last = Some(logits);
            }
        }
        Ok(last.unwrap_or_else(|| Tensor::f32(vec![ids.len(), vocab], rows)))
    }

    /// The most prompt tokens one step's logits (f32, `T × vocab`) fit in
    /// the device's largest buffer (lavapipe: 128 MiB, 682 tokens of
    /// SmolLM2); `None` where the device has no such limit.
    pub fn largest_prefill(&self) -> Option<usize> {
        let max = self.backend().max_buffer_bytes()? as usize;
        Some((max / (self.config.vocab_size * 4)).max(1))
    }

    /// An empty KV cache for [`Model::forward_cached`].
    pub fn empty_cache(&self) -> KvCache {
        let host = self
            .cache
            .iter()
            .map(|e| {
                let t = match e.dtype {
                    DType::I32 => Tensor::i32(vec![1, 0, e.width], Vec::new()),
                    d => Tensor::from_f32_as(d, vec![1, 0, e.width], Vec::new()),
                };
                (e.name.clone(), t)
            })
            .collect();
        KvCache {
            host,
            device: BTreeMap::new(),
            len: 0,
            reserve: 0,
        }
    }

    /// Bytes the KV cache takes per token, as stored (a 16-bit format counts
    /// 2 bytes, though a backend may hold it widened).
    pub fn cache_bytes_per_token(&self) -> f64 {
        self.cache
            .iter()
            .map(|e| e.values as f64 * e.format.bytes_per_value())
            .sum()
    }

    /// Logits [1, vocab] of the last of `ids`, positions 0..T, without a
    /// cache: from the last-position graph where the model was loaded by
    /// [`Model::load_for_generation`], else the last row of
    /// [`Model::logits`].
    pub fn next_logits(&self, ids: &[u32]) -> Result<Tensor, Failure> {
        let v = self.config.vocab_size;
        if !self.last_position {
            let all = self.logits(ids)?;
            let rows = all.as_f32().expect("logits are f32");
            return Ok(Tensor::f32(vec![1, v], rows[rows.len() - v..].to_vec()));
        }
        Ok(self.forward(ids)?.reshaped(vec![1, v]))
    }

    /// Logits [T, vocab] for one sequence, positions 0..T.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor, Failure> {
        if self.last_position {
            return Err(Failure::runtime(
                "internal error: a model loaded for generation gives the last position's logits only (next_logits)",
            ));
        }
        Ok(self
            .forward(ids)?
            .reshaped(vec![ids.len(), self.config.vocab_size]))
    }

    /// The graph's `logits` for one sequence at positions 0..T, uncached
    /// (the last position's input bound where the graph reads it).
    fn forward(&self, ids: &[u32]) -> Result<Tensor, Failure> {
        let t = ids.len();
        let input = Tensor::i32(vec![1, t], ids.iter().map(|&i| i as i32).collect());
        let pos = Tensor::i32(vec![t], (0..t as i32).collect());
        let mut b = Bindings::new(&self.params)
            .sym(Sym::B, 1)
            .sym(Sym::T, t)
            .input("input_ids", input)
            .input("positions", pos);
        if self.last_position {
            let last = Tensor::i32(vec![1], vec![t as i32 - 1]);
            b = b.input(caramba_compiler::LAST_POSITION, last);
        }
        let mut out = self
            .exec
            .run(&b)
            .map_err(|e| Failure::runtime(format!("forward pass failed: {e}")))?;
        out.remove("logits")
            .ok_or_else(|| Failure::runtime("the model graph has no logits output"))
    }
}

/// The KV cache of one sequence: each cache tensor `[1, len, width]`, on
/// the host (CPU backend, or before the first GPU step) or on the device.
pub struct KvCache {
    host: BTreeMap<String, Tensor>,
    device: BTreeMap<String, DeviceTensor>,
    len: usize,
    /// Positions the device buffers are made for (see
    /// [`KvCache::reserve`]).
    reserve: usize,
}

impl KvCache {
    /// Makes room for `positions` cached positions in all, prompt
    /// included, where the cache lives on a device: its buffers are
    /// allocated once with room for them, and each step appends its rows
    /// in place. Without it (or past it) a buffer that is full is
    /// replaced by one half as large again, the cache copied once.
    pub fn reserve(&mut self, positions: usize) {
        self.reserve = self.reserve.max(positions);
    }

    /// Cached positions.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Opens a checkpoint, with a clear error for a wrong path.
pub fn open_checkpoint(path: &Path) -> Result<Checkpoint, Failure> {
    if !path.exists() {
        return Err(Failure::usage(format!(
            "checkpoint {} does not exist",
            path.display()
        )));
    }
    Checkpoint::open(path)
        .map_err(|e| Failure::usage(format!("cannot open checkpoint {}: {e}", path.display())))
}

/// The checkpoint's tokenizer: `--tokenizer` if given, the GGUF's own
/// metadata, or `tokenizer.json` next to the weights.
pub fn tokenizer_for(ckpt: &Checkpoint, explicit: Option<&Path>) -> Result<Tokenizer, Failure> {
    if let Some(p) = explicit {
        return Tokenizer::from_file(p)
            .map_err(|e| Failure::usage(format!("cannot load tokenizer {}: {e}", p.display())));
    }
    if ckpt.format() == CheckpointFormat::Gguf {
        let meta = ckpt.tokenizer.as_ref().ok_or_else(|| {
            Failure::usage(format!(
                "{} carries no tokenizer metadata; pass --tokenizer",
                ckpt.path().display()
            ))
        })?;
        return Tokenizer::from_gguf_meta(meta, &GgufTokenizerOptions::default()).map_err(|e| {
            Failure::runtime(format!(
                "cannot build the tokenizer from {}: {e}",
                ckpt.path().display()
            ))
        });
    }
    let dir = if ckpt.path().is_dir() {
        ckpt.path().to_path_buf()
    } else {
        ckpt.path().parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let p = dir.join("tokenizer.json");
    if !p.exists() {
        return Err(Failure::usage(format!(
            "no tokenizer.json in {}; pass --tokenizer",
            dir.display()
        )));
    }
    Tokenizer::from_file(&p)
        .map_err(|e| Failure::usage(format!("cannot load tokenizer {}: {e}", p.display())))
}
