//! Optimizers over named f32 parameters: AdamW, Lion and SGD, each matching
//! its PyTorch counterpart (`torch.optim.AdamW`, lucidrains' `lion-pytorch`,
//! `torch.optim.SGD`) so loss curves can be compared with PyTorch's.
//!
//! Each parameter is updated in one fused pass (one loop over its elements
//! that updates the moments and the weight together); parameters are spread
//! over threads with rayon. Weight decay skips 1-D parameters (norm weights,
//! biases, gate logits) and, unless `decay_embeddings` is set, embedding
//! tables. The state (moments per parameter, step count) is plain data that
//! training checkpoints save as `<param>.m` and `<param>.v`.

use std::collections::BTreeMap;

use caramba_ir::reference::Tensor;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::{f32_data, with_f32_mut, Params};

/// Which update rule an optimizer applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    Adamw,
    Lion,
    Sgd,
}

/// An optimizer's kind and hyperparameters (the learning rate comes from the
/// schedule at each step). Serialized into a checkpoint's `state.json` with
/// the kind as a `kind` field.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// Adam with decoupled weight decay (Loshchilov and Hutter) and bias
    /// correction.
    Adamw {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        decay_embeddings: bool,
    },
    /// Lion (Chen et al., 2023): the sign of an interpolated momentum, with
    /// decoupled weight decay.
    Lion {
        beta1: f64,
        beta2: f64,
        weight_decay: f64,
        decay_embeddings: bool,
    },
    /// Stochastic gradient descent, with heavy-ball momentum when
    /// `momentum > 0`. As in PyTorch, weight decay is added to the gradient
    /// (L2), not decoupled.
    Sgd {
        momentum: f64,
        weight_decay: f64,
        decay_embeddings: bool,
    },
}

impl OptimizerConfig {
    /// `kind` with its default hyperparameters: AdamW β = (0.9, 0.95),
    /// ε = 1e-8; Lion β = (0.9, 0.99); SGD without momentum. Embeddings are
    /// not decayed.
    pub fn new(kind: OptimizerKind, weight_decay: f64) -> Self {
        match kind {
            OptimizerKind::Adamw => Self::adamw(weight_decay),
            OptimizerKind::Lion => Self::lion(weight_decay),
            OptimizerKind::Sgd => Self::sgd(0.0, weight_decay),
        }
    }

    pub fn adamw(weight_decay: f64) -> Self {
        OptimizerConfig::Adamw {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay,
            decay_embeddings: false,
        }
    }

    pub fn lion(weight_decay: f64) -> Self {
        OptimizerConfig::Lion {
            beta1: 0.9,
            beta2: 0.99,
            weight_decay,
            decay_embeddings: false,
        }
    }

    pub fn sgd(momentum: f64, weight_decay: f64) -> Self {
        OptimizerConfig::Sgd {
            momentum,
            weight_decay,
            decay_embeddings: false,
        }
    }

    /// The same configuration, decaying embedding tables or not.
    pub fn with_decay_embeddings(mut self, decay: bool) -> Self {
        match &mut self {
            OptimizerConfig::Adamw {
                decay_embeddings, ..
            }
            | OptimizerConfig::Lion {
                decay_embeddings, ..
            }
            | OptimizerConfig::Sgd {
                decay_embeddings, ..
            } => *decay_embeddings = decay,
        }
        self
    }

    pub fn kind(&self) -> OptimizerKind {
        match self {
            OptimizerConfig::Adamw { .. } => OptimizerKind::Adamw,
            OptimizerConfig::Lion { .. } => OptimizerKind::Lion,
            OptimizerConfig::Sgd { .. } => OptimizerKind::Sgd,
        }
    }

    pub fn weight_decay(&self) -> f64 {
        match *self {
            OptimizerConfig::Adamw { weight_decay, .. }
            | OptimizerConfig::Lion { weight_decay, .. }
            | OptimizerConfig::Sgd { weight_decay, .. } => weight_decay,
        }
    }

    pub fn decay_embeddings(&self) -> bool {
        match *self {
            OptimizerConfig::Adamw {
                decay_embeddings, ..
            }
            | OptimizerConfig::Lion {
                decay_embeddings, ..
            }
            | OptimizerConfig::Sgd {
                decay_embeddings, ..
            } => decay_embeddings,
        }
    }

