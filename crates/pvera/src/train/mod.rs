//! Fine-tuning: AdamW, learning-rate schedules and the training loop.
//!
//! - [`optim`]: [`AdamW`] (`torch.optim.AdamW` step for step) with exportable state,
//!   [`Gradients`] (clipping by global norm) and [`GradAccumulator`].
//! - [`schedule`]: constant, linear and cosine schedules with linear warm-up (transformers'
//!   formulas).
//! - [`trainer`]: the generic [`Trainer`] over a [`Task`] and [`TrainData`], with evaluation,
//!   early stopping, best/last checkpoints, resume and [`TrainEvent`]s for a front end.
//!
//! Only adapter variables are trained ([`PeftModel::trainable_vars`](crate::PeftModel::trainable_vars)):
//! the λ's, `modules_to_save` copies and biases `bias` made trainable; base weights are never
//! variables.

pub mod optim;
pub mod schedule;
pub mod tasks;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig, GradAccumulator, Gradients};
pub use schedule::{Schedule, ScheduleKind, Warmup};
pub use trainer::{
    epoch_seed, load_adapter_weights, shuffled_indices, Batches, CheckpointKind, EpochMetrics,
    IndexedData, Monitor, Split, StepOutput, StopReason, Task, TrainConfig, TrainData, TrainEvent,
    TrainReport, Trainer, TRAINER_STATE_NAME,
};
