//! Run state shared by every adaptable layer of one model.
//!
//! Model `forward` signatures stay as each family needs them; what PEFT keeps in module flags
//! (`training`, the active adapters, `disable_adapters`) lives here, in one object every site
//! holds an `Arc` to. KL terms of the PVeRA latent are collected here during a training forward
//! and drained by the trainer.

use std::sync::{Arc, Mutex, RwLock};

use candle_core::Tensor;

use crate::error::{Error, Result};
use crate::rng::TorchGenerator;

/// Whether layers behave as in `model.train()` or `model.eval()`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Mode {
    /// Training: dropout active, the latent is always sampled.
    Train,
    /// Evaluation: the mean path, unless `sample_at_inference` asks for sampling.
    #[default]
    Eval,
}

/// Run-time override of each adapter's `sample_at_inference` in eval mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sampling {
    /// Use each layer's own setting (from the config; per module when it is a dict).
    #[default]
    FromConfig,
    /// Sample the latent everywhere (Monte Carlo prediction).
    Always,
    /// Never sample in eval mode (the mean path).
    Never,
}

/// How sampling noise is drawn when an adapter has a `generator_seed`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum NoisePolicy {
    /// PEFT's behaviour: every adapted layer owns a generator seeded with `generator_seed`, so
    /// same-shaped layers draw identical noise on every call (docs/peft-behaviour.md §5). Sampled outputs match
    /// PEFT's given the same inputs.
    #[default]
    PeftCompatible,
    /// Each layer's generator is seeded with a mix of `generator_seed` and the layer's module
    /// path, so layers draw independent noise; still reproducible from the seed.
    Independent,
}

/// Per-row routing of one forward pass over a batch: which adapter each batch row goes through
/// (a mixed-adapter batch) and the seed of each row's sampling noise. Set for one forward (or one
/// Monte Carlo call) and cleared afterwards; see [`RunState::set_rows`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RowPlan {
    /// The adapter of each batch row (`None`: the base model alone). When set, the active adapters
    /// are ignored and every site routes each row through its own adapter; auto-merged weights do
    /// not apply.
    pub adapters: Option<Arc<Vec<Option<String>>>>,
    /// The noise seed of each batch row: a sampling layer draws row `i`'s ε from a generator seeded
    /// with a mix of `seeds[i]`, the module path and the adapter's position among the active
    /// adapters (never its name), so a row's noise does not depend on the other rows of its batch
    /// (the batch may mix requests, adapters, sizes) or on what its adapter is called.
    pub seeds: Option<Arc<Vec<u64>>>,
}

impl RowPlan {
    /// Number of batch rows the plan describes (`None` when it describes none).
    pub fn rows(&self) -> Option<usize> {
        self.adapters.as_ref().map(|a| a.len()).or_else(|| self.seeds.as_ref().map(|s| s.len()))
    }
}

/// One KL term produced by one adapter in one layer during a forward pass.
#[derive(Clone, Debug)]
pub struct KlTerm {
    /// Module path of the layer.
    pub module: String,
    /// Adapter name.
    pub adapter: String,
    /// Scalar tensor `-0.5 * mean(1 + logvar - mu^2 - exp(logvar))`, differentiable.
    pub value: Tensor,
}

/// A consistent snapshot of the flags a forward pass reads.
#[derive(Clone, Debug)]
pub struct ForwardView {
    /// Train or eval.
    pub mode: Mode,
    /// Sampling override.
    pub sampling: Sampling,
    /// Active adapters, in order.
    pub active: Vec<String>,
    /// Adapters disabled.
    pub disabled: bool,
    /// Record KL terms in training.
    pub collect_kl: bool,
    /// Build the autograd graph through trainable variables (torch's grad mode).
    pub grad_enabled: bool,
    /// Eval mode may use cached merged weights (see [`RunState::set_auto_merge`]).
    pub auto_merge: bool,
    /// ... also while sampling (see [`RunState::set_merged_sampling`]).
    pub merged_sampling: bool,
    /// Per-row adapters and noise seeds of this forward (see [`RowPlan`]).
    pub rows: RowPlan,
}

#[derive(Debug)]
struct Flags {
    mode: Mode,
    sampling: Sampling,
    active: Vec<String>,
    disabled: bool,
    collect_kl: bool,
    auto_merge: bool,
    merged_sampling: bool,
    noise: NoisePolicy,
    grad_enabled: bool,
    rows: RowPlan,
}