    /// Whether weight decay applies to the parameter `name` of this shape:
    /// never to 1-D parameters, to embeddings only if asked.
    pub fn decays(&self, name: &str, shape: &[usize]) -> bool {
        self.weight_decay() != 0.0
            && shape.len() >= 2
            && (self.decay_embeddings() || !is_embedding(name))
    }

    /// The state buffers kept per parameter, by suffix: AdamW's first and
    /// second moments, Lion's and SGD's momentum.
    pub fn buffers(&self) -> &'static [&'static str] {
        match *self {
            OptimizerConfig::Adamw { .. } => &["m", "v"],
            OptimizerConfig::Lion { .. } => &["m"],
            OptimizerConfig::Sgd { momentum, .. } if momentum != 0.0 => &["m"],
            OptimizerConfig::Sgd { .. } => &[],
        }
    }
}

/// Whether `name` is an embedding table (token or position embeddings):
/// a dotted segment containing `embed` (`model.embed_tokens.weight`), or
/// GPT-2's `wte` / `wpe`.
pub fn is_embedding(name: &str) -> bool {
    name.split('.')
        .any(|seg| seg.contains("embed") || seg == "wte" || seg == "wpe")
}

/// One parameter's optimizer state: up to two buffers of its size.
#[derive(Clone, Debug, PartialEq)]
struct ParamState {
    shape: Vec<usize>,
    /// First moment (AdamW), momentum (Lion, SGD); empty when unused.
    m: Vec<f32>,
    /// Second moment (AdamW); empty otherwise.
    v: Vec<f32>,
}

