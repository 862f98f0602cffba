//! Learning-rate schedules with linear warm-up, exactly as transformers defines them.
//!
//! The learning rate of optimizer step `s` (0-based) is `base_lr * factor(s)`, as torch's
//! `LambdaLR` gives it, with `factor` the `lr_lambda` of
//! `transformers.get_{constant,linear,cosine}_schedule_with_warmup`:
//!
//! ```text
//! warm-up (s < W):  s / max(1, W)                         (so step 0 runs at lr 0 when W > 0)
//! constant:         1
//! linear:           max(0, (T - s) / max(1, T - W))
//! cosine:           max(0, 0.5 * (1 + cos(π * c * 2 * (s - W) / max(1, T - W))))   c = 0.5
//! ```
//!
//! with `W` the warm-up steps and `T` the total optimizer steps (past `T`, the cosine rises
//! again, as transformers' does; the trainer never goes past `T`). The arithmetic is Python's (f64,
//! the same operation order), so the factors are bit-identical to transformers'.

use serde::{Deserialize, Serialize};

/// The shape of the schedule after warm-up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// `get_constant_schedule_with_warmup`.
    Constant,
    /// `get_linear_schedule_with_warmup` (transformers Trainer's default).
    #[default]
    Linear,
    /// `get_cosine_schedule_with_warmup` (half a cosine by default).
    Cosine,
}

impl std::str::FromStr for ScheduleKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "constant" | "constant_with_warmup" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            other => Err(format!("unknown schedule {other:?}: expected constant, linear or cosine")),
        }
    }
}

/// Warm-up length: a number of optimizer steps, or a fraction of all steps (transformers'
/// `warmup_ratio`: `ceil(ratio * total)`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Warmup {
    /// Fixed number of steps.
    Steps(usize),
    /// Fraction of the total steps, rounded up.
    Ratio(f64),
}

impl Default for Warmup {
    fn default() -> Self {
        Warmup::Steps(0)
    }
}

impl Warmup {
    /// Warm-up steps for a run of `total` optimizer steps.
    pub fn steps(&self, total: usize) -> usize {
        match *self {
            Warmup::Steps(n) => n,
            Warmup::Ratio(r) if r > 0.0 && r.is_finite() => (r * total as f64).ceil() as usize,
            Warmup::Ratio(_) => 0,
        }
    }
}

/// A learning-rate schedule (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    /// Shape after warm-up.
    pub kind: ScheduleKind,
    /// Warm-up steps W.
    pub warmup_steps: usize,
    /// Total optimizer steps T (ignored by the constant schedule).
    pub total_steps: usize,
    /// Cosine cycles (transformers' `num_cycles`, 0.5 = decay to 0 once).
    pub num_cycles: f64,
}

impl Schedule {
    /// A schedule with transformers' defaults (`num_cycles = 0.5`).
    pub fn new(kind: ScheduleKind, warmup_steps: usize, total_steps: usize) -> Self {
        Self { kind, warmup_steps, total_steps, num_cycles: 0.5 }
    }

    /// The multiplier of the base learning rate at optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        let s = step as i64;
        let w = self.warmup_steps as i64;
        let t = self.total_steps as i64;
        if s < w {
            return s as f64 / (w.max(1)) as f64;
        }
        match self.kind {
            ScheduleKind::Constant => 1.0,
            ScheduleKind::Linear => f64::max(0.0, (t - s) as f64 / ((t - w).max(1)) as f64),
            ScheduleKind::Cosine => {
                let progress = (s - w) as f64 / ((t - w).max(1)) as f64;
                f64::max(
                    0.0,
                    0.5 * (1.0 + (std::f64::consts::PI * self.num_cycles * 2.0 * progress).cos()),
                )
            }
        }
    }

    /// `base_lr * factor(step)`.
    pub fn lr(&self, base_lr: f64, step: usize) -> f64 {
        base_lr * self.factor(step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_ratio_rounds_up_and_ignores_bad_values() {
        assert_eq!(Warmup::Ratio(0.1).steps(25), 3);
        assert_eq!(Warmup::Ratio(0.0).steps(25), 0);
        assert_eq!(Warmup::Ratio(f64::NAN).steps(25), 0);
        assert_eq!(Warmup::Steps(7).steps(25), 7);
    }

    #[test]
    fn schedules_start_at_zero_with_warmup_and_end_at_zero() {
        for kind in [ScheduleKind::Linear, ScheduleKind::Cosine] {
            let s = Schedule::new(kind, 2, 10);
            assert_eq!(s.factor(0), 0.0);
            assert_eq!(s.factor(2), 1.0);
            assert_eq!(s.factor(10), 0.0);
        }
        assert_eq!(Schedule::new(ScheduleKind::Linear, 2, 10).factor(20), 0.0);
        // transformers' cosine is not clamped past the end: it rises again (half a period later).
        assert!(Schedule::new(ScheduleKind::Cosine, 2, 10).factor(20) > 0.8);
        assert_eq!(Schedule::new(ScheduleKind::Constant, 4, 0).factor(100), 1.0);
        assert_eq!("cosine".parse::<ScheduleKind>().unwrap(), ScheduleKind::Cosine);
        assert!("step".parse::<ScheduleKind>().is_err());
    }
}