/// The shared state of one model (see the module docs).
#[derive(Debug)]
pub struct RunState {
    flags: RwLock<Flags>,
    kl: Mutex<Vec<KlTerm>>,
    /// The generator used where PEFT uses torch's global generator: noise of adapters without
    /// `generator_seed`, and dropout masks.
    global: Mutex<TorchGenerator>,
}

impl Default for RunState {
    fn default() -> Self {
        Self::new(0)
    }
}

fn poisoned() -> Error {
    Error::Model("the run-state lock was poisoned by a panicking thread".into())
}

impl RunState {
    /// A fresh state in eval mode with `seed` for the global generator.
    pub fn new(seed: u64) -> Self {
        Self {
            flags: RwLock::new(Flags {
                mode: Mode::Eval,
                sampling: Sampling::FromConfig,
                active: vec!["default".to_string()],
                disabled: false,
                collect_kl: true,
                auto_merge: true,
                merged_sampling: false,
                noise: NoisePolicy::PeftCompatible,
                grad_enabled: true,
                rows: RowPlan::default(),
            }),
            kl: Mutex::new(Vec::new()),
            global: Mutex::new(TorchGenerator::new(seed)),
        }
    }

    /// The per-row plan of the forwards that follow ([`RowPlan::default`] clears it). Callers set
    /// it around one forward (or one Monte Carlo call) and clear it afterwards; a plan whose row
    /// count does not match a forward's batch is an error in that forward.
    pub fn set_rows(&self, plan: RowPlan) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.rows = plan;
        Ok(())
    }

    /// The current per-row plan.
    pub fn rows(&self) -> RowPlan {
        self.flags.read().map(|f| f.rows.clone()).unwrap_or_default()
    }

    /// Everything a layer's forward pass reads, under one lock.
    pub fn forward_view(&self) -> ForwardView {
        match self.flags.read() {
            Ok(f) => ForwardView {
                mode: f.mode,
                sampling: f.sampling,
                active: f.active.clone(),
                disabled: f.disabled,
                collect_kl: f.collect_kl,
                grad_enabled: f.grad_enabled,
                auto_merge: f.auto_merge,
                merged_sampling: f.merged_sampling,
                rows: f.rows.clone(),
            },
            Err(_) => ForwardView {
                mode: Mode::Eval,
                sampling: Sampling::FromConfig,
                active: Vec::new(),
                disabled: false,
                collect_kl: true,
                grad_enabled: true,
                auto_merge: false,
                merged_sampling: false,
                rows: RowPlan::default(),
            },
        }
    }

    /// Current mode.
    pub fn mode(&self) -> Mode {
        self.flags.read().map(|f| f.mode).unwrap_or_default()
    }
    /// Switches train/eval.
    pub fn set_mode(&self, mode: Mode) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.mode = mode;
        Ok(())
    }
    /// Whether forwards build the autograd graph through trainable variables (default true, as
    /// torch's grad mode; independent of train/eval mode).
    pub fn grad_enabled(&self) -> bool {
        self.flags.read().map(|f| f.grad_enabled).unwrap_or(true)
    }
    /// Switches gradient tracking (torch's `set_grad_enabled`). Off, trainable variables enter
    /// forwards detached: no graph is built and every intermediate is freed as soon as it is used,
    /// which is what inference wants (memory of one layer instead of all layers).
    pub fn set_grad_enabled(&self, on: bool) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.grad_enabled = on;
        Ok(())
    }
    /// Runs `f` with gradient tracking off (torch's `no_grad`), restoring the previous setting.
    pub fn no_grad<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let before = self.grad_enabled();
        self.set_grad_enabled(false)?;
        let out = f();
        self.set_grad_enabled(before)?;
        Ok(out)
    }
    /// Current sampling override.
    pub fn sampling(&self) -> Sampling {
        self.flags.read().map(|f| f.sampling).unwrap_or_default()
    }
    /// Sets the sampling override for eval mode.
    pub fn set_sampling(&self, sampling: Sampling) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.sampling = sampling;
        Ok(())
    }
    /// The active adapter names, in order.
    pub fn active_adapters(&self) -> Vec<String> {
        self.flags.read().map(|f| f.active.clone()).unwrap_or_default()
    }
    /// Replaces the active adapters.
    pub fn set_active_adapters(&self, names: Vec<String>) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.active = names;
        Ok(())
    }
    /// True while adapters are disabled (`disable_adapter()` context in PEFT).
    pub fn adapters_disabled(&self) -> bool {
        self.flags.read().map(|f| f.disabled).unwrap_or(false)
    }
    /// Disables or re-enables all adapters.
    pub fn set_adapters_disabled(&self, disabled: bool) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.disabled = disabled;
        Ok(())
    }
    /// Whether training forwards record KL terms (on by default).
    pub fn collect_kl(&self) -> bool {
        self.flags.read().map(|f| f.collect_kl).unwrap_or(true)
    }
    /// Turns KL collection on or off.
    pub fn set_collect_kl(&self, on: bool) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.collect_kl = on;
        Ok(())
    }
    /// Whether eval-mode forwards use merged weights automatically (on by default).
    pub fn auto_merge(&self) -> bool {
        self.flags.read().map(|f| f.auto_merge).unwrap_or(false)
    }
    /// Turns automatic merging in eval mode on or off. When on, an adapted layer in eval mode
    /// whose active adapters are inference adapters (not trainable, so no λ needs a gradient)
    /// and do not sample computes with a cached `W + Σ ΔW` (rebuilt whenever the base weight,
    /// the active adapters, their projections or any λ value changes), so an adapted model costs
    /// what the base model costs. Outputs equal the unmerged ones up to float rounding (PEFT's
    /// own merged-vs-unmerged difference); turn it off to compute exactly PEFT's unmerged sums.
    /// Layers merged explicitly (`merge_adapter`), adapters disabled, `modules_to_save` copies,
    /// trainable adapters and non-f32 base weights are unaffected.
    pub fn set_auto_merge(&self, on: bool) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.auto_merge = on;
        Ok(())
    }
    /// Whether automatic merging also applies while adapters sample (off by default).
    pub fn merged_sampling(&self) -> bool {
        self.flags.read().map(|f| f.merged_sampling).unwrap_or(false)
    }
    /// With auto-merge on, also keep the mean path merged while sampling: only the noise path
    /// `λ_b ⊙ B·(ε ⊙ exp(0.5 · λ_d[R:] ⊙ A[R:]·x))` stays low-rank (same ε draws, in the same
    /// order). Off by default: the rounding then differs from PEFT's seeded sampled outputs by
    /// up to ~2e-5 on the test models, above the parity tolerance.
    pub fn set_merged_sampling(&self, on: bool) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.merged_sampling = on;
        Ok(())
    }
    /// The noise policy applied when adapters are created.
    pub fn noise_policy(&self) -> NoisePolicy {
        self.flags.read().map(|f| f.noise).unwrap_or_default()
    }
    /// Sets the noise policy; it takes effect for adapters created or re-seeded afterwards.
    pub fn set_noise_policy(&self, policy: NoisePolicy) -> Result<()> {
        self.flags.write().map_err(|_| poisoned())?.noise = policy;
        Ok(())
    }

    /// Reseeds the global generator (dropout masks, noise of adapters without `generator_seed`).
    pub fn manual_seed(&self, seed: u64) -> Result<()> {
        self.global.lock().map_err(|_| poisoned())?.manual_seed(seed);
        Ok(())
    }

    /// Runs `f` with the global generator.
    pub fn with_global_generator<T>(&self, f: impl FnOnce(&mut TorchGenerator) -> T) -> Result<T> {
        let mut g = self.global.lock().map_err(|_| poisoned())?;
        Ok(f(&mut g))
    }

    /// Records one KL term.
    pub(crate) fn push_kl(&self, term: KlTerm) -> Result<()> {
        self.kl.lock().map_err(|_| poisoned())?.push(term);
        Ok(())
    }

    /// Takes all KL terms recorded since the last drain.
    pub fn drain_kl(&self) -> Result<Vec<KlTerm>> {
        Ok(std::mem::take(&mut *self.kl.lock().map_err(|_| poisoned())?))
    }

    /// Drains the KL terms and returns their mean over layers and adapters (a differentiable
    /// scalar), or `None` if none were recorded. This is the per-layer average of the paper's
    /// `-0.5 * mean(1 + logvar - mu^2 - exp(logvar))`.
    pub fn drain_kl_mean(&self) -> Result<Option<Tensor>> {
        let terms = self.drain_kl()?;
        if terms.is_empty() {
            return Ok(None);
        }
        let n = terms.len() as f64;
        let mut sum = terms[0].value.clone();
        for t in &terms[1..] {
            sum = (sum + &t.value)?;
        }
        Ok(Some((sum / n)?))
    }
}
