//! The generic fine-tuning loop.
//!
//! A [`Trainer`] drives a [`PeftModel`] with a user-supplied [`Objective`] (which turns a batch into a
//! differentiable loss) over batches from a [`TrainData`] (one iterator per epoch). Per epoch:
//!
//! 1. training in train mode: micro-batches, loss = task loss + `kl_weight` · KL (the mean of the
//!    PVeRA latent's KL terms, [`RunState::drain_kl_mean`](crate::RunState::drain_kl_mean),
//!    drained every micro-batch so they never accumulate), gradients summed over `grad_accum`
//!    micro-batches and scaled to their mean, optional clipping by global norm, one [`AdamW`] step
//!    with the scheduled learning rate;
//! 2. evaluation in eval mode on the validation batches (loss, accuracy);
//! 3. the best checkpoint (lowest validation loss, or training loss without validation data) in
//!    `<output_dir>/best/` (PEFT format, `save_pretrained`); the last one plus the trainer state
//!    in `<output_dir>/last/`;
//! 4. early stopping when the monitored loss has not improved for `patience` epochs.
//!
//! A non-finite loss, gradient or adapter variable stops training with [`Error::NonFinite`]
//! naming the epoch, the optimizer step and the last good checkpoints; nothing on disk is touched
//! after the failure.
//!
//! Reproducibility: the trainer seeds the run state's global generator (dropout masks, noise of
//! adapters without `generator_seed`) with `seed` at the start, and reseeds every layer's own
//! noise generator (adapters with `generator_seed`) at the start of each epoch `e` with
//! [`epoch_seed`]`(generator_seed, e)` (epoch 0 keeps `generator_seed` itself, so the first epoch
//! draws PEFT's stream). `<output_dir>/last/trainer_state.safetensors` holds the variables, the
//! optimizer state, the global generator's state and the counters, written atomically in one
//! file, so [`Trainer::resume_from`] continues at the next epoch exactly as an uninterrupted run
//! would (the same config and data assumed; [`TrainConfig::data_fingerprint`] checks the data).
//! Checkpoints are made at epoch ends, and at the optimizer step after which a raised stop flag
//! ([`Trainer::set_stop_flag`]) is seen: that state also records the position in the epoch, its
//! running sums and the layers' own generators, so the run continues from that step exactly.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, AdamWConfig, GradAccumulator};
use super::schedule::{Schedule, ScheduleKind, Warmup};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::peft_model::{NamedVar, PeftModel};
use crate::rng::{splitmix64_mix, TorchGenerator};

// =================================================================================================
// Objective and data
// =================================================================================================

/// What an objective computes for one batch.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The task loss: a differentiable scalar, the mean over the batch's examples.
    pub loss: Tensor,
    /// Number of examples in the batch (weights the epoch means).
    pub examples: usize,
    /// Correct predictions in the batch, for classification tasks.
    pub correct: Option<usize>,
}

/// What training minimises: turns a batch into a loss with the model (the task loss; the trainer
/// adds β·KL). The same `step` serves training (the trainer puts the model in train mode and
/// back-propagates the loss) and evaluation (eval mode, no backward pass).
pub trait Objective<M> {
    /// The batch type the objective consumes.
    type Batch;
    /// Runs the model on `batch` and returns the loss (and accuracy counts).
    fn step(&self, model: &PeftModel<M>, batch: &Self::Batch) -> Result<StepOutput>;
}

/// A boxed iterator of batches.
pub type Batches<'a, B> = Box<dyn Iterator<Item = Result<B>> + 'a>;

/// Where batches come from: a fresh training iterator per epoch and the validation batches.
pub trait TrainData {
    /// The batch type (the objective's).
    type Batch;
    /// Number of training micro-batches per epoch (sizes the learning-rate schedule).
    fn num_train_batches(&self) -> usize;
    /// The training batches of epoch `epoch` (0-based), e.g. in [`shuffled_indices`] order.
    fn train_batches(&mut self, epoch: usize) -> Result<Batches<'_, Self::Batch>>;
    /// The training batches of epoch `epoch` after the first `skip` (where an interrupted epoch
    /// continues). The default builds and drops the skipped batches; override it when they
    /// can be skipped without building them.
    fn train_batches_from(&mut self, epoch: usize, skip: usize) -> Result<Batches<'_, Self::Batch>> {
        Ok(Box::new(self.train_batches(epoch)?.skip(skip)))
    }
    /// The validation batches (empty when there is no validation set).
    fn val_batches(&mut self) -> Result<Batches<'_, Self::Batch>>;
}

