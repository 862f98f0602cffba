//! Monte Carlo prediction: `S` forward passes with the PVeRA latent sampled, run as one larger
//! batch (chunked to a row budget), with a seeded generator so a run is reproducible.
//!
//! Rows are laid out sample-major: a chunk of `k` samples of a batch of `B` inputs is one forward
//! of `k·B` rows, rows `j·B .. (j+1)·B` being sample `j`. Noise is drawn per layer for the whole
//! chunk in one call, in the order the layer sees its rows.
//!
//! **Reproducibility and PEFT.** With `seed`, the run state's global generator is seeded and every
//! layer generator (PEFT's `generator_seed`) restarts from its initial seed before sampling, so a
//! prediction is a function of the inputs and the seed. An adapter with `generator_seed` draws the
//! noise that seed fixes (the run seed only reaches the global generator, i.e. adapters without
//! one); change it with [`Site::set_generator_seed`](crate::layer::Site::set_generator_seed). [`McMode::Sequential`] runs the `S`
//! passes one after another, exactly as PEFT's example does (`[model(x) for _ in range(16)]`), and
//! reproduces PEFT's sampled outputs for any shapes. [`McMode::Batched`] draws the same numbers
//! as the sequential passes when every adapted layer has its own generator (`generator_seed`) and
//! `B·r` is a multiple of 16 (torch's vectorised normal kernel then fills a batch of `k` samples
//! exactly as `k` calls would); otherwise it draws other, equally distributed noise. Noise from
//! the global generator (no `generator_seed`) interleaves the layers per pass, so only the
//! sequential mode matches PEFT there.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::models::ModelInputs;
use crate::peft_model::PeftModel;
use crate::rng::splitmix64_mix;
use crate::state::{Mode, RowPlan, RunState, Sampling};

/// How the `S` passes are executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum McMode {
    /// Samples stacked into larger batches of at most `max_rows` rows (fast).
    #[default]
    Batched,
    /// One forward per sample, as PEFT's example (PEFT-identical noise for any shapes).
    Sequential,
}

/// Where the sampling noise comes from.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum McNoise {
    /// The generators' streams, as PEFT draws them: each layer's own generator (`generator_seed`)
    /// or the run state's global one, restarted from the seed; the noise of an input then depends
    /// on the batch around it (its size, the other inputs).
    #[default]
    Generators,
    /// Each input's own noise: sample `j` of input `i` draws from seeds derived from
    /// `(seed, first + i, j)` ([`input_noise_seed`]), so an input's samples are the same whatever
    /// batch, chunk size, mode or other requests it is predicted with. `first` is the index of the
    /// batch's first input in the caller's numbering (e.g. its position in a request).
    PerInput {
        /// Index of the batch's first input.
        first: u64,
    },
    /// [`McNoise::PerInput`] with each batch row's own `(seed, input index)`: rows of different
    /// requests (each with its seed and its numbering) share one batch, and every row draws what
    /// it would draw predicted alone ([`input_noise_seed`]`(seed, index, j)`).
    PerRow(std::sync::Arc<Vec<(u64, u64)>>),
}

/// The noise seed of sample `sample` of input `input` under [`McNoise::PerInput`] (each sampled
/// layer mixes it further with its module path and the adapter's position among the active
/// adapters, never its name).
pub fn input_noise_seed(seed: u64, input: u64, sample: u64) -> u64 {
    splitmix64_mix(
        seed ^ splitmix64_mix(input.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ sample.wrapping_mul(0xc2b2_ae3d_27d4_eb4f)),
    )
}

/// Settings of a Monte Carlo prediction.
#[derive(Clone, Debug, PartialEq)]
pub struct McConfig {
    /// Number of samples `S` (at least 1; intervals need 2).
    pub samples: usize,
    /// Row budget of one forward in batched mode: `k = max(1, max_rows / B)` samples per chunk.
    pub max_rows: usize,
    /// Seed of the run (global generator + restart of layer generators); `None` continues the
    /// generators where they are (PEFT's behaviour across calls).
    pub seed: Option<u64>,
    /// Batched or sequential.
    pub mode: McMode,
    /// Where to sample: [`Sampling::Always`] samples every adapted layer (default);
    /// [`Sampling::FromConfig`] only the layers whose `sample_at_inference` is on (the config,
    /// its per-module dict, or [`PeftModel::set_sample_at_inference`]).
    pub sampling: Sampling,
    /// Also run the mean-mode (unsampled) forward and return its probabilities.
    pub with_mean: bool,
    /// Where the noise comes from (the generators' streams, or each input's own seeds).
    pub noise: McNoise,
}

