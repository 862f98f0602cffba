//! Fine-tuning: AdamW, learning-rate schedules and the training loop.
//!
//! - [`optim`]: [`AdamW`] (`torch.optim.AdamW` step for step) with exportable state,
//!   [`Gradients`] (clipping by global norm) and [`GradAccumulator`].
//! - [`schedule`]: constant, linear and cosine schedules with linear warm-up (transformers'
//!   formulas).
//! - [`trainer`]: the generic [`Trainer`] over an [`Objective`] and [`TrainData`], with evaluation,
//!   early stopping, best/last checkpoints, resume, a stop flag and [`TrainEvent`]s for a front end.
//! - [`objectives`]: classification and causal-LM objectives and their losses.
//! - [`split_data`]: [`SplitData`], the [`TrainData`] over a data set's train / validation split.
//!
//! Only adapter variables are trained ([`PeftModel::trainable_vars`](crate::PeftModel::trainable_vars)):
//! the λ's, `modules_to_save` copies and biases `bias` made trainable; base weights are never
//! variables.

pub mod objectives;
pub mod optim;
pub mod schedule;
pub mod split_data;
pub mod trainer;

pub use objectives::{causal_lm_eval, causal_lm_loss, classification_loss, CausalLmObjective, ClassificationObjective};
pub use optim::{AdamW, AdamWConfig, GradAccumulator, Gradients};
pub use schedule::{Schedule, ScheduleKind, Warmup};
pub use split_data::SplitData;
pub use trainer::{
    epoch_seed, load_adapter_weights, shuffled_indices, Batches, CheckpointKind, EpochMetrics, Monitor, Objective,
    StepOutput, StopReason, TrainConfig, TrainData, TrainEvent, TrainReport, Trainer, TRAINER_STATE_NAME,
};