/// The order of `n` examples in epoch `epoch`:
/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))` exactly
/// ([`TorchGenerator::randperm`]). The same seed and epoch always give the same order.
pub fn shuffled_indices(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    TorchGenerator::new(seed.wrapping_add(epoch as u64)).randperm(n)
}

/// The seed of a layer's own noise generator in epoch `epoch`: `seed` itself in epoch 0, a
/// splitmix64 mix of both afterwards.
pub fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    if epoch == 0 {
        return seed;
    }
    splitmix64(seed ^ splitmix64(epoch as u64))
}

/// One splitmix64 step: the golden-ratio increment, then the output mix.
fn splitmix64(x: u64) -> u64 {
    splitmix64_mix(x.wrapping_add(0x9e37_79b9_7f4a_7c15))
}

// =================================================================================================
// Config, events, report
// =================================================================================================

/// Training settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct TrainConfig {
    /// Epochs to train (in total, counting epochs done before a resume). Default 3.
    pub epochs: usize,
    /// Peak learning rate. Default 1e-3.
    pub lr: f64,
    /// AdamW decoupled weight decay. Default 0.01 (torch's).
    pub weight_decay: f64,
    /// AdamW β1, β2. Default (0.9, 0.999).
    pub betas: (f64, f64),
    /// AdamW ε. Default 1e-8.
    pub eps: f64,
    /// Schedule after warm-up. Default linear (transformers Trainer's).
    pub schedule: ScheduleKind,
    /// Warm-up length. Default 0 steps.
    pub warmup: Warmup,
    /// Clip gradients to this global L2 norm. Default none.
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step. Default 1.
    pub grad_accum: usize,
    /// β of the KL term (the paper divides the KL by 1e6..1e16). Default 0.
    pub kl_weight: f64,
    /// Stop after this many epochs without improvement of the monitored loss. Default none.
    pub patience: Option<usize>,
    /// Improvement smaller than this does not count. Default 0.
    pub min_delta: f64,
    /// Seed of the global generator (dropout, noise without `generator_seed`). Default 0.
    pub seed: u64,
    /// Where `best/` and `last/` go.
    pub output_dir: PathBuf,
    /// Load the best checkpoint's variables into the model when training ends. Default false.
    pub restore_best: bool,
    /// What identifies the training data (e.g. a content hash of the data files), stored with
    /// the trainer state: [`Trainer::resume_from`] refuses a state saved for other data, since
    /// the same indices would then pick other examples. Default none (not checked).
    pub data_fingerprint: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 3,
            lr: 1e-3,
            weight_decay: 0.01,
            betas: (0.9, 0.999),
            eps: 1e-8,
            schedule: ScheduleKind::Linear,
            warmup: Warmup::Steps(0),
            max_grad_norm: None,
            grad_accum: 1,
            kl_weight: 0.0,
            patience: None,
            min_delta: 0.0,
            seed: 0,
            output_dir: PathBuf::from("pvera-output"),
            restore_best: false,
            data_fingerprint: None,
        }
    }
}

impl TrainConfig {
    /// The optimizer settings.
    pub fn adamw(&self) -> AdamWConfig {
        AdamWConfig {
            lr: self.lr,
            beta1: self.betas.0,
            beta2: self.betas.1,
            eps: self.eps,
            weight_decay: self.weight_decay,
        }
    }
    /// Checks ranges.
    pub fn validate(&self) -> Result<()> {
        self.adamw().validate()?;
        if self.grad_accum == 0 {
            return Err(Error::config("grad_accum", "must be at least 1"));
        }
        if !(self.kl_weight >= 0.0 && self.kl_weight.is_finite()) {
            return Err(Error::config("kl_weight", format!("must be finite and >= 0, got {}", self.kl_weight)));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n > 0.0 && n.is_finite()) {
                return Err(Error::config("max_grad_norm", format!("must be finite and > 0, got {n}")));
            }
        }
        if self.patience == Some(0) {
            return Err(Error::config("patience", "must be at least 1 epoch"));
        }
        if !(self.min_delta >= 0.0 && self.min_delta.is_finite()) {
            return Err(Error::config("min_delta", format!("must be finite and >= 0, got {}", self.min_delta)));
        }
        Ok(())
    }
    /// `<output_dir>/best`.
    pub fn best_dir(&self) -> PathBuf {
        self.output_dir.join("best")
    }
    /// `<output_dir>/last`.
    pub fn last_dir(&self) -> PathBuf {
        self.output_dir.join("last")
    }
}

/// Metrics of one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// Epoch number, 1-based.
    pub epoch: usize,
    /// Optimizer steps done at the end of the epoch (all epochs).
    pub step: usize,
    /// Mean task loss over the training examples.
    pub train_loss: f64,
    /// Mean KL over the training micro-batches (`None` when no KL term was recorded).
    pub train_kl: Option<f64>,
    /// Training accuracy (when the objective counts correct predictions).
    pub train_accuracy: Option<f64>,
    /// Training examples seen.
    pub train_examples: usize,
    /// Mean validation loss (`None` without validation data).
    pub val_loss: Option<f64>,
    /// Validation accuracy.
    pub val_accuracy: Option<f64>,
    /// Validation examples.
    pub val_examples: usize,
    /// Learning rate of the epoch's last step.
    pub lr: f64,
    /// Wall time of the epoch (training and evaluation), seconds.
    pub seconds: f64,
    /// Training throughput.
    pub examples_per_sec: f64,
    /// Whether this epoch's checkpoint became the best one.
    pub is_best: bool,
}

/// Which checkpoint was written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// `<output_dir>/best`: the adapter (PEFT format).
    Best,
    /// `<output_dir>/last`: the adapter plus the trainer state.
    Last,
}

/// Which loss decides the best checkpoint and early stopping.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Monitor {
    /// The validation loss.
    ValLoss,
    /// The training loss (no validation data).
    TrainLoss,
}

/// Why training ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// All epochs ran.
    Completed,
    /// The monitored loss stopped improving.
    EarlyStopped,
    /// The stop flag ([`Trainer::set_stop_flag`]) was raised: the state after the last optimizer
    /// step is in `<output_dir>/last`, from which [`Trainer::resume_from`] continues exactly.
    Interrupted,
}

/// Progress reports for a front end (the library prints nothing).
#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum TrainEvent {
    /// Training starts (or resumes).
    Started {
        /// PEFT's `print_trainable_parameters` line.
        trainable: String,
        /// Total optimizer steps of the run.
        steps: usize,
        /// Optimizer steps per epoch.
        steps_per_epoch: usize,
        /// Warm-up steps.
        warmup_steps: usize,
        /// Total epochs.
        epochs: usize,
        /// First epoch to run, 1-based (> 1 after a resume).
        start_epoch: usize,
        /// Steps already done (after a resume).
        start_step: usize,
    },
    /// Something the user should know (a changed config on resume, a save warning, ...).
    Warning {
        /// The message.
        message: String,
    },
    /// One optimizer step was taken.
    Step {
        /// Epoch, 1-based.
        epoch: usize,
        /// Optimizer step, 1-based, counted over the whole run.
        step: usize,
        /// Total optimizer steps.
        steps: usize,
        /// Learning rate used.
        lr: f64,
        /// Mean task loss of the step's micro-batches.
        loss: f64,
        /// Mean KL of the step's micro-batches.
        kl: Option<f64>,
        /// Global gradient norm before clipping.
        grad_norm: f64,
        /// Training throughput of this step.
        examples_per_sec: f64,
        /// Training examples of this epoch so far (this step's included).
        examples: usize,
        /// Correct predictions among them, when the objective counts them (classification).
        correct: Option<usize>,
    },
    /// An epoch ended (after evaluation).
    EpochEnd {
        /// Its metrics.
        metrics: EpochMetrics,
    },
    /// A checkpoint was written.
    CheckpointSaved {
        /// Best or last.
        kind: CheckpointKind,
        /// Its directory.
        path: PathBuf,
        /// Epoch, 1-based.
        epoch: usize,
    },
    /// The stop flag was seen after an optimizer step: the state is saved in `last/` and
    /// training returns ([`StopReason::Interrupted`]).
    Interrupted {
        /// Epoch, 1-based, that was interrupted.
        epoch: usize,
        /// Optimizer steps done (the state is saved right after this one).
        step: usize,
        /// Training micro-batches of the epoch done.
        micro_batches: usize,
        /// Training micro-batches of the epoch in all.
        of: usize,
        /// The directory holding the saved state (`<output_dir>/last`).
        path: PathBuf,
        /// What was saved and how to continue, in words.
        message: String,
    },
    /// Training stops early.
    EarlyStop {
        /// Epoch, 1-based, after which training stops.
        epoch: usize,
        /// The best epoch, 1-based.
        best_epoch: usize,
        /// Its monitored loss.
        best_loss: f64,
        /// The patience.
        patience: usize,
    },
    /// Training ended normally.
    Finished {
        /// Why.
        reason: StopReason,
        /// Optimizer steps done.
        steps: usize,
        /// Best epoch, 1-based.
        best_epoch: Option<usize>,
        /// Its monitored loss.
        best_loss: Option<f64>,
        /// Wall time of this `fit` call, seconds.
        seconds: f64,
    },
}

/// The result of [`Trainer::fit`] (serialisable to JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainReport {
    /// PEFT's trainable-parameters line.
    pub trainable: String,
    /// The settings.
    pub config: TrainConfig,
    /// Optimizer steps planned for the run.
    pub total_steps: usize,
    /// Optimizer steps done.
    pub steps: usize,
    /// Per-epoch metrics (including epochs before a resume).
    pub epochs: Vec<EpochMetrics>,
    /// Which loss was monitored.
    pub monitor: Monitor,
    /// Best epoch, 1-based.
    pub best_epoch: Option<usize>,
    /// Its monitored loss.
    pub best_loss: Option<f64>,
    /// Why training ended.
    pub stop: StopReason,
    /// The best checkpoint (PEFT format).
    pub best_dir: PathBuf,
    /// The last checkpoint and trainer state.
    pub last_dir: PathBuf,
    /// The directory training resumed from.
    pub resumed_from: Option<PathBuf>,
    /// Wall time of this `fit` call, seconds.
    pub seconds: f64,
}

// =================================================================================================
// Saved state
// =================================================================================================

/// File of the trainer state inside `last/`.
pub const TRAINER_STATE_NAME: &str = "trainer_state.safetensors";
const STATE_META_KEY: &str = "pvera_trainer_state";
/// Version 2 adds the position inside an interrupted epoch and the layers' generator states;
/// version 1 files (epoch ends only) are still read.
const STATE_FORMAT: &str = "pvera-trainer-state/2";
const STATE_FORMATS_READ: [&str; 2] = ["pvera-trainer-state/1", STATE_FORMAT];
const PARAM_PREFIX: &str = "param::";
const OPTIM_PREFIX: &str = "optim::";
const RNG_KEY: &str = "rng::global";
/// Followed by the `layer_seeds` key (`adapter\tmodule path`) of a layer's own generator.
const LAYER_RNG_PREFIX: &str = "rng::layer::";
const BEST_LOSS_KEY: &str = "trainer::best_loss";

/// The counters and history kept between epochs (the JSON part of the trainer state).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Progress {
    format: String,
    config: TrainConfig,
    /// Next epoch to run, 0-based (= epochs done).
    next_epoch: usize,
    /// Optimizer steps done.
    global_step: usize,
    /// Best epoch, 1-based; the loss itself travels as an f64 tensor (exact).
    best_epoch: Option<usize>,
    #[serde(skip)]
    best_loss: Option<f64>,
    /// Epochs since the last improvement.
    bad_epochs: usize,
    history: Vec<EpochMetrics>,
    /// Set once the run ended.
    stopped: Option<StopReason>,
    /// `adapter\tmodule path` -> the layer's initial `generator_seed`.
    layer_seeds: BTreeMap<String, u64>,
    /// Adapters being trained.
    adapters: Vec<String>,
    /// Monitored loss.
    monitor: Option<Monitor>,
    /// Set when the run was interrupted inside epoch `next_epoch`: where it continues.
    #[serde(default)]
    mid_epoch: Option<MidEpoch>,
}

/// The position inside an interrupted epoch, at an optimizer-step boundary (no gradients pending).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct MidEpoch {
    /// Training micro-batches of the epoch already done.
    micro_batches: usize,
    /// The epoch's running sums at that point.
    sums: Sums,
    /// Learning rate of the last step.
    last_lr: f64,
    /// Each layer's own noise generator (`layer_seeds` key -> torch `get_state` bytes); these
    /// travel as tensors, not in the JSON.
    #[serde(skip)]
    layer_rng: BTreeMap<String, Vec<u8>>,
}

// =================================================================================================
// Trainer
// =================================================================================================

/// The training loop (see the module docs).
pub struct Trainer {
    config: TrainConfig,
    optimizer: Option<AdamW>,
    progress: Option<Progress>,
    resumed_from: Option<PathBuf>,
    pending_warnings: Vec<String>,
    /// Save warnings already reported by this `fit`.
    seen_warnings: Vec<String>,
    stop: Option<Arc<AtomicBool>>,
}

impl std::fmt::Debug for Trainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("config", &self.config)
            .field("next_epoch", &self.progress.as_ref().map(|p| p.next_epoch))
            .field("resumed_from", &self.resumed_from)
            .finish()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Sums {
    loss: f64,
    kl: f64,
    kl_n: usize,
    examples: usize,
    correct: usize,
    all_correct_known: bool,
}

impl Sums {
    fn new() -> Self {
        Self { loss: 0.0, kl: 0.0, kl_n: 0, examples: 0, correct: 0, all_correct_known: true }
    }
    fn mean_loss(&self) -> f64 {
        if self.examples == 0 { f64::NAN } else { self.loss / self.examples as f64 }
    }
    fn mean_kl(&self) -> Option<f64> {
        (self.kl_n > 0).then(|| self.kl / self.kl_n as f64)
    }
    fn accuracy(&self) -> Option<f64> {
        (self.all_correct_known && self.examples > 0).then(|| self.correct as f64 / self.examples as f64)
    }
    fn add(&mut self, loss: f64, examples: usize, correct: Option<usize>) {
        self.loss += loss * examples as f64;
        self.examples += examples;
        match correct {
            Some(c) => self.correct += c,
            None => self.all_correct_known = false,
        }
    }
}

fn scalar_f64(t: &Tensor, what: &str) -> Result<f64> {
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    if v.len() != 1 {
        return Err(Error::Model(format!(
            "{what} must be a scalar tensor, got shape {:?} (return the mean over the batch)",
            t.dims()
        )));
    }
    Ok(f64::from(v[0]))
}

impl Trainer {
    /// A trainer for a fresh run.
    pub fn new(config: TrainConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            config,
            optimizer: None,
            progress: None,
            resumed_from: None,
            pending_warnings: Vec::new(),
            seen_warnings: Vec::new(),
            stop: None,
        })
    }

    /// The settings.
    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    /// The optimizer (after `fit` or `resume_from`).
    pub fn optimizer(&self) -> Option<&AdamW> {
        self.optimizer.as_ref()
    }

    /// Epochs done so far (0 for a fresh trainer).
    pub fn epochs_done(&self) -> usize {
        self.progress.as_ref().map(|p| p.next_epoch).unwrap_or(0)
    }

    /// Optimizer steps done so far.
    pub fn steps_done(&self) -> usize {
        self.progress.as_ref().map(|p| p.global_step).unwrap_or(0)
    }

    /// A flag that stops [`fit`](Self::fit) cleanly when raised (e.g. from a SIGINT handler). It
    /// is checked after every optimizer step: the state at that step boundary (variables,
    /// optimizer, generators, the position in the epoch) is written to `<output_dir>/last`,
    /// `fit` returns with [`StopReason::Interrupted`] after a [`TrainEvent::Interrupted`], and
    /// [`resume_from`](Self::resume_from) continues from that step exactly as an uninterrupted
    /// run would have.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = Some(flag);
    }

    fn stop_requested(&self) -> bool {
        self.stop.as_ref().is_some_and(|f| f.load(Ordering::SeqCst))
    }

    /// Restores a run from `dir`: the `last/` directory written by [`fit`](Self::fit), or the
    /// run's output directory itself (its `last/` is used). Restored: the model's trainable
    /// variables, the optimizer state, the generators, the counters, the best loss and the
    /// history; the next `fit` continues at the saved epoch end or, after an interruption, at
    /// the saved optimizer step. The trainer's own config is used; fields that differ from the
    /// saved run's are reported as [`TrainEvent::Warning`]s when `fit` starts (an exact
    /// continuation needs the same config), except these, which are refused:
    /// - another [`TrainConfig::data_fingerprint`] (a state saved without one is accepted with
    ///   a warning);
    /// - a run that already ran all its epochs (raise `epochs`) or stopped early (raise
    ///   `patience`, and `epochs` if needed).
    pub fn resume_from<M>(&mut self, model: &mut PeftModel<M>, dir: &Path) -> Result<()> {
        let dir = &state_dir(dir)?;
        let path = dir.join(TRAINER_STATE_NAME);
        let file = path.display().to_string();
        let device = model.registry().device().clone();
        let (tensors, meta) = checkpoint::read_safetensors(&path, &device)?;
        let json = meta.get(STATE_META_KEY).ok_or_else(|| Error::MissingTensor {
            file: file.clone(),
            key: format!("metadata {STATE_META_KEY}"),
            hint: " (not a pvera trainer state: resume from the `last` directory of a pvera run)".into(),
        })?;
        let mut progress: Progress = serde_json::from_str(json)
            .map_err(|e| Error::ConfigParse { path: file.clone(), reason: format!("trainer state: {e}") })?;
        if !STATE_FORMATS_READ.contains(&progress.format.as_str()) {
            return Err(Error::ConfigParse {
                path: file.clone(),
                reason: format!("trainer state format {:?}, expected one of {STATE_FORMATS_READ:?}", progress.format),
            });
        }
        let mut warnings = Vec::new();
        warnings.extend(self.check_same_data(&progress, dir)?);
        self.check_resumable(&mut progress, dir)?;
        progress.best_loss = match tensors.get(BEST_LOSS_KEY) {
            Some(t) => Some(t.tensor.to_dtype(DType::F64)?.to_scalar::<f64>()?),
            None => None,
        };
        let active = model.active_adapters();
        if active != progress.adapters {
            return Err(Error::Adapter(format!(
                "{file}: the run trained adapters {:?} but the model's active adapters are {:?}",
                progress.adapters, active
            )));
        }
        let vars = model.trainable_vars()?;
        // Variables: every trainable variable must be in the file, nothing else.
        let mut values: Vec<(&NamedVar, Tensor)> = Vec::new();
        for v in &vars {
            let key = format!("{PARAM_PREFIX}{}", v.name);
            let t = tensors.get(&key).ok_or_else(|| Error::MissingTensor {
                file: file.clone(),
                key: key.clone(),
                hint: " (the state was saved for another adapter configuration)".into(),
            })?;
            if t.tensor.dims() != v.var.dims() {
                return Err(Error::ShapeMismatch {
                    file: file.clone(),
                    key,
                    expected: format!("{:?}", v.var.dims()),
                    got: t.tensor.dims().to_vec(),
                    hint: " (the state was saved for a model of another size)".into(),
                });
            }
            let bad = crate::layer::count_non_finite(&t.tensor)?;
            if bad > 0 {
                return Err(Error::NonFinite { what: format!("{file}: `{key}`"), count: bad, hint: String::new() });
            }
            values.push((v, t.tensor.to_dtype(v.var.dtype())?));
        }
        let n_params = tensors.keys().filter(|k| k.starts_with(PARAM_PREFIX)).count();
        if n_params != vars.len() {
            return Err(Error::Adapter(format!(
                "{file}: the state holds {n_params} variables, this model trains {}",
                vars.len()
            )));
        }
        let mut optimizer = AdamW::new(vars.clone(), self.config.adamw())?;
        let optim: BTreeMap<String, Tensor> = tensors
            .iter()
            .filter_map(|(k, t)| k.strip_prefix(OPTIM_PREFIX).map(|k| (k.to_string(), t.tensor.clone())))
            .collect();
        optimizer.load_state(&optim)?;
        let generator_bytes = |key: &str| -> Result<Vec<u8>> {
            let t = tensors.get(key).ok_or_else(|| Error::MissingTensor {
                file: file.clone(),
                key: key.to_string(),
                hint: " (the trainer state is incomplete; resume from an intact `last` directory)".into(),
            })?;
            Ok(t.tensor.to_dtype(DType::U8)?.to_vec1::<u8>()?)
        };
        let mut g = TorchGenerator::new(0);
        g.set_state(&generator_bytes(RNG_KEY)?).map_err(|e| Error::Model(format!("{file}: `{RNG_KEY}`: {e}")))?;
        if let Some(mid) = progress.mid_epoch.as_mut() {
            for key in progress.layer_seeds.keys() {
                let k = format!("{LAYER_RNG_PREFIX}{key}");
                let bytes = generator_bytes(&k)?;
                TorchGenerator::new(0).set_state(&bytes).map_err(|e| Error::Model(format!("{file}: `{k}`: {e}")))?;
                mid.layer_rng.insert(key.clone(), bytes);
            }
        }
        // Everything checked: apply.
        for (v, t) in values {
            v.var.set(&t)?;
        }
        let kernel = model.state().with_global_generator(|gen| gen.kernel())?;
        g.set_kernel(kernel);
        model.state().with_global_generator(|gen| *gen = g)?;

        let diffs = config_differences(&progress.config, &self.config);
        if !diffs.is_empty() {
            warnings.push(format!(
                "resuming from {} with settings that differ from the saved run's ({}); the run will \
                 not match an uninterrupted one",
                dir.display(),
                diffs.join(", ")
            ));
        }
        progress.config = self.config.clone();
        self.pending_warnings = warnings;
        self.optimizer = Some(optimizer);
        self.progress = Some(progress);
        self.resumed_from = Some(dir.clone());
        Ok(())
    }

    /// The data check of [`resume_from`](Self::resume_from): a state saved for other data is
    /// refused; a missing fingerprint on either side is a warning (returned).
    fn check_same_data(&self, progress: &Progress, dir: &Path) -> Result<Option<String>> {
        match (&progress.config.data_fingerprint, &self.config.data_fingerprint) {
            (Some(saved), Some(now)) if saved != now => Err(Error::Data(format!(
                "cannot resume from {}: that run was trained on other data (fingerprint {}, now {}); the \
                 saved position and split would pick other examples. Resume with the same training data \
                 (--data), or start a new run in another output directory",
                dir.display(),
                short_fingerprint(saved),
                short_fingerprint(now)
            ))),
            (None, Some(_)) => Ok(Some(format!(
                "{}: the saved run recorded no data fingerprint (an older trainer state), so it cannot be \
                 checked that the training data (--data) is the same; resuming on other data gives a run that \
                 matches neither",
                dir.display()
            ))),
            _ => Ok(None),
        }
    }

    /// Refuses to resume a run that has nothing left to do under this trainer's settings, and
    /// reopens one whose limits were raised.
    fn check_resumable(&self, progress: &mut Progress, dir: &Path) -> Result<()> {
        let done = progress.next_epoch;
        let (epochs, patience) = (self.config.epochs, self.config.patience);
        match progress.stopped {
            Some(StopReason::Completed) | None if epochs <= done => Err(Error::config(
                "epochs",
                format!(
                    "the run in {} finished {done}/{} epochs; nothing to resume: raise epochs (--epochs) above \
                     {done} to continue it",
                    dir.display(),
                    progress.config.epochs
                ),
            )),
            Some(StopReason::EarlyStopped) if epochs <= done || patience.is_some_and(|p| progress.bad_epochs >= p) => {
                Err(Error::config(
                    "patience",
                    format!(
                        "the run in {} stopped early after epoch {done} of {} ({} epoch(s) without improvement, \
                         patience {}); nothing to resume: raise patience (--patience) above {} (and epochs \
                         (--epochs) above {done} if needed) to continue it",
                        dir.display(),
                        progress.config.epochs,
                        progress.bad_epochs,
                        progress.config.patience.map_or("none".into(), |p| p.to_string()),
                        progress.bad_epochs
                    ),
                ))
            }
            _ => {
                // More epochs or patience were asked for: the run goes on (the schedule is re-planned).
                progress.stopped = None;
                Ok(())
            }
        }
    }

    /// Trains (or continues training) `model` on `data` with `objective`, reporting to `on_event`.
    pub fn fit<M, T, D>(
        &mut self,
        model: &mut PeftModel<M>,
        objective: &T,
        data: &mut D,
        mut on_event: impl FnMut(TrainEvent),
    ) -> Result<TrainReport>
    where
        T: Objective<M>,
        D: TrainData<Batch = T::Batch>,
    {
        let started = Instant::now();
        let cfg = self.config.clone();
        let vars = model.trainable_vars()?;
        if vars.is_empty() {
            return Err(Error::Adapter(
                "nothing to train: the model has no trainable variables (is an adapter active and \
                 loaded with is_trainable = true?)"
                    .into(),
            ));
        }
        if cfg.kl_weight > 0.0 {
            let active = model.active_adapters();
            if !active.is_empty() && active.iter().all(|a| model.method(a).is_ok_and(|m| !m.samples())) {
                return Err(Error::config(
                    "kl_weight",
                    format!(
                        "{}: the adapter(s) {active:?} are VeRA adapters, which have no latent and so no KL \
                         term; use 0, or a PVeRA adapter",
                        cfg.kl_weight
                    ),
                ));
            }
        }
        if self.progress.is_none() {
            self.start_fresh(model, vars.clone())?;
        }
        let optimizer_names = self.optimizer.as_ref().map(|o| o.names()).unwrap_or_default();
        let var_names: Vec<String> = vars.iter().map(|v| v.name.clone()).collect();
        if optimizer_names != var_names {
            return Err(Error::Adapter(format!(
                "the model's trainable variables changed since this trainer started ({} now, {} \
                 before); use a new Trainer",
                var_names.len(),
                optimizer_names.len()
            )));
        }

        let micro_per_epoch = data.num_train_batches();
        if micro_per_epoch == 0 {
            return Err(Error::config("data", "no training batches (empty training set?)"));
        }
        let steps_per_epoch = micro_per_epoch.div_ceil(cfg.grad_accum);
        let total_steps = steps_per_epoch * cfg.epochs;
        let warmup_steps = cfg.warmup.steps(total_steps);
        let plan = Plan { schedule: Schedule::new(cfg.schedule, warmup_steps, total_steps), total_steps };
        let trainable = model.trainable_parameters_line()?;
        self.seen_warnings.clear();
        let (start_epoch, start_step) = (self.epochs_done(), self.steps_done());
        on_event(TrainEvent::Started {
            trainable: trainable.clone(),
            steps: total_steps,
            steps_per_epoch,
            warmup_steps,
            epochs: cfg.epochs,
            start_epoch: start_epoch + 1,
            start_step,
        });
        for w in std::mem::take(&mut self.pending_warnings) {
            on_event(TrainEvent::Warning { message: w });
        }
        model.state().drain_kl()?;

        let result = self.run_epochs(model, objective, data, &mut on_event, &plan);
        let _ = model.eval();
        let _ = model.state().drain_kl();
        let stop = result?;

        let p = self.progress()?;
        if cfg.restore_best && p.best_epoch.is_some() {
            load_adapter_weights(model, &cfg.best_dir())?;
        }
        let seconds = started.elapsed().as_secs_f64();
        on_event(TrainEvent::Finished {
            reason: stop,
            steps: p.global_step,
            best_epoch: p.best_epoch,
            best_loss: p.best_loss,
            seconds,
        });
        Ok(TrainReport {
            trainable,
            config: cfg.clone(),
            total_steps,
            steps: p.global_step,
            epochs: p.history.clone(),
            monitor: p.monitor.unwrap_or(Monitor::ValLoss),
            best_epoch: p.best_epoch,
            best_loss: p.best_loss,
            stop,
            best_dir: cfg.best_dir(),
            last_dir: cfg.last_dir(),
            resumed_from: self.resumed_from.clone(),
            seconds,
        })
    }

    /// The counters of a new run, the optimizer over `vars`, the global generator seeded.
    fn start_fresh<M>(&mut self, model: &PeftModel<M>, vars: Vec<NamedVar>) -> Result<()> {
        let active = model.active_adapters();
        let mut layer_seeds = BTreeMap::new();
        for name in &active {
            for path in &model.adapter(name)?.targets {
                if let Some(site) = model.registry().site(path) {
                    if let Some(seed) = site.with_slot(name, |s| s.generator_seed())? {
                        layer_seeds.insert(format!("{name}\t{path}"), seed);
                    }
                }
            }
        }
        self.progress = Some(Progress {
            format: STATE_FORMAT.into(),
            config: self.config.clone(),
            next_epoch: 0,
            global_step: 0,
            best_epoch: None,
            best_loss: None,
            bad_epochs: 0,
            history: Vec::new(),
            stopped: None,
            layer_seeds,
            adapters: active,
            monitor: None,
            mid_epoch: None,
        });
        self.optimizer = Some(AdamW::new(vars, self.config.adamw())?);
        model.state().manual_seed(self.config.seed)
    }

    fn progress(&self) -> Result<&Progress> {
        self.progress.as_ref().ok_or_else(not_started)
    }
    fn progress_mut(&mut self) -> Result<&mut Progress> {
        self.progress.as_mut().ok_or_else(not_started)
    }
    fn optimizer_mut(&mut self) -> Result<&mut AdamW> {
        self.optimizer.as_mut().ok_or_else(not_started)
    }

    fn run_epochs<M, T, D>(
        &mut self,
        model: &mut PeftModel<M>,
        objective: &T,
        data: &mut D,
        on_event: &mut impl FnMut(TrainEvent),
        plan: &Plan,
    ) -> Result<StopReason>
    where
        T: Objective<M>,
        D: TrainData<Batch = T::Batch>,
    {
        let cfg = self.config.clone();
        if let Some(stop) = self.progress()?.stopped {
            return Ok(stop);
        }
        let start_epoch = self.epochs_done();
        for epoch in start_epoch..cfg.epochs {
            if self.stop_requested() {
                // An epoch boundary (or the resumed step): consistent as it is.
                self.save_last(model, on_event)?;
                self.report_interrupted(data.num_train_batches(), on_event)?;
                return Ok(StopReason::Interrupted);
            }
            let epoch_started = Instant::now();
            self.reseed_layers(model, epoch)?;
            let (train, last_lr) = match self.train_epoch(model, objective, data, on_event, epoch, plan)? {
                EpochTraining::Done { sums, last_lr } => (sums, last_lr),
                EpochTraining::Interrupted => return Ok(StopReason::Interrupted),
            };
            let train_seconds = epoch_started.elapsed().as_secs_f64();
            let val = self.validate(model, objective, data, epoch)?;

            let has_val = val.examples > 0;
            let monitor = if has_val { Monitor::ValLoss } else { Monitor::TrainLoss };
            let monitored = if has_val { val.mean_loss() } else { train.mean_loss() };
            let p = self.progress_mut()?;
            p.monitor = Some(monitor);
            let improved = match p.best_loss {
                None => true,
                Some(best) => monitored < best - cfg.min_delta,
            };
            if improved {
                p.best_loss = Some(monitored);
                p.best_epoch = Some(epoch + 1);
                p.bad_epochs = 0;
            } else {
                p.bad_epochs += 1;
            }
            let metrics = EpochMetrics {
                epoch: epoch + 1,
                step: p.global_step,
                train_loss: train.mean_loss(),
                train_kl: train.mean_kl(),
                train_accuracy: train.accuracy(),
                train_examples: train.examples,
                val_loss: has_val.then(|| val.mean_loss()),
                val_accuracy: if has_val { val.accuracy() } else { None },
                val_examples: val.examples,
                lr: last_lr,
                seconds: epoch_started.elapsed().as_secs_f64(),
                examples_per_sec: if train_seconds > 0.0 { train.examples as f64 / train_seconds } else { 0.0 },
                is_best: improved,
            };
            p.history.push(metrics.clone());
            p.next_epoch = epoch + 1;
            let early = cfg.patience.is_some_and(|pat| p.bad_epochs >= pat) && epoch + 1 < cfg.epochs;
            if early || epoch + 1 == cfg.epochs {
                p.stopped = Some(if early { StopReason::EarlyStopped } else { StopReason::Completed });
            }
            let (best_epoch, best_loss, bad) = (p.best_epoch, p.best_loss, p.bad_epochs);
            on_event(TrainEvent::EpochEnd { metrics });

            if improved {
                let dir = cfg.best_dir();
                let warnings = save_active(model, &dir)?;
                self.emit_new_warnings(warnings, on_event);
                on_event(TrainEvent::CheckpointSaved { kind: CheckpointKind::Best, path: dir, epoch: epoch + 1 });
            }
            self.save_last(model, on_event)?;
            on_event(TrainEvent::CheckpointSaved { kind: CheckpointKind::Last, path: cfg.last_dir(), epoch: epoch + 1 });

            if early {
                on_event(TrainEvent::EarlyStop {
                    epoch: epoch + 1,
                    best_epoch: best_epoch.unwrap_or(epoch + 1),
                    best_loss: best_loss.unwrap_or(monitored),
                    patience: cfg.patience.unwrap_or(bad),
                });
                return Ok(StopReason::EarlyStopped);
            }
        }
        Ok(StopReason::Completed)
    }

    /// The evaluation after an epoch: eval mode, no autograd graph, the validation batches.
    fn validate<M, T, D>(&self, model: &PeftModel<M>, objective: &T, data: &mut D, epoch: usize) -> Result<Sums>
    where
        T: Objective<M>,
        D: TrainData<Batch = T::Batch>,
    {
        model.eval()?;
        let mut val = Sums::new();
        for batch in data.val_batches()? {
            let batch = batch?;
            // no autograd graph for validation: activations are freed layer by layer
            let out = model.state().no_grad(|| objective.step(model, &batch))??;
            model.state().drain_kl()?;
            let loss = scalar_f64(&out.loss, "the objective's validation loss")?;
            if !loss.is_finite() {
                return Err(self.non_finite(format!("validation loss after epoch {}", epoch + 1), 1, epoch));
            }
            val.add(loss, out.examples, out.correct);
        }
        Ok(val)
    }

    /// One epoch of training: micro-steps (forward, backward, gradients accumulated) and an
    /// optimizer step after every `grad_accum` of them and at the end. An interrupted epoch
    /// (see [`Trainer::set_stop_flag`]) continues after its saved micro-batches.
    fn train_epoch<M, T, D>(
        &mut self,
        model: &mut PeftModel<M>,
        objective: &T,
        data: &mut D,
        on_event: &mut impl FnMut(TrainEvent),
        epoch: usize,
        plan: &Plan,
    ) -> Result<EpochTraining>
    where
        T: Objective<M>,
        D: TrainData<Batch = T::Batch>,
    {
        model.train()?;
        let mut run = EpochRun::new(self.config.grad_accum, self.optimizer_mut()?.lr())?;
        if let Some(mid) = self.progress_mut()?.mid_epoch.take() {
            for (key, bytes) in &mid.layer_rng {
                let Some((adapter, path)) = key.split_once('\t') else { continue };
                if let Some(site) = model.registry().site(path) {
                    site.set_generator_state(adapter, bytes)?;
                }
            }
            run.resume(mid);
        }
        let expected = data.num_train_batches();
        let mut batches = data.train_batches_from(epoch, run.micro)?;
        while let Some(batch) = batches.next() {
            run.micro += 1;
            self.micro_step(model, objective, &batch?, epoch, &mut run)?;
            if run.acc.is_full() {
                self.optimizer_step(epoch, plan, &mut run, on_event)?;
                if self.stop_requested() {
                    drop(batches);
                    self.interrupt(model, run, expected, on_event)?;
                    return Ok(EpochTraining::Interrupted);
                }
            }
        }
        drop(batches);
        // The rest of an incomplete accumulation group at the end of the epoch.
        if run.acc.count() > 0 {
            self.optimizer_step(epoch, plan, &mut run, on_event)?;
            if self.stop_requested() {
                self.interrupt(model, run, expected, on_event)?;
                return Ok(EpochTraining::Interrupted);
            }
        }
        if run.micro != expected {
            on_event(TrainEvent::Warning {
                message: format!(
                    "epoch {}: the data gave {} training batches but num_train_batches() said \
                     {expected}; the learning-rate schedule assumed {expected}",
                    epoch + 1,
                    run.micro
                ),
            });
        }
        Ok(EpochTraining::Done { sums: run.sums, last_lr: run.last_lr })
    }

    /// Forward and backward of one micro-batch: the task loss plus β·KL, gradients added to the
    /// accumulator, the running sums updated.
    fn micro_step<M, T: Objective<M>>(
        &self,
        model: &PeftModel<M>,
        objective: &T,
        batch: &T::Batch,
        epoch: usize,
        run: &mut EpochRun,
    ) -> Result<()> {
        let micro = run.micro;
        let out = match objective.step(model, batch) {
            Ok(out) => out,
            // the layers' overflow guard (or any non-finite value found in the forward) stops
            // training like a non-finite loss: step named, checkpoints intact
            Err(Error::NonFinite { what, count, hint }) => {
                return Err(self.non_finite(
                    format!(
                        "forward pass in epoch {}, micro-batch {micro}, before optimizer step {}: {what}{hint}",
                        epoch + 1,
                        self.steps_done() + 1
                    ),
                    count,
                    epoch,
                ));
            }
            Err(e) => return Err(e),
        };
        let kl = model.state().drain_kl_mean()?;
        let loss_v = scalar_f64(&out.loss, "the objective's training loss")?;
        let kl_v = match &kl {
            Some(k) => Some(scalar_f64(k, "the KL term")?),
            None => None,
        };
        if !loss_v.is_finite() || kl_v.is_some_and(|k| !k.is_finite()) {
            let kl_s = kl_v.map(|k| format!(", KL {k}")).unwrap_or_default();
            return Err(self.non_finite(
                format!(
                    "training loss (task loss {loss_v}{kl_s}) in epoch {}, micro-batch {micro}, before optimizer step {}",
                    epoch + 1,
                    self.steps_done() + 1
                ),
                1,
                epoch,
            ));
        }
        let total = match (&kl, self.config.kl_weight) {
            (Some(k), w) if w != 0.0 => (out.loss.to_dtype(DType::F32)? + (k.to_dtype(DType::F32)? * w)?)?,
            _ => out.loss.clone(),
        };
        let store = total.backward()?;
        let optimizer = self.optimizer.as_ref().ok_or_else(not_started)?;
        run.acc.add(optimizer.gradients(&store))?;
        drop(store);
        for sums in [&mut run.sums, &mut run.group] {
            sums.add(loss_v, out.examples, out.correct);
            if let Some(k) = kl_v {
                sums.kl += k;
                sums.kl_n += 1;
            }
        }
        Ok(())
    }

    /// One optimizer step on the accumulated gradients: clipping, the scheduled learning rate,
    /// AdamW, the finiteness checks, the [`TrainEvent::Step`].
    fn optimizer_step(
        &mut self,
        epoch: usize,
        plan: &Plan,
        run: &mut EpochRun,
        on_event: &mut impl FnMut(TrainEvent),
    ) -> Result<()> {
        let Some(mut grads) = run.acc.take()? else { return Ok(()) };
        let step = self.steps_done();
        let norm = match self.config.max_grad_norm {
            Some(max) => grads.clip_by_global_norm(max)?,
            None => grads.global_norm()?,
        };
        if !norm.is_finite() {
            let (count, first) = grads.non_finite()?;
            return Err(self.non_finite(
                format!(
                    "gradients (first in `{}`) at optimizer step {} (epoch {})",
                    first.unwrap_or_default(),
                    step + 1,
                    epoch + 1
                ),
                count.max(1),
                epoch,
            ));
        }
        let lr = plan.schedule.lr(self.config.lr, step);
        let optimizer = self.optimizer_mut()?;
        optimizer.set_lr(lr);
        optimizer.step(&grads)?;
        if let Some((name, count)) = first_non_finite_var(&optimizer.vars())? {
            return Err(self.non_finite(
                format!("adapter variable `{name}` after optimizer step {} (epoch {})", step + 1, epoch + 1),
                count,
                epoch,
            ));
        }
        run.last_lr = lr;
        let p = self.progress_mut()?;
        p.global_step += 1;
        let elapsed = run.group_started.elapsed().as_secs_f64();
        on_event(TrainEvent::Step {
            epoch: epoch + 1,
            step: p.global_step,
            steps: plan.total_steps,
            lr,
            loss: run.group.mean_loss(),
            kl: run.group.mean_kl(),
            grad_norm: norm,
            examples_per_sec: if elapsed > 0.0 { run.group.examples as f64 / elapsed } else { 0.0 },
            examples: run.sums.examples,
            correct: run.sums.all_correct_known.then_some(run.sums.correct),
        });
        run.group = Sums::new();
        run.group_started = Instant::now();
        Ok(())
    }

    /// Saves the state at this optimizer-step boundary in `last/` and reports the interruption.
    fn interrupt<M>(
        &mut self,
        model: &PeftModel<M>,
        run: EpochRun,
        of: usize,
        on_event: &mut impl FnMut(TrainEvent),
    ) -> Result<()> {
        let mut layer_rng = BTreeMap::new();
        for key in self.progress()?.layer_seeds.keys() {
            let Some((adapter, path)) = key.split_once('\t') else { continue };
            if let Some(state) = model.registry().site(path).map(|s| s.generator_state(adapter)).transpose()?.flatten() {
                layer_rng.insert(key.clone(), state);
            }
        }
        self.progress_mut()?.mid_epoch =
            Some(MidEpoch { micro_batches: run.micro, sums: run.sums, last_lr: run.last_lr, layer_rng });
        self.save_last(model, on_event)?;
        self.report_interrupted(of, on_event)
    }

    fn report_interrupted(&self, of: usize, on_event: &mut impl FnMut(TrainEvent)) -> Result<()> {
        let p = self.progress()?;
        let path = self.config.last_dir();
        let (epoch, micro) = match &p.mid_epoch {
            Some(m) => (p.next_epoch + 1, m.micro_batches),
            None => (p.next_epoch + 1, 0),
        };
        let at = if micro == 0 {
            format!("before epoch {epoch}")
        } else {
            format!("in epoch {epoch} after optimizer step {} ({micro} of {of} micro-batches)", p.global_step)
        };
        let best = match p.best_epoch {
            Some(e) => format!("; {} holds the best adapter so far (epoch {e})", self.config.best_dir().display()),
            None => String::new(),
        };
        let message = format!(
            "training interrupted {at}; the state after optimizer step {} is saved in {}{best}. Resume from it \
             (Trainer::resume_from, `--resume {}`) with the same settings and data to continue exactly where it \
             stopped",
            p.global_step,
            path.display(),
            path.display()
        );
        on_event(TrainEvent::Interrupted {
            epoch,
            step: p.global_step,
            micro_batches: micro,
            of,
            path,
            message,
        });
        Ok(())
    }

    /// `last/`: the active adapters (PEFT format) and the trainer state.
    fn save_last<M>(&mut self, model: &PeftModel<M>, on_event: &mut impl FnMut(TrainEvent)) -> Result<()> {
        let dir = self.config.last_dir();
        let warnings = save_active(model, &dir)?;
        self.emit_new_warnings(warnings, on_event);
        self.write_trainer_state(model, &dir)
    }

    /// Reports each save warning once per `fit`.
    fn emit_new_warnings(&mut self, warnings: Vec<String>, on_event: &mut impl FnMut(TrainEvent)) {
        for w in warnings {
            if !self.seen_warnings.contains(&w) {
                self.seen_warnings.push(w.clone());
                on_event(TrainEvent::Warning { message: w });
            }
        }
    }

    /// Reseeds the layers' own noise generators for `epoch` (see the module docs).
    fn reseed_layers<M>(&self, model: &PeftModel<M>, epoch: usize) -> Result<()> {
        let Some(p) = &self.progress else { return Ok(()) };
        for (key, &seed) in &p.layer_seeds {
            let Some((adapter, path)) = key.split_once('\t') else { continue };
            if let Some(site) = model.registry().site(path) {
                site.set_generator_seed(adapter, Some(epoch_seed(seed, epoch)))?;
            }
        }
        Ok(())
    }

    fn non_finite(&self, what: String, count: usize, epoch: usize) -> Error {
        let p = self.progress.as_ref();
        let step = p.map(|p| p.global_step).unwrap_or(0);
        let best = self.config.best_dir();
        let last = self.config.last_dir();
        let saved = match p {
            Some(p) if p.next_epoch > 0 => {
                let best_s = match (p.best_epoch, p.best_loss) {
                    (Some(e), Some(l)) => format!("{} (epoch {e}, loss {l:.6})", best.display()),
                    _ => best.display().to_string(),
                };
                format!(
                    "the last good checkpoints are {best_s} and {} (epoch {}; continue with \
                     Trainer::resume_from)",
                    last.display(),
                    p.next_epoch
                )
            }
            _ => format!(
                "no checkpoint had been saved yet (the first epoch did not finish; {} is unchanged)",
                self.config.output_dir.display()
            ),
        };
        Error::NonFinite {
            what,
            count,
            hint: format!(
                "; training stopped in epoch {} after {step} good optimizer step(s); nothing saved \
                 was touched: {saved}. Lower the learning rate, clip gradients (max_grad_norm) or \
                 lower kl_weight",
                epoch + 1
            ),
        }
    }

    fn write_trainer_state<M>(&self, model: &PeftModel<M>, dir: &Path) -> Result<()> {
        let p = self.progress()?;
        let optimizer = self.optimizer.as_ref().ok_or_else(not_started)?;
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for v in optimizer.vars() {
            tensors.insert(format!("{PARAM_PREFIX}{}", v.name), v.var.as_detached_tensor());
        }
        for (k, t) in optimizer.state_tensors()? {
            tensors.insert(format!("{OPTIM_PREFIX}{k}"), t);
        }
        let bytes_tensor = |b: Vec<u8>| {
            let n = b.len();
            Tensor::from_vec(b, n, &Device::Cpu)
        };
        let rng = model.state().with_global_generator(|g| g.get_state())?;
        tensors.insert(RNG_KEY.into(), bytes_tensor(rng)?);
        if let Some(mid) = &p.mid_epoch {
            for (k, b) in &mid.layer_rng {
                tensors.insert(format!("{LAYER_RNG_PREFIX}{k}"), bytes_tensor(b.clone())?);
            }
        }
        if let Some(l) = p.best_loss {
            tensors.insert(BEST_LOSS_KEY.into(), Tensor::new(l, &Device::Cpu)?);
        }
        let json = serde_json::to_string(p)
            .map_err(|e| Error::Model(format!("cannot serialise the trainer state: {e}")))?;
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (STATE_META_KEY.to_string(), json),
        ]);
        let bytes = checkpoint::serialize_safetensors(&tensors, Some(meta))?;
        checkpoint::write_atomic(&dir.join(TRAINER_STATE_NAME), &bytes)
    }
}

/// The schedule of a `fit` call.
struct Plan {
    schedule: Schedule,
    total_steps: usize,
}

/// How an epoch's training ended.
enum EpochTraining {
    Done { sums: Sums, last_lr: f64 },
    Interrupted,
}

/// The running state of one epoch's training.
struct EpochRun {
    acc: GradAccumulator,
    /// The whole epoch's sums.
    sums: Sums,
    /// The current accumulation group's sums (one optimizer step).
    group: Sums,
    group_started: Instant,
    last_lr: f64,
    /// Micro-batches done.
    micro: usize,
}

impl EpochRun {
    fn new(grad_accum: usize, lr: f64) -> Result<Self> {
        Ok(Self {
            acc: GradAccumulator::new(grad_accum)?,
            sums: Sums::new(),
            group: Sums::new(),
            group_started: Instant::now(),
            last_lr: lr,
            micro: 0,
        })
    }
    /// Continues an interrupted epoch (saved at a step boundary: nothing accumulated).
    fn resume(&mut self, mid: MidEpoch) {
        self.sums = mid.sums;
        self.last_lr = mid.last_lr;
        self.micro = mid.micro_batches;
    }
}

fn not_started() -> Error {
    Error::Adapter("the trainer has no run yet: call fit or resume_from first".into())
}

/// The directory holding a trainer state: `dir` itself, or `dir/last` for a run's output
/// directory; an adapter directory without one (such as `best/`) is pointed to its `last/`.
fn state_dir(dir: &Path) -> Result<PathBuf> {
    if dir.join(TRAINER_STATE_NAME).is_file() {
        return Ok(dir.to_path_buf());
    }
    let last = dir.join("last");
    if last.join(TRAINER_STATE_NAME).is_file() {
        return Ok(last);
    }
    let sibling = dir.parent().map(|p| p.join("last")).filter(|l| l.join(TRAINER_STATE_NAME).is_file());
    let hint = match sibling {
        Some(l) => format!(
            "{} is an adapter checkpoint, not a resumable state; resume from the run's last/ directory: {}",
            dir.display(),
            l.display()
        ),
        None => format!(
            "no trainer state here nor in {}; resume from the `last/` directory (or the output directory) of \
             a pvera training run",
            last.display()
        ),
    };
    Err(Error::io(dir.join(TRAINER_STATE_NAME), std::io::Error::new(std::io::ErrorKind::NotFound, hint)))
}

/// The first 12 characters of a data fingerprint, for messages.
fn short_fingerprint(f: &str) -> &str {
    f.char_indices().nth(12).map_or(f, |(i, _)| &f[..i])
}

fn save_active<M>(model: &PeftModel<M>, dir: &Path) -> Result<Vec<String>> {
    let active = model.active_adapters();
    let refs: Vec<&str> = active.iter().map(String::as_str).collect();
    model.save_pretrained(dir, Some(&refs))
}

/// The first variable holding NaN or Inf, with its count (one device round trip for all).
fn first_non_finite_var(vars: &[NamedVar]) -> Result<Option<(String, usize)>> {
    if vars.is_empty() {
        return Ok(None);
    }
    let sums: Vec<Tensor> = vars
        .iter()
        .map(|v| v.var.as_tensor().to_dtype(DType::F32)?.sum_all()?.to_device(&Device::Cpu))
        .collect::<candle_core::Result<_>>()?;
    let sums = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
    for (v, s) in vars.iter().zip(sums) {
        if !s.is_finite() {
            let c = crate::layer::count_non_finite(v.var.as_tensor())?;
            return Ok(Some((v.name.clone(), c.max(1))));
        }
    }
    Ok(None)
}

fn config_differences(saved: &TrainConfig, now: &TrainConfig) -> Vec<String> {
    let mut out = Vec::new();
    macro_rules! cmp {
        ($($f:ident),*) => {$(
            if saved.$f != now.$f {
                out.push(format!("{}: {:?} -> {:?}", stringify!($f), saved.$f, now.$f));
            }
        )*};
    }
    cmp!(epochs, lr, weight_decay, betas, eps, schedule, warmup, max_grad_norm, grad_accum, kl_weight, patience, min_delta, seed);
    out
}

/// Sets the model's trainable variables from a PEFT adapter directory written by
/// `save_pretrained` (e.g. `<output_dir>/best`): `default` at the top, other adapters in
/// `<dir>/<name>`. Every trainable variable must be in the files.
pub fn load_adapter_weights<M>(model: &mut PeftModel<M>, dir: &Path) -> Result<()> {
    let device = model.registry().device().clone();
    let mut tensors: BTreeMap<String, (Tensor, String)> = BTreeMap::new();
    for name in model.active_adapters() {
        let d = checkpoint::adapter_dir(dir, &name);
        let files = checkpoint::read_adapter_dir(&d, &device)?;
        let file = files.weights_path.display().to_string();
        for (k, t) in files.tensors {
            tensors.insert(k, (t.tensor, file.clone()));
        }
    }
    let vars = model.trainable_vars()?;
    let mut values = Vec::new();
    for v in &vars {
        let (t, file) = tensors.get(&v.name).ok_or_else(|| Error::MissingTensor {
            file: dir.display().to_string(),
            key: v.name.clone(),
            hint: " (the checkpoint was saved for another adapter configuration)".into(),
        })?;
        if t.dims() != v.var.dims() {
            return Err(Error::ShapeMismatch {
                file: file.clone(),
                key: v.name.clone(),
                expected: format!("{:?}", v.var.dims()),
                got: t.dims().to_vec(),
                hint: String::new(),
            });
        }
        let bad = crate::layer::count_non_finite(t)?;
        if bad > 0 {
            return Err(Error::NonFinite { what: format!("{file}: `{}`", v.name), count: bad, hint: String::new() });
        }
        values.push((v, t.to_dtype(v.var.dtype())?.to_device(v.var.device())?));
    }
    for (v, t) in values {
        v.var.set(&t)?;
    }
    Ok(())
}