/// Default row budget of one batched Monte Carlo forward: small stacks are as fast as large ones
/// and need far less memory. Measured with `pvera bench` (16 samples, 2 threads): MiniLM-L6 16 × 128
/// tokens 3.24 s / 3.23 s / 3.28 s with 2 / 4 / 16 samples per forward at 232 MB / 348 MB / 1.0 GB
/// peak RSS; DINOv2-S 8 × 224²: 6.6 s / 6.5 s / 6.4 s with 2 / 4 / 8 at 248 / 374 / 653 MB. (With
/// glibc's default allocator settings, which the `pvera` binary changes, forwards with tensors
/// above 32 MiB were up to 1.8x slower: every such tensor was a fresh, page-faulted mapping.)
pub const DEFAULT_MAX_ROWS: usize = 32;

impl Default for McConfig {
    fn default() -> Self {
        McConfig {
            samples: 16,
            max_rows: DEFAULT_MAX_ROWS,
            seed: Some(0),
            mode: McMode::Batched,
            sampling: Sampling::Always,
            with_mean: true,
            noise: McNoise::Generators,
        }
    }
}

impl McConfig {
    fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            return Err(Error::config("samples", "a Monte Carlo prediction needs at least 1 sample (16 is usual)"));
        }
        if self.max_rows == 0 {
            return Err(Error::config("max_rows", "the row budget must be at least 1"));
        }
        if matches!(self.noise, McNoise::PerInput { .. }) && self.seed.is_none() {
            return Err(Error::config("seed", "per-input noise (McNoise::PerInput) derives every input's noise from the seed; give one"));
        }
        if self.sampling == Sampling::Never {
            return Err(Error::config(
                "sampling",
                "Sampling::Never draws no samples; use Sampling::Always or Sampling::FromConfig",
            ));
        }
        Ok(())
    }
}

/// Inputs a Monte Carlo prediction can stack: a row count and a repetition along rows.
pub trait McInput: Clone {
    /// Rows (examples) in the input.
    fn rows(&self) -> Result<usize>;
    /// The input repeated `k` times along the first dimension (sample-major).
    fn repeat_rows(&self, k: usize) -> Result<Self>;
}

fn repeat_tensor(t: &Tensor, k: usize) -> Result<Tensor> {
    if k == 1 {
        return Ok(t.clone());
    }
    let copies = vec![t; k];
    Ok(Tensor::cat(&copies, 0)?)
}

impl McInput for Tensor {
    fn rows(&self) -> Result<usize> {
        self.dims()
            .first()
            .copied()
            .ok_or_else(|| Error::Model("Monte Carlo input is a scalar; expected a batch".into()))
    }
    fn repeat_rows(&self, k: usize) -> Result<Self> {
        repeat_tensor(self, k)
    }
}

impl McInput for ModelInputs {
    fn rows(&self) -> Result<usize> {
        [&self.input_ids, &self.pixel_values, &self.attention_mask, &self.token_type_ids]
            .into_iter()
            .flatten()
            .find_map(|t| t.dims().first().copied())
            .ok_or_else(|| Error::Model("Monte Carlo input has no tensors (input_ids or pixel_values)".into()))
    }
    fn repeat_rows(&self, k: usize) -> Result<Self> {
        let rep = |t: &Option<Tensor>| t.as_ref().map(|t| repeat_tensor(t, k)).transpose();
        Ok(ModelInputs {
            input_ids: rep(&self.input_ids)?,
            attention_mask: rep(&self.attention_mask)?,
            token_type_ids: rep(&self.token_type_ids)?,
            pixel_values: rep(&self.pixel_values)?,
        })
    }
}

/// Class probabilities of a Monte Carlo prediction.
#[derive(Clone, Debug)]
pub struct McOutput {
    /// Samples `S`.
    pub samples: usize,
    /// Inputs `B`.
    pub inputs: usize,
    /// Classes `C`.
    pub classes: usize,
    /// `S x B x C` probabilities, sample-major.
    pub probs: Vec<f64>,
    /// `B x C` mean-mode probabilities (when asked for).
    pub mean_mode: Option<Vec<f64>>,
    /// Forward passes run.
    pub forwards: usize,
}

