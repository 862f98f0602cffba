//! `PeftModel`: adapters' lifecycle in PEFT's vocabulary.
//!
//! Construction mirrors `get_peft_model` (inject a new adapter) and `PeftModel.from_pretrained`
//! (inject, then load a saved directory). Afterwards adapters can be added, loaded, activated
//! (one or several, summed), disabled, merged, unmerged, deleted and finally unloaded, all on the
//! live model: the sites the model holds are shared with the registry.
//!
//! Differences from PEFT, each deliberate (all listed in docs/peft-behaviour.md):
//! - every adapter keeps the projections it was created or loaded with, so loading a second
//!   adapter whose file carries other projections does not overwrite the first adapter's (PEFT
//!   copies them into one shared buffer);
//! - a rank different from the first adapter's is refused up front (PEFT fails later, in the
//!   forward pass);
//! - PVeRA and VeRA adapters may live on one model (PEFT has one method per model): each method
//!   has its own shared projections, sized and seeded by its first adapter;
//! - loading refuses missing λ tensors, λ tensors for modules that are not targeted, wrong
//!   shapes and non-finite values (PEFT warns or ignores), and checks a checkpoint without
//!   `pvera_B` against the regenerated projections.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Tensor, Var};

use crate::builder::{ModelInfo, Registry};
use crate::config::{Method, PveraConfig};
use crate::error::{Error, Result};
use crate::projection::Projections;
use crate::rng::TorchKernel;
use crate::state::{Mode, RunState};

mod inject;
mod lifecycle;
mod load;
mod naming;
mod save;

pub use save::{format_trainable_line, group_thousands};

/// A trainable tensor and the name PEFT gives it in `named_parameters()` (without the adapter).
#[derive(Clone, Debug)]
pub struct NamedVar {
    /// Key as it appears in the adapter file (`base_model.model.<path>.pvera_lambda_b`,
    /// `...vera_lambda_b`, ...).
    pub name: String,
    /// The variable.
    pub var: Var,
}

/// How an adapter file names the model's modules, relative to the site paths (the checkpoint's
/// scheme): optionally under a task prefix (adapters trained on `BertForSequenceClassification`
/// name `bert.encoder...`), without one (site paths that carry it), and/or in an alternative
/// naming scheme (transformers 5's `attention.q_proj`). Saving keeps the form the adapter came in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NameForm {
    /// Prefix added in front of the site path.
    pub add_prefix: Option<String>,
    /// Prefix removed from the site path.
    pub strip_prefix: Option<String>,
    /// Index into `ModelInfo::alt_schemes`.
    pub alt: Option<usize>,
}

/// What one adapter is, beyond its per-layer λ's.
#[derive(Clone, Debug)]
pub struct AdapterInfo {
    /// The config as it will be saved (targets resolved as PEFT resolves them).
    pub config: PveraConfig,
    /// The projections this adapter uses.
    pub projections: Arc<Projections>,
    /// Module paths of the adapted layers.
    pub targets: Vec<String>,
    /// Module paths of the `modules_to_save` copies.
    pub modules_to_save: Vec<String>,
    /// Module paths whose base bias this adapter trains (`bias` != none).
    pub bias_modules: Vec<String>,
    /// How the adapter's file names modules (kept when saving).
    pub form: NameForm,
    /// Tensors of the adapter's file that this model does not use (e.g. the `classifier` of an
    /// adapter trained on a task class, loaded into the base model); written back unchanged on
    /// save, so the file stays complete for PEFT.
    pub passthrough: BTreeMap<String, Tensor>,
}

/// Warnings produced by an operation (the library never prints; callers decide).
pub type Warnings = Vec<String>;

/// A model with PVeRA and / or VeRA adapters.
pub struct PeftModel<M> {
    model: M,
    registry: Registry,
    info: ModelInfo,
    adapters: BTreeMap<String, AdapterInfo>,
    /// Order in which adapters were added (PEFT's first adapter sizes the projections).
    order: Vec<String>,
    kernel: TorchKernel,
    warnings: Warnings,
}

