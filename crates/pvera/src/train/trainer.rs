//! The generic fine-tuning loop.
//!
//! A [`Trainer`] drives a [`PeftModel`] with a user-supplied [`Task`] (which turns a batch into a
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
//! would (the same config and data assumed). Checkpoints are made at epoch ends only.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::{AdamW, AdamWConfig, GradAccumulator};
use super::schedule::{Schedule, ScheduleKind, Warmup};
use crate::checkpoint;
use crate::error::{Error, Result};
use crate::peft_model::{NamedVar, PeftModel};
use crate::rng::TorchGenerator;

// =================================================================================================
// Task and data
// =================================================================================================

/// What a task computes for one batch.
#[derive(Clone, Debug)]
pub struct StepOutput {
    /// The task loss: a differentiable scalar, the mean over the batch's examples.
    pub loss: Tensor,
    /// Number of examples in the batch (weights the epoch means).
    pub examples: usize,
    /// Correct predictions in the batch, for classification tasks.
    pub correct: Option<usize>,
}

/// A task: turns a batch into a loss with the model. The same `step` serves training (the
/// trainer puts the model in train mode and back-propagates the loss) and evaluation (eval
/// mode, no backward pass).
pub trait Task<M> {
    /// The batch type the task consumes.
    type Batch;
    /// Runs the model on `batch` and returns the loss (and accuracy counts).
    fn step(&self, model: &PeftModel<M>, batch: &Self::Batch) -> Result<StepOutput>;
}

/// A boxed iterator of batches.
pub type Batches<'a, B> = Box<dyn Iterator<Item = Result<B>> + 'a>;

/// Where batches come from: a fresh training iterator per epoch and the validation batches.
pub trait TrainData {
    /// The batch type (the task's).
    type Batch;
    /// Number of training micro-batches per epoch (sizes the learning-rate schedule).
    fn num_train_batches(&self) -> usize;
    /// The training batches of epoch `epoch` (0-based), e.g. in [`shuffled_indices`] order.
    fn train_batches(&mut self, epoch: usize) -> Result<Batches<'_, Self::Batch>>;
    /// The validation batches (empty when there is no validation set).
    fn val_batches(&mut self) -> Result<Batches<'_, Self::Batch>>;
}

/// Which split a batch is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// Training examples.
    Train,
    /// Validation examples.
    Validation,
}

/// [`TrainData`] over indexed examples: training indices shuffled per epoch with
/// [`shuffled_indices`], cut into batches of `batch_size` (the last one may be smaller),
/// validation indices in order; `make` turns a split and a list of indices into a batch.
pub struct IndexedData<B, F>
where
    F: FnMut(Split, &[usize]) -> Result<B>,
{
    /// Number of training examples.
    pub n_train: usize,
    /// Number of validation examples.
    pub n_val: usize,
    /// Examples per batch.
    pub batch_size: usize,
    /// Shuffling seed.
    pub seed: u64,
    /// Builds a batch from example indices.
    pub make: F,
}

impl<B, F> IndexedData<B, F>
where
    F: FnMut(Split, &[usize]) -> Result<B>,
{
    /// Indexed data with the given sizes, batch size and seed.
    pub fn new(n_train: usize, n_val: usize, batch_size: usize, seed: u64, make: F) -> Self {
        Self { n_train, n_val, batch_size: batch_size.max(1), seed, make }
    }
}

impl<B, F> TrainData for IndexedData<B, F>
where
    F: FnMut(Split, &[usize]) -> Result<B>,
{
    type Batch = B;
    fn num_train_batches(&self) -> usize {
        self.n_train.div_ceil(self.batch_size)
    }
    fn train_batches(&mut self, epoch: usize) -> Result<Batches<'_, B>> {
        let order = shuffled_indices(self.n_train, self.seed, epoch);
        let chunks: Vec<Vec<usize>> = order.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        let make = &mut self.make;
        Ok(Box::new(chunks.into_iter().map(move |c| make(Split::Train, &c))))
    }
    fn val_batches(&mut self) -> Result<Batches<'_, B>> {
        let idx: Vec<usize> = (0..self.n_val).collect();
        let chunks: Vec<Vec<usize>> = idx.chunks(self.batch_size).map(|c| c.to_vec()).collect();
        let make = &mut self.make;
        Ok(Box::new(chunks.into_iter().map(move |c| make(Split::Validation, &c))))
    }
}

/// The order of `n` examples in epoch `epoch`:
/// `torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))` exactly (torch's
/// CPU algorithm: a Fisher–Yates pass with `random() % (n - i)`, and the inside-out variant with
/// `random64()` for `n >= 2^32 / 20`). The same seed and epoch always give the same order.
pub fn shuffled_indices(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut g = TorchGenerator::new(seed.wrapping_add(epoch as u64));
    randperm(n, &mut g)
}