impl McOutput {
    /// The `S` probability vectors of input `b`.
    pub fn input_samples(&self, b: usize) -> Vec<Vec<f64>> {
        (0..self.samples)
            .map(|s| {
                let o = (s * self.inputs + b) * self.classes;
                self.probs[o..o + self.classes].to_vec()
            })
            .collect()
    }
    /// The mean-mode probabilities of input `b`.
    pub fn input_mean_mode(&self, b: usize) -> Option<Vec<f64>> {
        self.mean_mode.as_ref().map(|m| m[b * self.classes..(b + 1) * self.classes].to_vec())
    }
}

/// Restores mode and sampling override when dropped (also on errors).
struct Restore<'a> {
    state: &'a RunState,
    mode: Mode,
    sampling: Sampling,
    grad: bool,
    rows: RowPlan,
}

impl<'a> Restore<'a> {
    fn new(state: &'a RunState) -> Self {
        Restore { state, mode: state.mode(), sampling: state.sampling(), grad: state.grad_enabled(), rows: state.rows() }
    }
}

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        let _ = self.state.set_mode(self.mode);
        let _ = self.state.set_sampling(self.sampling);
        let _ = self.state.set_grad_enabled(self.grad);
        let _ = self.state.set_rows(std::mem::take(&mut self.rows));
    }
}

/// The plan of a chunk of `k` stacked samples (sample-major) starting at sample `from`: the
/// caller's per-row adapters repeated per sample, and per-input noise seeds when asked.
fn chunk_plan(base: &RowPlan, cfg: &McConfig, b: usize, from: usize, k: usize) -> Result<RowPlan> {
    let adapters = match &base.adapters {
        Some(a) if a.len() != b => {
            return Err(Error::Model(format!("the row plan names {} adapter(s) for a batch of {b} input(s)", a.len())))
        }
        Some(a) => Some(std::sync::Arc::new((0..k).flat_map(|_| a.iter().cloned()).collect::<Vec<_>>())),
        None => None,
    };
    let seeds = match (&cfg.noise, cfg.seed) {
        (McNoise::PerInput { first }, Some(seed)) => {
            let first = *first;
            Some(std::sync::Arc::new(
                (0..k)
                    .flat_map(|j| (0..b).map(move |i| input_noise_seed(seed, first + i as u64, (from + j) as u64)))
                    .collect::<Vec<_>>(),
            ))
        }
        (McNoise::PerRow(ids), _) => {
            if ids.len() != b {
                return Err(Error::Model(format!("per-row noise names {} row(s) for a batch of {b} input(s)", ids.len())));
            }
            Some(std::sync::Arc::new(
                (0..k)
                    .flat_map(|j| ids.iter().map(move |&(seed, i)| input_noise_seed(seed, i, (from + j) as u64)))
                    .collect::<Vec<_>>(),
            ))
        }
        _ => None,
    };
    Ok(RowPlan { adapters, seeds })
}

/// Row-wise softmax in f64 of `logits (rows, C)` (logits or log-probabilities).
pub(crate) fn softmax_rows(logits: &Tensor, rows: usize) -> Result<(Vec<f64>, usize)> {
    let dims = logits.dims();
    if dims.len() != 2 || dims[0] != rows {
        return Err(Error::Model(format!(
            "Monte Carlo forward returned shape {dims:?}; expected (rows = {rows}, classes) logits"
        )));
    }
    let c = dims[1];
    if c == 0 {
        return Err(Error::Model("Monte Carlo forward returned zero classes".into()));
    }
    let v = logits.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let mut out = Vec::with_capacity(v.len());
    for row in v.chunks(c) {
        let m = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = row.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        out.extend(e.into_iter().map(|x| x / z));
    }
    Ok((out, c))
}

