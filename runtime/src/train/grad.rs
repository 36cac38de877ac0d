//! Gradient utilities between backward and the optimizer: global-norm
//! clipping and accumulation over micro-batches.

use rayon::prelude::*;

use super::{f32_data, with_f32_mut, Params};

/// The L2 norm of all gradients taken together, accumulated in f64.
pub fn global_grad_norm(grads: &Params) -> f64 {
    grads
        .par_iter()
        .map(|(name, g)| {
            f32_data(g, name)
                .iter()
                .map(|&x| (x as f64) * (x as f64))
                .sum::<f64>()
        })
        .sum::<f64>()
        .sqrt()
}

/// Scales all gradients so their global norm is at most `max_norm`, and
/// returns the norm before clipping (what to log).
///
/// As in PyTorch's `clip_grad_norm_`, the factor is
/// `max_norm / (norm + 1e-6)` and only applied when below 1. A non-finite
/// norm leaves the gradients untouched: the caller should skip the step.
pub fn clip_grad_norm(grads: &mut Params, max_norm: f64) -> f64 {
    let norm = global_grad_norm(grads);
    if let Some(factor) = clip_factor(norm, max_norm) {
        scale_grads(grads, factor as f32);
    }
    norm
}

/// The factor [`clip_grad_norm`] scales by for a global norm `norm`, or
/// `None` when it leaves the gradients alone. The device trainer folds it
/// into its optimizer launch instead of scaling the gradients.
pub fn clip_factor(norm: f64, max_norm: f64) -> Option<f64> {
    let factor = max_norm / (norm + 1e-6);
    (norm.is_finite() && factor < 1.0).then_some(factor)
}

/// Multiplies every gradient by `factor`.
pub fn scale_grads(grads: &mut Params, factor: f32) {
    grads.par_iter_mut().for_each(|(name, g)| {
        with_f32_mut(g, name, |data| data.iter_mut().for_each(|x| *x *= factor));
    });
}

/// Sums the gradients of micro-batches; [`GradAccumulator::take_mean`]
/// gives their mean for one optimizer step (gradient accumulation).
#[derive(Debug, Default)]
pub struct GradAccumulator {
    sum: Params,
    count: usize,
}

impl GradAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one micro-batch's gradients. A parameter seen for the first time
    /// is taken as is (no copy).
    ///
    /// # Panics
    /// If a gradient changes shape between micro-batches.
    pub fn add(&mut self, grads: Params) {
        for (name, g) in grads {
            match self.sum.get_mut(&name) {
                None => {
                    self.sum.insert(name, g);
                }
                Some(acc) => {
                    assert_eq!(
                        acc.shape(),
                        g.shape(),
                        "gradient of `{name}` changed shape between micro-batches"
                    );
                    let add = f32_data(&g, &name);
                    with_f32_mut(acc, &name, |a| {
                        a.iter_mut().zip(add).for_each(|(a, &b)| *a += b)
                    });
                }
            }
        }
        self.count += 1;
    }

    /// Micro-batches added since the last [`GradAccumulator::take_mean`].
    pub fn count(&self) -> usize {
        self.count
    }

    /// The mean gradient (sum scaled by 1/count), leaving the accumulator
    /// empty for the next step. Empty when nothing was added.
    pub fn take_mean(&mut self) -> Params {
        let mut sum = std::mem::take(&mut self.sum);
        if self.count > 1 {
            scale_grads(&mut sum, 1.0 / self.count as f32);
        }
        self.count = 0;
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use caramba_ir::reference::Tensor;

    fn grads(a: Vec<f32>, b: Vec<f32>) -> Params {
        Params::from([
            ("a".to_string(), Tensor::f32(vec![a.len()], a)),
            ("b".to_string(), Tensor::f32(vec![1, b.len()], b)),
        ])
    }

    #[test]
    fn clipping_scales_to_max_norm_and_returns_the_norm_before() {
        // Norm √(3² + 4² + 12²) = 13.
        let mut g = grads(vec![3.0, 4.0], vec![12.0]);
        let norm = clip_grad_norm(&mut g, 1.0);
        assert_eq!(norm, 13.0);
        let f = 1.0 / (13.0 + 1e-6);
        assert_eq!(
            g["a"].as_f32().unwrap(),
            &[(3.0 * f) as f32, (4.0 * f) as f32]
        );
        assert_eq!(g["b"].as_f32().unwrap(), &[(12.0 * f) as f32]);
        assert!((global_grad_norm(&g) - 1.0).abs() < 1e-6);
    }

    #[test]
    fn clipping_leaves_small_and_non_finite_gradients_alone() {
        let mut g = grads(vec![3.0, 4.0], vec![12.0]);
        assert_eq!(clip_grad_norm(&mut g, 13.5), 13.0);
        assert_eq!(g, grads(vec![3.0, 4.0], vec![12.0]));
        let mut g = grads(vec![f32::NAN, 4.0], vec![12.0]);
        assert!(clip_grad_norm(&mut g, 1.0).is_nan());
        assert_eq!(g["b"].as_f32().unwrap(), &[12.0]);
    }

    #[test]
    fn accumulation_averages_micro_batches() {
        let mut acc = GradAccumulator::new();
        acc.add(grads(vec![1.0, 2.0], vec![3.0]));
        acc.add(grads(vec![3.0, 6.0], vec![-1.0]));
        assert_eq!(acc.count(), 2);
        let mean = acc.take_mean();
        assert_eq!(mean, grads(vec![2.0, 4.0], vec![1.0]));
        assert_eq!(acc.count(), 0);
        assert!(acc.take_mean().is_empty());
    }
}