/// `torch.randperm(n, generator=g)` on the CPU.
pub fn randperm(n: usize, g: &mut TorchGenerator) -> Vec<usize> {
    if (n as u64) < u64::from(u32::MAX) / 20 {
        let mut r: Vec<usize> = (0..n).collect();
        for i in 0..n.saturating_sub(1) {
            let z = (u64::from(g.random()) % (n - i) as u64) as usize;
            r.swap(i, z + i);
        }
        r
    } else {
        let mut r = vec![0usize; n];
        for i in 0..n {
            let z = (g.random64() % (i as u64 + 1)) as usize;
            r[i] = r[z];
            r[z] = i;
        }
        r
    }
}

/// The seed of a layer's own noise generator in epoch `epoch`: `seed` itself in epoch 0, a
/// splitmix64 mix of both afterwards.
pub fn epoch_seed(seed: u64, epoch: usize) -> u64 {
    if epoch == 0 {
        return seed;
    }
    splitmix64(seed ^ splitmix64(epoch as u64))
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
    /// Training accuracy (when the task counts correct predictions).
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
const STATE_FORMAT: &str = "pvera-trainer-state/1";
const PARAM_PREFIX: &str = "param::";
const OPTIM_PREFIX: &str = "optim::";
const RNG_KEY: &str = "rng::global";
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
        Ok(Self { config, optimizer: None, progress: None, resumed_from: None, pending_warnings: Vec::new() })
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

    /// Restores a run from `dir` (a `last/` directory written by [`fit`](Self::fit)): the
    /// model's trainable variables, the optimizer state, the global generator, the counters,
    /// the best loss and the history. The next `fit` continues at the following epoch. The
    /// trainer's own config is used; fields that differ from the saved run's are reported as
    /// [`TrainEvent::Warning`]s when `fit` starts (an exact continuation needs the same config).
    pub fn resume_from<M>(&mut self, model: &mut PeftModel<M>, dir: &Path) -> Result<()> {
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
        if progress.format != STATE_FORMAT {
            return Err(Error::ConfigParse {
                path: file.clone(),
                reason: format!("trainer state format {:?}, expected {STATE_FORMAT:?}", progress.format),
            });
        }
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
        let rng = tensors.get(RNG_KEY).ok_or_else(|| Error::MissingTensor {
            file: file.clone(),
            key: RNG_KEY.into(),
            hint: String::new(),
        })?;
        let rng_bytes = rng.tensor.to_dtype(DType::U8)?.to_vec1::<u8>()?;
        let mut g = TorchGenerator::new(0);
        g.set_state(&rng_bytes).map_err(|e| Error::Model(format!("{file}: `{RNG_KEY}`: {e}")))?;
        // Everything checked: apply.
        for (v, t) in values {
            v.var.set(&t)?;
        }
        let kernel = model.state().with_global_generator(|gen| gen.kernel())?;
        g.set_kernel(kernel);
        model.state().with_global_generator(|gen| *gen = g)?;

        self.pending_warnings.clear();
        let diffs = config_differences(&progress.config, &self.config);
        if !diffs.is_empty() {
            self.pending_warnings.push(format!(
                "resuming from {} with settings that differ from the saved run's ({}); the run will \
                 not match an uninterrupted one",
                dir.display(),
                diffs.join(", ")
            ));
        }
        if progress.stopped == Some(StopReason::Completed) && self.config.epochs > progress.next_epoch {
            // More epochs were asked for: the run goes on (the schedule is re-planned).
            progress.stopped = None;
        }
        progress.config = self.config.clone();
        self.optimizer = Some(optimizer);
        self.progress = Some(progress);
        self.resumed_from = Some(dir.to_path_buf());
        Ok(())
    }

    /// Trains (or continues training) `model` on `data` with `task`, reporting to `on_event`.
    pub fn fit<M, T, D>(
        &mut self,
        model: &mut PeftModel<M>,
        task: &T,
        data: &mut D,
        mut on_event: impl FnMut(TrainEvent),
    ) -> Result<TrainReport>
    where
        T: Task<M>,
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
        let active = model.active_adapters();
        let fresh = self.progress.is_none();
        if fresh {
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
                config: cfg.clone(),
                next_epoch: 0,
                global_step: 0,
                best_epoch: None,
                best_loss: None,
                bad_epochs: 0,
                history: Vec::new(),
                stopped: None,
                layer_seeds,
                adapters: active.clone(),
                monitor: None,
            });
            self.optimizer = Some(AdamW::new(vars.clone(), cfg.adamw())?);
            model.state().manual_seed(cfg.seed)?;
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
        let schedule = Schedule::new(cfg.schedule, warmup_steps, total_steps);
        let trainable = model.trainable_parameters_line()?;
        let mut seen_warnings: Vec<String> = Vec::new();
        let (start_epoch, start_step) = {
            let p = self.progress.as_ref().expect("progress set above");
            (p.next_epoch, p.global_step)
        };
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

        let result = self.run_epochs(
            model,
            task,
            data,
            &mut on_event,
            &mut seen_warnings,
            &schedule,
            total_steps,
        );
        let _ = model.eval();
        let _ = model.state().drain_kl();
        let stop = result?;

        let p = self.progress.as_ref().expect("progress set above");
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

    #[allow(clippy::too_many_arguments)]
    fn run_epochs<M, T, D>(
        &mut self,
        model: &mut PeftModel<M>,
        task: &T,
        data: &mut D,
        on_event: &mut impl FnMut(TrainEvent),
        seen_warnings: &mut Vec<String>,
        schedule: &Schedule,
        total_steps: usize,
    ) -> Result<StopReason>
    where
        T: Task<M>,
        D: TrainData<Batch = T::Batch>,
    {
        let cfg = self.config.clone();
        if let Some(stop) = self.progress.as_ref().and_then(|p| p.stopped) {
            return Ok(stop);
        }
        let mut stop = StopReason::Completed;
        let start_epoch = self.progress.as_ref().map(|p| p.next_epoch).unwrap_or(0);
        for epoch in start_epoch..cfg.epochs {
            let epoch_started = Instant::now();
            self.reseed_layers(model, epoch)?;
            let (train, last_lr) = self.train_epoch(model, task, data, on_event, epoch, schedule, total_steps)?;
            let train_seconds = epoch_started.elapsed().as_secs_f64();

            // Evaluation.
            model.eval()?;
            let mut val = Sums::new();
            let mut val_batches = 0usize;
            for batch in data.val_batches()? {
                let batch = batch?;
                // no autograd graph for validation: activations are freed layer by layer
                let out = model.state().no_grad(|| task.step(model, &batch))??;
                model.state().drain_kl()?;
                let loss = scalar_f64(&out.loss, "the task's validation loss")?;
                if !loss.is_finite() {
                    return Err(self.non_finite(
                        format!("validation loss after epoch {}", epoch + 1),
                        1,
                        epoch,
                    ));
                }
                val.add(loss, out.examples, out.correct);
                val_batches += 1;
            }
            let has_val = val_batches > 0 && val.examples > 0;
            let monitor = if has_val { Monitor::ValLoss } else { Monitor::TrainLoss };
            let monitored = if has_val { val.mean_loss() } else { train.mean_loss() };

            let p = self.progress.as_mut().expect("progress");
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

            let active = model.active_adapters();
            let active_refs: Vec<&str> = active.iter().map(String::as_str).collect();
            if improved {
                let dir = cfg.best_dir();
                let warnings = model.save_pretrained(&dir, Some(&active_refs))?;
                emit_new_warnings(warnings, seen_warnings, on_event);
                on_event(TrainEvent::CheckpointSaved { kind: CheckpointKind::Best, path: dir, epoch: epoch + 1 });
            }
            let dir = cfg.last_dir();
            let warnings = model.save_pretrained(&dir, Some(&active_refs))?;
            emit_new_warnings(warnings, seen_warnings, on_event);
            self.write_trainer_state(model, &dir)?;
            on_event(TrainEvent::CheckpointSaved { kind: CheckpointKind::Last, path: dir, epoch: epoch + 1 });

            if early {
                on_event(TrainEvent::EarlyStop {
                    epoch: epoch + 1,
                    best_epoch: best_epoch.unwrap_or(epoch + 1),
                    best_loss: best_loss.unwrap_or(monitored),
                    patience: cfg.patience.unwrap_or(bad),
                });
                stop = StopReason::EarlyStopped;
                break;
            }
        }
        Ok(stop)
    }

    #[allow(clippy::too_many_arguments)]
    fn train_epoch<M, T, D>(
        &mut self,
        model: &mut PeftModel<M>,
        task: &T,
        data: &mut D,
        on_event: &mut impl FnMut(TrainEvent),
        epoch: usize,
        schedule: &Schedule,
        total_steps: usize,
    ) -> Result<(Sums, f64)>
    where
        T: Task<M>,
        D: TrainData<Batch = T::Batch>,
    {
        let cfg = self.config.clone();
        model.train()?;
        let mut sums = Sums::new();
        let mut acc = GradAccumulator::new(cfg.grad_accum)?;
        let mut group = Sums::new();
        let mut group_started = Instant::now();
        let mut last_lr = self.optimizer.as_ref().map(|o| o.lr()).unwrap_or(cfg.lr);
        let mut micro = 0usize;
        let expected = data.num_train_batches();
        let mut batches = data.train_batches(epoch)?;
        loop {
            let next = batches.next();
            let end_of_epoch = next.is_none();
            if let Some(batch) = next {
                let batch = batch?;
                micro += 1;
                let out = match task.step(model, &batch) {
                    Ok(out) => out,
                    // the layers' overflow guard (or any non-finite value found in the forward)
                    // stops training like a non-finite loss: step named, checkpoints intact
                    Err(Error::NonFinite { what, count, hint }) => {
                        let step = self.steps_done();
                        return Err(self.non_finite(
                            format!(
                                "forward pass in epoch {}, micro-batch {micro}, before optimizer step {}: {what}{hint}",
                                epoch + 1,
                                step + 1
                            ),
                            count,
                            epoch,
                        ));
                    }
                    Err(e) => return Err(e),
                };
                let kl = model.state().drain_kl_mean()?;
                let loss_v = scalar_f64(&out.loss, "the task's training loss")?;
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
                let total = match (&kl, cfg.kl_weight) {
                    (Some(k), w) if w != 0.0 => (out.loss.to_dtype(DType::F32)? + (k.to_dtype(DType::F32)? * w)?)?,
                    _ => out.loss.clone(),
                };
                let store = total.backward()?;
                let optimizer = self.optimizer.as_ref().expect("optimizer");
                acc.add(optimizer.gradients(&store))?;
                drop(store);
                sums.add(loss_v, out.examples, out.correct);
                group.add(loss_v, out.examples, out.correct);
                if let Some(k) = kl_v {
                    sums.kl += k;
                    sums.kl_n += 1;
                    group.kl += k;
                    group.kl_n += 1;
                }
                if !acc.is_full() {
                    continue;
                }
            }
            // An optimizer step: a full group, or the rest at the end of the epoch.
            if let Some(mut grads) = acc.take()? {
                let step = self.steps_done();
                let norm = match cfg.max_grad_norm {
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
                let lr = schedule.lr(cfg.lr, step);
                let optimizer = self.optimizer.as_mut().expect("optimizer");
                optimizer.set_lr(lr);
                optimizer.step(&grads)?;
                if let Some((name, count)) = first_non_finite_var(&optimizer.vars())? {
                    return Err(self.non_finite(
                        format!("adapter variable `{name}` after optimizer step {} (epoch {})", step + 1, epoch + 1),
                        count,
                        epoch,
                    ));
                }
                last_lr = lr;
                let p = self.progress.as_mut().expect("progress");
                p.global_step += 1;
                let elapsed = group_started.elapsed().as_secs_f64();
                on_event(TrainEvent::Step {
                    epoch: epoch + 1,
                    step: p.global_step,
                    steps: total_steps,
                    lr,
                    loss: group.mean_loss(),
                    kl: group.mean_kl(),
                    grad_norm: norm,
                    examples_per_sec: if elapsed > 0.0 { group.examples as f64 / elapsed } else { 0.0 },
                });
                group = Sums::new();
                group_started = Instant::now();
            }
            if end_of_epoch {
                break;
            }
        }
        drop(batches);
        if micro != expected {
            on_event(TrainEvent::Warning {
                message: format!(
                    "epoch {}: the data gave {micro} training batches but num_train_batches() said \
                     {expected}; the learning-rate schedule assumed {expected}",
                    epoch + 1
                ),
            });
        }
        Ok((sums, last_lr))
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
        let p = self.progress.as_ref().expect("progress");
        let optimizer = self.optimizer.as_ref().expect("optimizer");
        let mut tensors: BTreeMap<String, Tensor> = BTreeMap::new();
        for v in optimizer.vars() {
            tensors.insert(format!("{PARAM_PREFIX}{}", v.name), v.var.as_detached_tensor());
        }
        for (k, t) in optimizer.state_tensors()? {
            tensors.insert(format!("{OPTIM_PREFIX}{k}"), t);
        }
        let rng = model.state().with_global_generator(|g| g.get_state())?;
        let n = rng.len();
        tensors.insert(RNG_KEY.into(), Tensor::from_vec(rng, n, &Device::Cpu)?);
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

fn emit_new_warnings(warnings: Vec<String>, seen: &mut Vec<String>, on_event: &mut impl FnMut(TrainEvent)) {
    for w in warnings {
        if !seen.contains(&w) {
            seen.push(w.clone());
            on_event(TrainEvent::Warning { message: w });
        }
    }
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