/// An optimizer with its state, updating parameters in place.
#[derive(Clone, Debug, PartialEq)]
pub struct Optimizer {
    config: OptimizerConfig,
    /// Optimizer steps taken so far (AdamW's bias correction uses it).
    step: u64,
    state: BTreeMap<String, ParamState>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Self {
        Optimizer {
            config,
            step: 0,
            state: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &OptimizerConfig {
        &self.config
    }

    /// Steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One optimizer step at learning rate `lr`: every parameter with a
    /// gradient in `grads` is updated; parameters without one (frozen ones)
    /// are left as they are, and their state with them.
    ///
    /// # Panics
    /// If a gradient names no parameter, has another shape than its
    /// parameter, or either is not stored as f32: these are bugs in the
    /// caller, not user errors.
    pub fn step(&mut self, params: &mut Params, grads: &Params, lr: f64) {
        for (name, g) in grads {
            let p = params
                .get(name)
                .unwrap_or_else(|| panic!("gradient for `{name}`, which is not a parameter"));
            assert_eq!(
                p.shape(),
                g.shape(),
                "gradient of `{name}` has shape {:?}, the parameter {:?}",
                g.shape(),
                p.shape()
            );
        }
        self.step += 1;
        let buffers = self.config.buffers();
        for name in grads.keys() {
            let shape = params[name].shape();
            self.state
                .entry(name.clone())
                .or_insert_with(|| ParamState::zeros(shape, buffers));
        }

        let mut states: BTreeMap<&str, &mut ParamState> = self
            .state
            .iter_mut()
            .map(|(name, s)| (name.as_str(), s))
            .collect();
        let work: Vec<(&str, &mut Tensor, &Tensor, &mut ParamState)> = params
            .iter_mut()
            .filter_map(|(name, p)| {
                let g = grads.get(name)?;
                let s = states
                    .remove(name.as_str())
                    .expect("state was created above");
                Some((name.as_str(), p, g, s))
            })
            .collect();

        let rule = Rule::new(&self.config, self.step, lr);
        work.into_par_iter().for_each(|(name, p, g, s)| {
            let decay = self.config.decays(name, p.shape());
            let g = f32_data(g, name);
            with_f32_mut(p, name, |w| rule.apply(decay, w, g, s));
        });
    }

    /// The state as named buffers in name order: `<param>.m`, `<param>.v`,
    /// each with its parameter's shape.
    pub fn state_buffers(&self) -> Vec<(String, &[usize], &[f32])> {
        let mut out = Vec::new();
        for (name, s) in &self.state {
            for &suffix in self.config.buffers() {
                let data = if suffix == "m" { &s.m } else { &s.v };
                out.push((
                    format!("{name}.{suffix}"),
                    s.shape.as_slice(),
                    data.as_slice(),
                ));
            }
        }
        out
    }

    /// The moments of one parameter (empty slices for unused buffers), or
    /// `None` before its first update.
    pub fn param_state(&self, name: &str) -> Option<(&[f32], &[f32])> {
        self.state
            .get(name)
            .map(|s| (s.m.as_slice(), s.v.as_slice()))
    }

    /// Rebuilds an optimizer from saved state: `step` steps taken and the
    /// buffers of [`Optimizer::state_buffers`]. Each buffer must belong to a
    /// parameter in `params` and have its shape; a parameter has either all
    /// of its kind's buffers or none (never updated). The error says which
    /// buffer is wrong.
    pub fn from_state(
        config: OptimizerConfig,
        step: u64,
        buffers: impl IntoIterator<Item = (String, Tensor)>,
        params: &[(String, Vec<usize>)],
    ) -> Result<Self, String> {
        let kinds = config.buffers();
        let shapes: BTreeMap<&str, &[usize]> = params
            .iter()
            .map(|(n, s)| (n.as_str(), s.as_slice()))
            .collect();
        let mut state: BTreeMap<String, ParamState> = BTreeMap::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (key, tensor) in buffers {
            let (param, suffix) = key
                .rsplit_once('.')
                .filter(|(_, s)| kinds.contains(s))
                .ok_or_else(|| {
                    format!(
                        "unexpected optimizer tensor `{key}` ({:?} keeps {})",
                        config.kind(),
                        describe_buffers(kinds)
                    )
                })?;
            let shape = *shapes
                .get(param)
                .ok_or_else(|| format!("optimizer tensor `{key}` belongs to no parameter"))?;
            if tensor.shape() != shape {
                return Err(format!(
                    "optimizer tensor `{key}` has shape {:?}, its parameter {shape:?}",
                    tensor.shape()
                ));
            }
            let data = f32_data(&tensor, &key).to_vec();
            let entry = state
                .entry(param.to_string())
                .or_insert_with(|| ParamState {
                    shape: shape.to_vec(),
                    m: Vec::new(),
                    v: Vec::new(),
                });
            if suffix == "m" {
                entry.m = data;
            } else {
                entry.v = data;
            }
            *seen.entry(param.to_string()).or_default() += 1;
        }
        if let Some((param, _)) = seen.iter().find(|(_, &n)| n != kinds.len()) {
            return Err(format!(
                "parameter `{param}` has only part of its optimizer state ({:?} keeps {})",
                config.kind(),
                describe_buffers(kinds)
            ));
        }
        Ok(Optimizer {
            config,
            step,
            state,
        })
    }
}

fn describe_buffers(kinds: &[&str]) -> String {
    if kinds.is_empty() {
        "no state".into()
    } else {
        kinds
            .iter()
            .map(|k| format!("`<param>.{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl ParamState {
    fn zeros(shape: &[usize], buffers: &[&str]) -> Self {
        let n = shape.iter().product();
        let buf = |s: &str| {
            if buffers.contains(&s) {
                vec![0.0; n]
            } else {
                Vec::new()
            }
        };
        ParamState {
            shape: shape.to_vec(),
            m: buf("m"),
            v: buf("v"),
        }
    }
}

/// One step's update rule with its scalars precomputed in f64 and rounded to
/// f32 once, so the per-element loop is pure f32. The device optimizer
/// (`gpu::train`) launches its kernels with these same scalars.
#[derive(Clone, Copy)]
pub(crate) enum Rule {
    Adamw {
        b1: f32,
        b2: f32,
        one_minus_b1: f32,
        one_minus_b2: f32,
        eps: f32,
        /// lr / (1 − β1^t)
        step_size: f32,
        /// √(1 − β2^t)
        bc2_sqrt: f32,
        /// 1 − lr·wd
        decay_factor: f32,
    },
    Lion {
        b1: f32,
        b2: f32,
        one_minus_b1: f32,
        one_minus_b2: f32,
        lr: f32,
        decay_factor: f32,
    },
    Sgd {
        momentum: f32,
        lr: f32,
        wd: f32,
    },
}

impl Rule {
    pub(crate) fn new(config: &OptimizerConfig, t: u64, lr: f64) -> Self {
        let decay_factor = (1.0 - lr * config.weight_decay()) as f32;
        match *config {
            OptimizerConfig::Adamw {
                beta1, beta2, eps, ..
            } => {
                let t = t.min(i32::MAX as u64) as i32;
                Rule::Adamw {
                    b1: beta1 as f32,
                    b2: beta2 as f32,
                    one_minus_b1: (1.0 - beta1) as f32,
                    one_minus_b2: (1.0 - beta2) as f32,
                    eps: eps as f32,
                    step_size: (lr / (1.0 - beta1.powi(t))) as f32,
                    bc2_sqrt: (1.0 - beta2.powi(t)).sqrt() as f32,
                    decay_factor,
                }
            }
            OptimizerConfig::Lion { beta1, beta2, .. } => Rule::Lion {
                b1: beta1 as f32,
                b2: beta2 as f32,
                one_minus_b1: (1.0 - beta1) as f32,
                one_minus_b2: (1.0 - beta2) as f32,
                lr: lr as f32,
                decay_factor,
            },
            OptimizerConfig::Sgd {
                momentum,
                weight_decay,
                ..
            } => Rule::Sgd {
                momentum: momentum as f32,
                lr: lr as f32,
                wd: weight_decay as f32,
            },
        }
    }

    /// Updates one parameter `w` from its gradient `g` and state `s` in a
    /// single pass; `decay` says whether weight decay applies to it.
    fn apply(&self, decay: bool, w: &mut [f32], g: &[f32], s: &mut ParamState) {
        match *self {
            Rule::Adamw {
                b1,
                b2,
                one_minus_b1,
                one_minus_b2,
                eps,
                step_size,
                bc2_sqrt,
                decay_factor,
            } => {
                let keep = if decay { decay_factor } else { 1.0 };
                for (((w, &g), m), v) in w.iter_mut().zip(g).zip(&mut s.m).zip(&mut s.v) {
                    *m = b1 * *m + one_minus_b1 * g;
                    *v = b2 * *v + one_minus_b2 * g * g;
                    *w = *w * keep - step_size * *m / (v.sqrt() / bc2_sqrt + eps);
                }
            }
            Rule::Lion {
                b1,
                b2,
                one_minus_b1,
                one_minus_b2,
                lr,
                decay_factor,
            } => {
                let keep = if decay { decay_factor } else { 1.0 };
                for ((w, &g), m) in w.iter_mut().zip(g).zip(&mut s.m) {
                    let c = b1 * *m + one_minus_b1 * g;
                    *w = *w * keep - lr * sign(c);
                    *m = b2 * *m + one_minus_b2 * g;
                }
            }
            Rule::Sgd { momentum, lr, wd } => {
                let wd = if decay { wd } else { 0.0 };
                if s.m.is_empty() {
                    for (w, &g) in w.iter_mut().zip(g) {
                        *w -= lr * (g + wd * *w);
                    }
                } else {
                    for ((w, &g), b) in w.iter_mut().zip(g).zip(&mut s.m) {
                        *b = momentum * *b + (g + wd * *w);
                        *w -= lr * *b;
                    }
                }
            }
        }
    }
}

/// The sign with sign(0) = 0, as `torch.sign` (f32::signum gives ±1 for ±0).
fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(name: &str, shape: Vec<usize>, data: Vec<f32>) -> Params {
        Params::from([(name.to_string(), Tensor::f32(shape, data))])
    }

    fn value(params: &Params, name: &str) -> Vec<f32> {
        params[name].as_f32().unwrap().to_vec()
    }

    fn close(got: f32, want: f64) {
        assert!(
            (got as f64 - want).abs() < 1e-6,
            "got {got}, expected {want}"
        );
    }

    /// AdamW, lr 0.1, wd 0.1, β = (0.9, 0.95), a 1×1 weight starting at 1.
    /// Step 1, g = 0.5: m = 0.05, v = 0.0125, m̂ = 0.5, v̂ = 0.25, so
    /// w = 1·(1 − 0.01) − 0.1·0.5/(0.5 + 1e-8) = 0.89 (+2e-9).
    /// Step 2, g = −0.25: m = 0.02, v = 0.015, m̂ = 0.02/0.19,
    /// v̂ = 0.015/0.0975, w = 0.89·0.99 − 0.1·m̂/√v̂ = 0.854263058.
    /// Step 3, g = 0.1: m = 0.028, v = 0.01475, w = 0.813591920.
    #[test]
    fn adamw_matches_hand_computed_steps() {
        let mut opt = Optimizer::new(OptimizerConfig::adamw(0.1));
        let mut p = one("w", vec![1, 1], vec![1.0]);
        let expected = [
            (0.5, 0.890_000_002, 0.05, 0.0125),
            (-0.25, 0.854_263_057_856, 0.02, 0.015),
            (0.1, 0.813_591_920_203, 0.028, 0.01475),
        ];
        for (g, w, m, v) in expected {
            opt.step(&mut p, &one("w", vec![1, 1], vec![g]), 0.1);
            close(value(&p, "w")[0], w);
            let (sm, sv) = opt.param_state("w").unwrap();
            close(sm[0], m);
            close(sv[0], v);
        }
        assert_eq!(opt.step_count(), 3);
    }

    /// The same steps on a bias (1-D): no decay, so step 1 gives
    /// 1 − 0.1·0.5/(0.5 + 1e-8) = 0.9, then 0.873163058, 0.841034551.
    #[test]
    fn adamw_does_not_decay_1d_parameters() {
        let mut opt = Optimizer::new(OptimizerConfig::adamw(0.1));
        let mut p = one("b", vec![1], vec![1.0]);
        for (g, w) in [
            (0.5, 0.900_000_002),
            (-0.25, 0.873_163_057_876),
            (0.1, 0.841_034_550_801),
        ] {
            opt.step(&mut p, &one("b", vec![1], vec![g]), 0.1);
            close(value(&p, "b")[0], w);
        }
    }

    /// Lion, lr 0.1, wd 0.1, β = (0.9, 0.99), a 1×1 weight starting at 1.
    /// Step 1, g = 0.5: c = 0.05 > 0, w = 0.99 − 0.1 = 0.89, m = 0.005.
    /// Step 2, g = −0.25: c = 0.0045 − 0.025 < 0, w = 0.8811 + 0.1 = 0.9811,
    /// m = 0.00245.
    /// Step 3, g = 0.1: c = 0.012205 > 0, w = 0.971289 − 0.1 = 0.871289.
    #[test]
    fn lion_matches_hand_computed_steps() {
        let mut opt = Optimizer::new(OptimizerConfig::lion(0.1));
        let mut p = one("w", vec![1, 1], vec![1.0]);
        for (g, w, m) in [
            (0.5, 0.89, 0.005),
            (-0.25, 0.9811, 0.00245),
            (0.1, 0.871289, 0.0034255),
        ] {
            opt.step(&mut p, &one("w", vec![1, 1], vec![g]), 0.1);
            close(value(&p, "w")[0], w);
            close(opt.param_state("w").unwrap().0[0], m);
        }
    }

    #[test]
    fn lion_sign_of_zero_is_zero() {
        let mut opt = Optimizer::new(OptimizerConfig::lion(0.0));
        let mut p = one("w", vec![1, 2], vec![1.0, 1.0]);
        opt.step(&mut p, &one("w", vec![1, 2], vec![0.0, 2.0]), 0.1);
        assert_eq!(value(&p, "w"), vec![1.0, 0.9]);
    }

    /// SGD with momentum 0.9 and L2 decay 0.1, lr 0.1, w = 1:
    /// step 1, g = 1: d = 1.1, b = 1.1, w = 0.89;
    /// step 2, g = 1: d = 1.089, b = 0.99 + 1.089 = 2.079, w = 0.6821.
    #[test]
    fn sgd_momentum_matches_hand_computed_steps() {
        let mut opt = Optimizer::new(OptimizerConfig::sgd(0.9, 0.1));
        let mut p = one("w", vec![1, 1], vec![1.0]);
        for w in [0.89, 0.6821] {
            opt.step(&mut p, &one("w", vec![1, 1], vec![1.0]), 0.1);
            close(value(&p, "w")[0], w);
        }
        // Plain SGD keeps no state.
        let mut plain = Optimizer::new(OptimizerConfig::sgd(0.0, 0.0));
        plain.step(&mut p, &one("w", vec![1, 1], vec![1.0]), 0.5);
        close(value(&p, "w")[0], 0.1821);
        assert!(plain.state_buffers().is_empty());
    }

    #[test]
    fn weight_decay_exclusions() {
        let c = OptimizerConfig::adamw(0.1);
        assert!(c.decays("model.layers.0.self_attn.q_proj.weight", &[4, 4]));
        assert!(c.decays("lm_head.weight", &[10, 4]));
        assert!(!c.decays("model.layers.0.input_layernorm.weight", &[4]));
        assert!(!c.decays("model.layers.0.mlp.gate_proj.bias", &[4]));
        assert!(!c.decays("model.embed_tokens.weight", &[10, 4]));
        assert!(!c.decays("transformer.wpe.weight", &[10, 4]));
        let c = c.with_decay_embeddings(true);
        assert!(c.decays("model.embed_tokens.weight", &[10, 4]));
        assert!(!c.decays("model.norm.weight", &[4]));
        assert!(!OptimizerConfig::adamw(0.0).decays("w", &[4, 4]));

        // Through a step with a zero gradient only decay moves the weights.
        for config in [OptimizerConfig::adamw(0.5), OptimizerConfig::lion(0.5)] {
            let mut opt = Optimizer::new(config);
            let mut params = Params::new();
            for name in [
                "model.embed_tokens.weight",
                "model.norm.weight",
                "proj.weight",
            ] {
                let shape = if name == "model.norm.weight" {
                    vec![2]
                } else {
                    vec![1, 2]
                };
                params.insert(name.into(), Tensor::f32(shape, vec![2.0, 2.0]));
            }
            let grads: Params = params
                .iter()
                .map(|(n, t)| (n.clone(), Tensor::f32(t.shape().to_vec(), vec![0.0, 0.0])))
                .collect();
            opt.step(&mut params, &grads, 0.1);
            assert_eq!(value(&params, "model.embed_tokens.weight"), vec![2.0, 2.0]);
            assert_eq!(value(&params, "model.norm.weight"), vec![2.0, 2.0]);
            assert_eq!(value(&params, "proj.weight"), vec![1.9, 1.9], "{config:?}");
        }
    }

    #[test]
    fn parameters_without_gradients_are_frozen() {
        let mut opt = Optimizer::new(OptimizerConfig::adamw(0.1));
        let mut params = one("a", vec![1, 1], vec![1.0]);
        params.insert("b".into(), Tensor::f32(vec![1, 1], vec![1.0]));
        opt.step(&mut params, &one("a", vec![1, 1], vec![0.5]), 0.1);
        assert_eq!(value(&params, "b"), vec![1.0]);
        assert!(opt.param_state("b").is_none());
        let names: Vec<String> = opt.state_buffers().into_iter().map(|b| b.0).collect();
        assert_eq!(names, ["a.m", "a.v"]);
    }

    #[test]
    #[should_panic(expected = "gradient of `a` has shape")]
    fn gradient_shape_mismatch_panics() {
        let mut opt = Optimizer::new(OptimizerConfig::adamw(0.1));
        let mut params = one("a", vec![1, 2], vec![1.0, 1.0]);
        opt.step(&mut params, &one("a", vec![2, 1], vec![0.5, 0.5]), 0.1);
    }

    #[test]
    fn state_round_trips_through_buffers() {
        let mut opt = Optimizer::new(OptimizerConfig::adamw(0.1));
        let mut params = one("x.weight", vec![2, 2], vec![1.0, -2.0, 3.0, 0.5]);
        let grads = one("x.weight", vec![2, 2], vec![0.1, 0.2, -0.3, 0.4]);
        opt.step(&mut params, &grads, 0.01);
        let shapes = vec![("x.weight".to_string(), vec![2, 2])];
        let buffers = opt
            .state_buffers()
            .into_iter()
            .map(|(n, s, d)| (n, Tensor::f32(s.to_vec(), d.to_vec())));
        let back =
            Optimizer::from_state(*opt.config(), opt.step_count(), buffers, &shapes).unwrap();
        assert_eq!(back, opt);

        let stray = vec![(
            "x.weight.q".to_string(),
            Tensor::f32(vec![2, 2], vec![0.0; 4]),
        )];
        let err = Optimizer::from_state(*opt.config(), 1, stray, &shapes).unwrap_err();
        assert!(
            err.contains("unexpected optimizer tensor `x.weight.q`"),
            "{err}"
        );
        let half = vec![(
            "x.weight.m".to_string(),
            Tensor::f32(vec![2, 2], vec![0.0; 4]),
        )];
        let err = Optimizer::from_state(*opt.config(), 1, half, &shapes).unwrap_err();
        assert!(err.contains("only part of its optimizer state"), "{err}");
    }

    #[test]
    fn config_serializes_with_its_kind() {
        let json = serde_json::to_string(&OptimizerConfig::lion(0.1)).unwrap();
        assert_eq!(
            json,
            r#"{"kind":"lion","beta1":0.9,"beta2":0.99,"weight_decay":0.1,"decay_embeddings":false}"#
        );
        let back: OptimizerConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(back, OptimizerConfig::lion(0.1));
    }
}