impl<M> std::fmt::Debug for PeftModel<M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeftModel")
            .field("info", &self.info)
            .field("adapters", &self.adapters.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl<M> PeftModel<M> {
    /// `get_peft_model(model, config, adapter_name)`: injects a fresh adapter and activates it.
    pub fn new(
        model: M,
        registry: Registry,
        info: ModelInfo,
        config: PveraConfig,
        adapter_name: &str,
    ) -> Result<Self> {
        let mut pm = Self::bare(model, registry, info);
        pm.inject(adapter_name, config, None, NameForm::default(), true)?;
        pm.set_adapter(&[adapter_name])?;
        Ok(pm)
    }

    /// `PeftModel.from_pretrained(model, dir, adapter_name, is_trainable)`.
    pub fn from_pretrained(
        model: M,
        registry: Registry,
        info: ModelInfo,
        dir: &Path,
        adapter_name: &str,
        is_trainable: bool,
    ) -> Result<Self> {
        let mut pm = Self::bare(model, registry, info);
        pm.load_adapter(dir, adapter_name, is_trainable)?;
        pm.set_adapter(&[adapter_name])?;
        if !is_trainable {
            pm.registry.state().set_mode(Mode::Eval)?;
        }
        Ok(pm)
    }

    /// A model without adapters yet (add or load them later); its forward is the base model's.
    pub fn from_parts(model: M, registry: Registry, info: ModelInfo) -> Self {
        Self::bare(model, registry, info)
    }

    fn bare(model: M, registry: Registry, info: ModelInfo) -> Self {
        let _ = registry.state().set_active_adapters(Vec::new());
        Self {
            model,
            registry,
            info,
            adapters: BTreeMap::new(),
            order: Vec::new(),
            kernel: TorchKernel::default(),
            warnings: Vec::new(),
        }
    }

    /// The wrapped model (call its forward).
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The registry of the model's layers.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The shared run state (mode, sampling, KL terms).
    pub fn state(&self) -> &Arc<RunState> {
        self.registry.state()
    }

    /// Model facts (model type, heads).
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Adapter names, sorted.
    pub fn adapter_names(&self) -> Vec<String> {
        self.adapters.keys().cloned().collect()
    }

    /// One adapter's info.
    pub fn adapter(&self, name: &str) -> Result<&AdapterInfo> {
        self.adapters.get(name).ok_or_else(|| self.unknown(name))
    }

    /// The config of an adapter (`peft_config[name]`).
    pub fn peft_config(&self, name: &str) -> Result<&PveraConfig> {
        Ok(&self.adapter(name)?.config)
    }

    /// The method of an adapter (PVeRA or VeRA).
    pub fn method(&self, name: &str) -> Result<Method> {
        Ok(self.adapter(name)?.config.method)
    }

    /// The first adapter (in the order they were added) of `method`: it sized and seeded the
    /// projections every later adapter of that method shares (PEFT's rule, per method).
    pub(crate) fn first_of(&self, method: Method) -> Option<&AdapterInfo> {
        self.first_name_of(method).and_then(|n| self.adapters.get(n))
    }

    /// The name of [`PeftModel::first_of`].
    pub(crate) fn first_name_of(&self, method: Method) -> Option<&String> {
        self.order.iter().find(|n| self.adapters.get(*n).is_some_and(|a| a.config.method == method))
    }

    /// Warnings accumulated by loads, adds and saves since the last call; drains them.
    pub fn take_warnings(&mut self) -> Warnings {
        std::mem::take(&mut self.warnings)
    }

    /// Uses the DEFAULT (two-rounding) torch kernel when regenerating projections for adapters
    /// created from now on (for checkpoints made on CPUs without AVX2).
    pub fn set_projection_kernel(&mut self, kernel: TorchKernel) {
        self.kernel = kernel;
    }

    /// `model.train()`.
    pub fn train(&self) -> Result<()> {
        self.state().set_mode(Mode::Train)
    }

    /// `model.eval()`.
    pub fn eval(&self) -> Result<()> {
        self.state().set_mode(Mode::Eval)
    }

    fn warn(&mut self, msg: String) {
        tracing::warn!("{msg}");
        self.warnings.push(msg);
    }

    fn unknown(&self, name: &str) -> Error {
        Error::UnknownAdapter { name: name.to_string(), known: format!("{:?}", self.adapter_names()) }
    }

    /// Number of adapters.
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// True when no adapter is attached.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }
}
