//! Learning-rate schedules: an optional linear warmup, then constant, cosine
//! or linear decay to a floor. `lr_at(step)` is a pure function of the step,
//! so a resumed run gets the same rates without saving anything but the
//! schedule itself.
//!
//! Steps count optimizer steps from 0. Warmup ramps `lr·(step+1)/warmup`, so
//! the last warmup step reaches the peak; decay then runs from the peak at
//! `step = warmup` to the floor `min_lr_ratio·lr` at `step = total_steps`,
//! and stays there.

use serde::{Deserialize, Serialize};

/// The shape of the schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    Constant,
    Cosine,
    Linear,
}

/// A learning-rate schedule; saved in a checkpoint's `state.json`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedule {
    pub kind: ScheduleKind,
    /// The peak rate, reached at the end of warmup.
    pub lr: f64,
    pub warmup_steps: u64,
    /// Where decay reaches the floor; unused by `constant`.
    pub total_steps: u64,
    /// The floor as a fraction of `lr` (default 0.1); unused by `constant`.
    pub min_lr_ratio: f64,
}

impl LrSchedule {
    /// `lr` throughout (after warmup, if any).
    pub fn constant(lr: f64) -> Self {
        Self::new(ScheduleKind::Constant, lr, 0)
    }

    /// Cosine decay from `lr` to `0.1·lr` at `total_steps`.
    pub fn cosine(lr: f64, total_steps: u64) -> Self {
        Self::new(ScheduleKind::Cosine, lr, total_steps)
    }

    /// Linear decay from `lr` to `0.1·lr` at `total_steps`.
    pub fn linear(lr: f64, total_steps: u64) -> Self {
        Self::new(ScheduleKind::Linear, lr, total_steps)
    }

    /// `kind` without warmup and with the default floor.
    pub fn new(kind: ScheduleKind, lr: f64, total_steps: u64) -> Self {
        LrSchedule {
            kind,
            lr,
            warmup_steps: 0,
            total_steps,
            min_lr_ratio: 0.1,
        }
    }

    pub fn with_warmup(mut self, warmup_steps: u64) -> Self {
        self.warmup_steps = warmup_steps;
        self
    }

    pub fn with_min_lr_ratio(mut self, ratio: f64) -> Self {
        self.min_lr_ratio = ratio;
        self
    }

    /// The learning rate for optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        if self.kind == ScheduleKind::Constant {
            return self.lr;
        }
        let floor = self.lr * self.min_lr_ratio;
        let decay_steps = self.total_steps.saturating_sub(self.warmup_steps);
        let done = step - self.warmup_steps;
        if done >= decay_steps {
            return floor;
        }
        // Written as a fall from the peak so that step `warmup` gives `lr`
        // exactly; the end is the floor exactly by the branch above.
        let progress = done as f64 / decay_steps as f64;
        let fall = match self.kind {
            ScheduleKind::Constant => 0.0,
            ScheduleKind::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * progress).cos()),
            ScheduleKind::Linear => progress,
        };
        self.lr - (self.lr - floor) * fall
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_with_warmup() {
        let s = LrSchedule::constant(1e-3).with_warmup(4);
        assert_eq!(s.lr_at(0), 1e-3 * 0.25);
        assert_eq!(s.lr_at(1), 1e-3 * 0.5);
        assert_eq!(s.lr_at(3), 1e-3);
        assert_eq!(s.lr_at(4), 1e-3);
        assert_eq!(s.lr_at(1_000_000), 1e-3);
        assert_eq!(LrSchedule::constant(0.5).lr_at(0), 0.5);
    }

    #[test]
    fn cosine_boundaries() {
        // Warmup 10, decay over steps 10..110 to a floor of 0.1.
        let s = LrSchedule::cosine(1.0, 110).with_warmup(10);
        assert_eq!(s.lr_at(0), 0.1);
        assert_eq!(s.lr_at(4), 0.5);
        assert_eq!(s.lr_at(9), 1.0);
        assert_eq!(s.lr_at(10), 1.0);
        // Halfway the cosine term is 0: the midpoint of peak and floor.
        assert!((s.lr_at(60) - 0.55).abs() < 1e-15);
        assert_eq!(s.lr_at(110), 0.1);
        assert_eq!(s.lr_at(500), 0.1);
        // A quarter of the way: 0.1 + 0.9·(1 + cos(π/4))/2.
        let quarter = 0.1 + 0.9 * 0.5 * (1.0 + std::f64::consts::FRAC_1_SQRT_2);
        assert!((s.lr_at(35) - quarter).abs() < 1e-15);
        // Monotone after warmup.
        assert!((10..110).all(|t| s.lr_at(t + 1) <= s.lr_at(t)));
    }

    #[test]
    fn linear_boundaries_and_floor() {
        let s = LrSchedule::linear(2.0, 100).with_min_lr_ratio(0.0);
        assert_eq!(s.lr_at(0), 2.0);
        assert_eq!(s.lr_at(50), 1.0);
        assert_eq!(s.lr_at(100), 0.0);
        assert_eq!(s.lr_at(101), 0.0);
        let s = LrSchedule::linear(2.0, 100);
        assert_eq!(s.lr_at(100), 0.2);
        assert!((s.lr_at(25) - (2.0 - 1.8 * 0.25)).abs() < 1e-15);
    }

    #[test]
    fn total_within_warmup_goes_to_the_floor() {
        let s = LrSchedule::cosine(1.0, 5).with_warmup(10);
        assert_eq!(s.lr_at(9), 1.0);
        assert_eq!(s.lr_at(10), 0.1);
    }
}