/// Monte Carlo prediction of `input` with `model`: `forward` maps an input of `n` rows to logits
/// (or log-probabilities) `(n, C)`. The model is put in eval mode with sampling on and gradients
/// off for the call, and restored afterwards. Fails on merged adapters (a merged layer cannot sample)
/// and, with [`Error::Request`], when no adapter of the forward is a PVeRA adapter (VeRA has no
/// latent to sample).
pub fn mc_predict<M, I, F>(model: &PeftModel<M>, input: &I, cfg: &McConfig, forward: F) -> Result<McOutput>
where
    I: McInput,
    F: Fn(&I) -> Result<Tensor>,
{
    cfg.validate()?;
    // The adapters this forward runs: the row plan's, else the active ones.
    let used: Vec<String> = match &model.state().rows().adapters {
        Some(rows) => rows.iter().flatten().cloned().collect(),
        None => model.active_adapters(),
    };
    if !used.is_empty() && used.iter().all(|a| model.method(a).is_ok_and(|m| !m.samples())) {
        return Err(crate::layer::vera_cannot_sample(&used.join(",")));
    }
    let registry = model.registry();
    for site in registry.sites() {
        let merged = site.site().merged_adapters()?;
        if !merged.is_empty() {
            return Err(Error::Adapter(format!(
                "Monte Carlo prediction needs unmerged adapters, but {merged:?} are merged into {}; call \
                 unmerge_adapter() first (a merged layer computes the mean path only)",
                site.site().path()
            )));
        }
    }
    let state = model.state();
    let restore = Restore::new(state);
    state.set_mode(Mode::Eval)?;
    // inference only: no autograd graph, so each layer's activations are freed as soon as used
    state.set_grad_enabled(false)?;
    let b = input.rows()?;
    if b == 0 {
        return Err(Error::Model("Monte Carlo prediction of an empty batch".into()));
    }

    let mean_mode = if cfg.with_mean {
        state.set_sampling(Sampling::Never)?;
        state.set_rows(RowPlan { adapters: restore.rows.adapters.clone(), seeds: None })?;
        Some(softmax_rows(&forward(input)?, b)?)
    } else {
        None
    };

    if let Some(seed) = cfg.seed {
        state.manual_seed(seed)?;
        for site in registry.sites() {
            let site = site.site();
            for adapter in site.adapter_names()? {
                if let Some(s) = site.with_slot(&adapter, |slot| slot.generator_seed())? {
                    site.set_generator_seed(&adapter, Some(s))?;
                }
            }
        }
    }
    state.set_sampling(cfg.sampling)?;
    let per = match cfg.mode {
        McMode::Sequential => 1,
        McMode::Batched => (cfg.max_rows / b).max(1),
    };
    let mut probs = Vec::new();
    let mut classes = None;
    let mut done = 0;
    let mut forwards = 0;
    while done < cfg.samples {
        let k = per.min(cfg.samples - done);
        state.set_rows(chunk_plan(&restore.rows, cfg, b, done, k)?)?;
        let x = input.repeat_rows(k)?;
        let (p, c) = softmax_rows(&forward(&x)?, k * b)?;
        if *classes.get_or_insert(c) != c {
            return Err(Error::Model("Monte Carlo forward changed its number of classes between chunks".into()));
        }
        probs.extend(p);
        done += k;
        forwards += 1;
    }
    let classes = classes.unwrap_or(0);
    if let Some((_, c)) = &mean_mode {
        if *c != classes {
            return Err(Error::Model("mean-mode and sampled forwards returned different class counts".into()));
        }
    }
    Ok(McOutput { samples: cfg.samples, inputs: b, classes, probs, mean_mode: mean_mode.map(|m| m.0), forwards })
}

/// The mean-mode prediction alone (no sampling anywhere): class probabilities of each input,
/// `(inputs, classes)` row-major in f64. The model's mode, sampling override and grad mode are
/// restored afterwards, as [`mc_predict`] does. Works on merged adapters too (the mean path is
/// what a merged layer computes).
pub fn mean_predict<M, I, F>(model: &PeftModel<M>, input: &I, forward: F) -> Result<(Vec<f64>, usize)>
where
    I: McInput,
    F: Fn(&I) -> Result<Tensor>,
{
    let state = model.state();
    let _restore = Restore::new(state);
    state.set_mode(Mode::Eval)?;
    state.set_grad_enabled(false)?;
    state.set_sampling(Sampling::Never)?;
    let b = input.rows()?;
    if b == 0 {
        return Err(Error::Model("mean-mode prediction of an empty batch".into()));
    }
    softmax_rows(&forward(input)?, b)
}
