//! `PeftModel`: adapters' lifecycle in PEFT's vocabulary.
//!
//! Construction mirrors `get_peft_model` (inject a new adapter) and `PeftModel.from_pretrained`
//! (inject, then load a saved directory). Afterwards adapters can be added, loaded, activated
//! (one or several, summed), disabled, merged, unmerged, deleted and finally unloaded, all on the
//! live model: the sites the model holds are shared with the registry.
//!
//! Differences from PEFT, each deliberate (spec §9):
//! - every adapter keeps the projections it was created or loaded with, so loading a second
//!   adapter whose file carries other projections does not overwrite the first adapter's (PEFT
//!   copies them into one shared buffer);
//! - a rank different from the first adapter's is refused up front (PEFT fails later, in the
//!   forward pass);
//! - loading refuses missing λ tensors, λ tensors for modules that are not targeted, wrong
//!   shapes and non-finite values (PEFT warns or ignores), and checks a checkpoint without
//!   `pvera_B` against the regenerated projections.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use crate::checkpoint::{self, AdapterFiles, PROJ_A_KEY, PROJ_B_KEY};
use crate::config::{Bias, LayersToTransform, PveraConfig, TargetModules};
use crate::error::{Error, Result};
use crate::builder::{ModelInfo, Registry};
use crate::layer::{count_non_finite, Linear, SlotSpec};
use crate::projection::{count_bit_differences, Projections};
use crate::rng::{splitmix64_mix, TorchKernel};
use crate::state::{Mode, NoisePolicy, RunState};
use crate::targets::{self, TargetMatcher};

/// A trainable tensor and the name PEFT gives it in `named_parameters()` (without the adapter).
#[derive(Clone, Debug)]
pub struct NamedVar {
    /// Key as it appears in the adapter file (`base_model.model.<path>.pvera_lambda_b`, ...).
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

/// A model with PVeRA adapters.
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

fn mix_seed(seed: u64, path: &str) -> u64 {
    // FNV-1a of the module path, folded into the seed with a splitmix64 finaliser.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in path.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    splitmix64_mix(seed ^ h)
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

    /// Every naming form this model accepts, canonical first.
    pub fn name_forms(&self) -> Vec<NameForm> {
        let mut alts: Vec<Option<usize>> = vec![None];
        alts.extend((0..self.info.alt_schemes.len()).map(Some));
        let mut out = Vec::new();
        for alt in &alts {
            out.push(NameForm { alt: *alt, ..Default::default() });
        }
        for p in &self.info.task_prefixes {
            for alt in &alts {
                out.push(NameForm { add_prefix: Some(p.clone()), alt: *alt, ..Default::default() });
                out.push(NameForm { strip_prefix: Some(p.clone()), alt: *alt, ..Default::default() });
            }
        }
        out
    }

    /// A site path in a naming form (`None` when the form does not apply to it).
    pub fn form_name(&self, form: &NameForm, path: &str) -> Option<String> {
        // A task head sits at the root in every form (`classifier`, not `bert.classifier`).
        if self.info.classifier.as_deref() == Some(path) {
            return Some(path.to_string());
        }
        let mut p = match &form.strip_prefix {
            Some(pre) => path.strip_prefix(pre.as_str())?.strip_prefix('.')?.to_string(),
            None => path.to_string(),
        };
        if let Some(i) = form.alt {
            p = (self.info.alt_schemes.get(i)?.map)(&p)?;
        }
        Some(match &form.add_prefix {
            Some(pre) => format!("{pre}.{p}"),
            None => p,
        })
    }

    /// All names of a site across forms (the canonical path first).
    fn all_names(&self, path: &str) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for f in self.name_forms() {
            if let Some(n) = self.form_name(&f, path) {
                if !out.contains(&n) {
                    out.push(n);
                }
            }
        }
        out
    }

    /// The module name an adapter's file uses for a site.
    fn file_name(&self, info: &AdapterInfo, path: &str) -> String {
        self.form_name(&info.form, path).unwrap_or_else(|| path.to_string())
    }

    /// Every `named_modules()` key the model would have (module prefixes of its parameters).
    fn module_keys(&self) -> Vec<String> {
        let mut keys: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        keys.insert(String::new());
        for p in self.registry.params() {
            let parts: Vec<&str> = p.name.split('.').collect();
            for i in 1..parts.len() {
                keys.insert(parts[..i].join("."));
            }
        }
        keys.into_iter().collect()
    }

    fn site_paths(&self) -> Vec<String> {
        self.registry.sites().iter().map(|l| l.site().path().to_string()).collect()
    }

    /// Resolves `target_modules` as PEFT does: default table by model type, `all-linear`
    /// expansion (minus the output head and, for SEQ_CLS, the classifier), compression of long
    /// lists to suffixes.
    fn resolve_targets(&self, config: &mut PveraConfig) -> Result<()> {
        match &config.target_modules {
            None => {
                let found = targets::default_target_modules(&self.info.model_type).ok_or_else(|| {
                    Error::NoDefaultTargets { model_type: self.info.model_type.clone() }
                })?;
                config.target_modules = Some(found);
            }
            Some(TargetModules::AllLinear) => {
                let seq_cls = config.task_type.as_deref() == Some("SEQ_CLS");
                let mut names: Vec<String> = Vec::new();
                for p in self.site_paths() {
                    if self.info.output_embedding.as_deref() == Some(p.as_str()) {
                        continue;
                    }
                    if self.info.output_embedding.is_none()
                        && seq_cls
                        && self.info.classifier.as_deref() == Some(p.as_str())
                    {
                        continue;
                    }
                    names.push(p);
                }
                config.target_modules = Some(TargetModules::List(names));
            }
            _ => {}
        }
        // PEFT compresses list targets of >= 20 names to minimal suffixes (tuners_utils.py l.918).
        if let Some(TargetModules::List(names)) = &config.target_modules {
            if let Some(short) = targets::maybe_compress_target_names(names, &self.module_keys())? {
                config.target_modules = Some(TargetModules::List(short));
            }
        }
        Ok(())
    }

    fn matched_sites(&self, config: &PveraConfig) -> Result<Vec<Linear>> {
        let matcher = TargetMatcher::new(config)?;
        let matched: Vec<Linear> = self
            .registry
            .sites()
            .iter()
            .filter(|l| self.all_names(l.site().path()).iter().any(|n| matcher.matches(n)))
            .cloned()
            .collect();
        if matched.is_empty() {
            self.layer_filter_matched_none(config)?;
            let patterns = match &config.target_modules {
                Some(TargetModules::List(l)) => format!("target_modules {l:?}"),
                Some(TargetModules::Regex(r)) => format!("target_modules regex {r:?} (full match)"),
                Some(TargetModules::AllLinear) => "all-linear".to_string(),
                None => "no target_modules".to_string(),
            };
            let mut known = self.site_paths();
            let more = known.len().saturating_sub(40);
            known.truncate(40);
            let mut known = known.join(", ");
            if more > 0 {
                known.push_str(&format!(", ... ({more} more)"));
            }
            return Err(Error::NoTargetMatched { patterns, known });
        }
        Ok(matched)
    }

    /// When `target_modules` selects layers but `layers_to_transform` keeps none of them, the
    /// error names the layer filter and the indices that exist, not the targets.
    fn layer_filter_matched_none(&self, config: &PveraConfig) -> Result<()> {
        let Some(filter) = config.layers_to_transform.as_ref().filter(|l| l.is_filter()) else { return Ok(()) };
        let unfiltered = PveraConfig { layers_to_transform: None, ..config.clone() };
        let matcher = TargetMatcher::new(&unfiltered)?;
        let mut indices = std::collections::BTreeSet::new();
        let mut any = false;
        for lin in self.registry.sites() {
            // Every naming form counts: the filtered match accepts a site under any of them.
            for n in self.all_names(lin.site().path()).iter().filter(|n| matcher.matches(n)) {
                any = true;
                indices.extend(targets::layer_index(n, config.layers_pattern.as_ref()));
            }
        }
        if !any {
            return Ok(());
        }
        let asked = match filter {
            LayersToTransform::One(i) => i.to_string(),
            LayersToTransform::Many(v) => format!("{v:?}"),
        };
        let pattern = match &config.layers_pattern {
            Some(p) if !p.is_empty() => format!(" under layers_pattern {:?}", p.patterns()),
            _ => String::new(),
        };
        let reason = if indices.is_empty() {
            format!(
                "{asked} selects no layer: none of the modules that target_modules matches has a layer \
                 index{pattern}; drop layers_to_transform or set layers_pattern to the name of the layer list"
            )
        } else {
            let list: Vec<String> = indices.iter().map(i64::to_string).collect();
            format!(
                "{asked} selects no layer: the modules that target_modules matches are in layers {}{pattern}; \
                 pick indices among those",
                list.join(", ")
            )
        };
        Err(Error::config("layers_to_transform", reason))
    }

    /// PEFT's `_check_new_adapter_config` against the existing adapters.
    fn check_new_adapter(&self, name: &str, config: &PveraConfig) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(Error::Adapter(format!(
                "Adapter with name {name} already exists; pick another name or delete_adapter({name:?}) first"
            )));
        }
        if name.is_empty() {
            return Err(Error::Adapter("adapter names must not be empty".into()));
        }
        if let Some(first) = self.order.first().and_then(|n| self.adapters.get(n)) {
            if first.config.projection_prng_key != config.projection_prng_key {
                return Err(Error::Adapter(format!(
                    "PVeRA PRNG initialisation key must be the same for all adapters. Got \
                     config.projection_prng_key={} but previous config had {}.",
                    config.projection_prng_key, first.config.projection_prng_key
                )));
            }
            if first.config.save_projection != config.save_projection {
                return Err(Error::Adapter(format!(
                    "PVeRA projection weights must be saved for all adapters or none, but got \
                     multiple different values: {{{}, {}}}",
                    py_bool(first.config.save_projection),
                    py_bool(config.save_projection)
                )));
            }
        }
        let with_bias = self.adapters.values().filter(|a| a.config.bias != Bias::None).count()
            + usize::from(config.bias != Bias::None);
        if with_bias > 1 {
            return Err(Error::Adapter(format!(
                "PveraModel supports only 1 adapter with bias. When using multiple adapters, set \
                 bias to 'none' for all adapters (adapter {name:?} has bias {:?}).",
                bias_str(&config.bias)
            )));
        }
        Ok(())
    }

    /// Creates the adapter in every matched layer. `projections` overrides the regenerated ones
    /// (checkpoint values).
    fn inject(
        &mut self,
        name: &str,
        mut config: PveraConfig,
        projections: Option<Arc<Projections>>,
        form: NameForm,
        strict_modules_to_save: bool,
    ) -> Result<()> {
        config.validate()?;
        self.check_new_adapter(name, &config)?;
        self.resolve_targets(&mut config)?;
        let matched = self.matched_sites(&config)?;
        let r = usize::try_from(config.r).map_err(|_| Error::config("r", "must be positive"))?;
        // PEFT overwrites fan_in_fan_out per layer type and stores it in the user's config.
        let any_conv = matched.iter().any(|l| l.site().kind().fan_in_fan_out());
        let any_linear = matched.iter().any(|l| !l.site().kind().fan_in_fan_out());
        if any_conv && !config.fan_in_fan_out {
            self.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting fan_in_fan_out to True.".into());
            config.fan_in_fan_out = true;
        } else if any_linear && !any_conv && config.fan_in_fan_out {
            self.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.".into());
            config.fan_in_fan_out = false;
        }

        let projections = match (projections, self.order.first().and_then(|n| self.adapters.get(n))) {
            (Some(p), _) => p,
            (None, Some(first)) => first.projections.clone(),
            (None, None) => {
                let in_max = matched.iter().map(|l| l.site().in_features()).max().unwrap_or(0);
                let out_max = matched.iter().map(|l| l.site().out_features()).max().unwrap_or(0);
                Arc::new(Projections::generate(
                    config.projection_seed(),
                    r,
                    in_max,
                    out_max,
                    self.kernel,
                    self.registry.device(),
                )?)
            }
        };
        if projections.r() != r {
            return Err(Error::Projection(format!(
                "adapter {name:?} has r={r} but the model's shared projections have rank {} (set by \
                 the first adapter); all PVeRA adapters of one model must use the same r",
                projections.r()
            )));
        }
        let is_first = self.adapters.is_empty();
        let policy = self.state().noise_policy();
        let mut added: Vec<Linear> = Vec::new();
        let result = (|| -> Result<()> {
            for lin in &matched {
                let site = lin.site();
                let seed = config.generator_seed_u64().map(|s| match policy {
                    NoisePolicy::PeftCompatible => s,
                    NoisePolicy::Independent => mix_seed(s, site.path()),
                });
                let spec = SlotSpec {
                    r,
                    dropout: config.pvera_dropout,
                    sample_at_inference: config.sample_at_inference.for_module(site.path()),
                    generator_seed: seed,
                    init_weights: config.init_weights,
                    d_initial: config.d_initial,
                    trainable: is_first && !config.inference_mode,
                };
                self.registry.state().with_global_generator(|g| {
                    site.add_adapter(name, projections.clone(), &spec, g)
                })??;
                added.push(lin.clone());
            }
            Ok(())
        })();
        if let Err(e) = result {
            for lin in &added {
                let _ = lin.site().delete_adapter(name);
            }
            return Err(e);
        }
        let targets: Vec<String> = matched.iter().map(|l| l.site().path().to_string()).collect();

        // modules_to_save: PEFT wraps every module whose name ends with an entry (plain endswith).
        let mut mts = Vec::new();
        if let Some(list) = &config.modules_to_save {
            for m in list {
                let hits: Vec<&Linear> = self
                    .registry
                    .sites()
                    .iter()
                    .filter(|l| self.all_names(l.site().path()).iter().any(|n| n.ends_with(m.as_str())))
                    .collect();
                if hits.is_empty() && !strict_modules_to_save {
                    self.warn(format!(
                        "modules_to_save entry {m:?} names no linear layer of this model (e.g. a task \
                         head the base model does not have); its weights in the file are not used"
                    ));
                    continue;
                }
                if hits.is_empty() {
                    for lin in &added {
                        let _ = lin.site().delete_adapter(name);
                    }
                    return Err(Error::config(
                        "modules_to_save",
                        format!(
                            "{m:?} matched no linear layer of the model; pvera supports linear \
                             layers (e.g. a classification head) in modules_to_save; known: {:?}",
                            self.site_paths()
                        ),
                    ));
                }
                for lin in hits {
                    lin.site().add_module_copy(name)?;
                    mts.push(lin.site().path().to_string());
                }
            }
        }
        // bias: "all" trains every linear bias; "*_only" the biases of adapted layers.
        let mut bias_modules = Vec::new();
        match &config.bias {
            Bias::None => {}
            Bias::All => {
                for lin in self.registry.sites() {
                    if lin.site().make_bias_trainable()?.is_some() {
                        bias_modules.push(lin.site().path().to_string());
                    }
                }
            }
            Bias::Only(_) => {
                for lin in &matched {
                    if lin.site().make_bias_trainable()?.is_some() {
                        bias_modules.push(lin.site().path().to_string());
                    }
                }
            }
        }
        self.adapters.insert(
            name.to_string(),
            AdapterInfo {
                config,
                projections,
                targets,
                modules_to_save: mts,
                bias_modules,
                form,
                passthrough: BTreeMap::new(),
            },
        );
        self.order.push(name.to_string());
        Ok(())
    }

    /// `add_adapter(name, config)`: a new, inactive adapter.
    pub fn add_adapter(&mut self, name: &str, config: PveraConfig) -> Result<()> {
        if "pvera_lambda_".contains(name) {
            self.warn(format!(
                "Adapter name {name:?} should not be contained in the prefix \"pvera_lambda_\"; \
                 this may lead to reinitialization of the adapter weights during loading."
            ));
        }
        self.inject(name, config, None, NameForm::default(), true)?;
        self.refresh_trainable();
        Ok(())
    }

    /// `load_adapter(dir, name, is_trainable)`: reads a PEFT directory and injects it as `name`
    /// (inactive unless it is the only adapter).
    pub fn load_adapter(&mut self, dir: &Path, name: &str, is_trainable: bool) -> Result<()> {
        let files = checkpoint::read_adapter_dir(dir, self.registry.device())?;
        self.load_adapter_files(files, name, is_trainable)
    }

    /// Loads already-read adapter files (see [`checkpoint::read_adapter_dir`]).
    pub fn load_adapter_files(&mut self, files: AdapterFiles, name: &str, is_trainable: bool) -> Result<()> {
        let AdapterFiles { mut config, tensors, weights_path, .. } = files;
        let file = weights_path.display().to_string();
        config.inference_mode = !is_trainable;
        let config_file = weights_path.with_file_name(checkpoint::CONFIG_NAME);
        config.validate().map_err(|e| match e {
            Error::InvalidConfig { field, reason } => {
                Error::InvalidConfig { field, reason: format!("{reason} (in {})", config_file.display()) }
            }
            other => other,
        })?;
        let r = usize::try_from(config.r).map_err(|_| Error::config("r", "must be positive"))?;

        // Projections: PEFT regenerates from the key, sized by the matched layers of this model,
        // then (save_projection) overwrites them with the checkpoint's.
        let a_file = tensors.get(PROJ_A_KEY).map(|t| t.tensor.clone());
        let b_file = tensors.get(PROJ_B_KEY).map(|t| t.tensor.clone());
        let mut probe = config.clone();
        self.resolve_targets(&mut probe)?;
        let matched = self.matched_sites(&probe)?;
        let (in_max, out_max) = match self.order.first().and_then(|n| self.adapters.get(n)) {
            Some(first) => (first.projections.in_max(), first.projections.out_max()),
            None => (
                matched.iter().map(|l| l.site().in_features()).max().unwrap_or(0),
                matched.iter().map(|l| l.site().out_features()).max().unwrap_or(0),
            ),
        };
        let regenerated = || {
            Projections::generate(config.projection_seed(), r, in_max, out_max, self.kernel, self.registry.device())
        };
        let check_shape = |key: &str, t: &Tensor, want: (usize, usize)| -> Result<()> {
            if t.dims() != [want.0, want.1] {
                return Err(Error::ShapeMismatch {
                    file: file.clone(),
                    key: key.to_string(),
                    expected: format!("[{}, {}]", want.0, want.1),
                    got: t.dims().to_vec(),
                    hint: format!(
                        " (r={r} and the largest targeted layer of this model is {in_max} in / \
                         {out_max} out; the adapter was probably trained on another model or \
                         with other target_modules)"
                    ),
                });
            }
            Ok(())
        };
        let mut warnings = Vec::new();
        let projections: Option<Arc<Projections>> = match (config.save_projection, a_file, b_file) {
            (true, None, _) => {
                return Err(Error::MissingTensor {
                    file: file.clone(),
                    key: PROJ_A_KEY.into(),
                    hint: ": Specified to load pvera_A and pvera_B from state dictionary however \
                           they were not present! (the config says save_projection=true; if the \
                           projections were deliberately left out, set \"save_projection\": false \
                           in adapter_config.json to regenerate them from projection_prng_key)"
                        .into(),
                })
            }
            (true, Some(a), Some(b)) => {
                check_shape(PROJ_A_KEY, &a, (2 * r, in_max))?;
                check_shape(PROJ_B_KEY, &b, (out_max, r))?;
                let p = Projections::from_tensors(a, b)?;
                check_finite_tensor(p.a(), &file, PROJ_A_KEY)?;
                check_finite_tensor(p.b(), &file, PROJ_B_KEY)?;
                Some(Arc::new(p))
            }
            (true, Some(a), None) => {
                check_shape(PROJ_A_KEY, &a, (2 * r, in_max))?;
                let regen = regenerated()?;
                let diff = count_bit_differences(&a.to_dtype(DType::F32)?, regen.a())?;
                if diff != 0 {
                    return Err(Error::MissingTensor {
                        file: file.clone(),
                        key: PROJ_B_KEY.into(),
                        hint: format!(
                            ": the file has pvera_A but no pvera_B, and its pvera_A differs from the \
                             one regenerated from projection_prng_key={} in {diff} elements, so B \
                             cannot be recovered (PEFT would silently use a regenerated B). Re-save \
                             the adapter with both projections.",
                            config.projection_prng_key
                        ),
                    });
                }
                warnings.push(format!(
                    "{file}: pvera_B is missing (PEFT silently regenerates it); pvera_A equals the \
                     projection regenerated from projection_prng_key={}, so the regenerated B is used",
                    config.projection_prng_key
                ));
                Some(Arc::new(regen))
            }
            (false, Some(a), b) => {
                check_shape(PROJ_A_KEY, &a, (2 * r, in_max))?;
                let regen = regenerated()?;
                let da = count_bit_differences(&a.to_dtype(DType::F32)?, regen.a())?;
                let db = match &b {
                    Some(b) => {
                        check_shape(PROJ_B_KEY, b, (out_max, r))?;
                        count_bit_differences(&b.to_dtype(DType::F32)?, regen.b())?
                    }
                    None => 0,
                };
                if da == 0 && db == 0 {
                    Some(Arc::new(regen))
                } else if let Some(b) = b {
                    warnings.push(format!(
                        "{file}: save_projection=false but the file carries pvera_A/pvera_B that \
                         differ from the regenerated ones ({da} + {db} elements); pvera uses the \
                         stored projections, PEFT would ignore them and give different outputs"
                    ));
                    Some(Arc::new(Projections::from_tensors(a, b)?))
                } else {
                    warnings.push(format!(
                        "{file}: save_projection=false; the stored pvera_A differs from the \
                         regenerated one in {da} elements and there is no pvera_B; using the \
                         regenerated projections, as PEFT does"
                    ));
                    Some(Arc::new(regen))
                }
            }
            (false, None, _) => {
                warnings.push(format!(
                    "{file}: save_projection=false: pvera_A and pvera_B are regenerated from \
                     projection_prng_key={} (relying on PRNG initialisation; bit-exact with \
                     PyTorch's AVX2 kernel)",
                    config.projection_prng_key
                ));
                None
            }
        };
        // A second adapter whose projections differ keeps its own (PEFT would overwrite).
        let projections = match (projections, self.order.first().and_then(|n| self.adapters.get(n))) {
            (Some(p), Some(first)) => {
                if p.bit_equal(&first.projections)? {
                    Some(first.projections.clone())
                } else {
                    warnings.push(format!(
                        "adapter {name:?} brings projections that differ from those of adapter \
                         {:?}; pvera keeps both (PEFT would overwrite the first adapter's)",
                        self.order[0]
                    ));
                    Some(p)
                }
            }
            (p, _) => p,
        };

        // Which naming form does the file use? The one under which most targeted layers have λ's.
        let mut best: (usize, NameForm) = (0, NameForm::default());
        for form in self.name_forms() {
            let hits = matched
                .iter()
                .filter_map(|l| self.form_name(&form, l.site().path()))
                .filter(|n| tensors.contains_key(&checkpoint::lambda_b_key(n)))
                .count();
            if hits > best.0 {
                best = (hits, form);
            }
        }
        let form = best.1;
        self.inject(name, config, projections, form, false)?;
        let result = self.fill_from_tensors(name, &tensors, &file);
        if let Err(e) = result {
            let _ = self.remove_adapter_everywhere(name);
            return Err(e);
        }
        for w in warnings {
            self.warn(w);
        }
        if self.adapters.len() == 1 && self.state().active_adapters().is_empty() {
            self.state().set_active_adapters(vec![name.to_string()])?;
        }
        self.refresh_trainable();
        Ok(())
    }

    fn fill_from_tensors(
        &mut self,
        name: &str,
        tensors: &BTreeMap<String, checkpoint::StoredTensor>,
        file: &str,
    ) -> Result<()> {
        let info = self.adapter(name)?.clone();
        let mut used: std::collections::BTreeSet<&str> = [PROJ_A_KEY, PROJ_B_KEY].into_iter().collect();
        let mut missing = Vec::new();
        for path in &info.targets {
            let Some(site) = self.registry.site(path) else { continue };
            let fname = self.file_name(&info, path);
            let kb = checkpoint::lambda_b_key(&fname);
            let kd = checkpoint::lambda_d_key(&fname);
            let (Some(b), Some(d)) = (tensors.get(&kb), tensors.get(&kd)) else {
                if !tensors.contains_key(&kb) {
                    missing.push(kb);
                }
                if !tensors.contains_key(&kd) {
                    missing.push(kd);
                }
                continue;
            };
            let r = usize::try_from(info.config.r).unwrap_or(0);
            let exp_b = [site.out_features()];
            let exp_d = [2 * r];
            for (key, t, exp) in [(&kb, &b.tensor, &exp_b[..]), (&kd, &d.tensor, &exp_d[..])] {
                if t.dims() != exp {
                    return Err(Error::ShapeMismatch {
                        file: file.to_string(),
                        key: key.clone(),
                        expected: format!("{exp:?}"),
                        got: t.dims().to_vec(),
                        hint: format!(
                            " (layer {path} has {} in / {} out features and r={r}; the adapter was \
                             trained on a model of another size)",
                            site.in_features(),
                            site.out_features()
                        ),
                    });
                }
                check_finite_tensor(t, file, key)?;
            }
            site.set_lambdas(name, &b.tensor, &d.tensor)?;
            used.insert(tensors.get_key_value(&kb).map(|(k, _)| k.as_str()).unwrap_or(""));
            used.insert(tensors.get_key_value(&kd).map(|(k, _)| k.as_str()).unwrap_or(""));
        }
        if !missing.is_empty() {
            let n = missing.len();
            missing.truncate(6);
            return Err(Error::MissingTensor {
                file: file.to_string(),
                key: missing.join(", "),
                hint: format!(
                    " ({n} λ tensor(s) missing for layers the config targets in this model; PEFT \
                     would load the adapter half-initialised with only a warning. Check that the \
                     adapter was trained on this model family and module naming scheme)"
                ),
            });
        }
        for path in &info.modules_to_save {
            let Some(site) = self.registry.site(path) else { continue };
            let Some((w, b)) = site.module_copy(name)? else { continue };
            let fname = self.file_name(&info, path);
            let kw = checkpoint::module_param_key(&fname, "weight");
            let t = tensors.get(&kw).ok_or_else(|| Error::MissingTensor {
                file: file.to_string(),
                key: kw.clone(),
                hint: " (modules_to_save lists this module but the file does not carry it)".into(),
            })?;
            set_var_checked(&w, &t.tensor, file, &kw)?;
            used.insert(tensors.get_key_value(&kw).map(|(k, _)| k.as_str()).unwrap_or(""));
            if let Some(bv) = b {
                let kb = checkpoint::module_param_key(&fname, "bias");
                if let Some(t) = tensors.get(&kb) {
                    set_var_checked(&bv, &t.tensor, file, &kb)?;
                    used.insert(tensors.get_key_value(&kb).map(|(k, _)| k.as_str()).unwrap_or(""));
                }
            }
        }
        for path in &info.bias_modules {
            let Some(site) = self.registry.site(path) else { continue };
            let Some(var) = site.trainable_bias()? else { continue };
            let targeted = info.targets.contains(path);
            let key = checkpoint::bias_key(&self.file_name(&info, path), targeted);
            if let Some(t) = tensors.get(&key) {
                set_var_checked(&var, &t.tensor, file, &key)?;
                used.insert(tensors.get_key_value(&key).map(|(k, _)| k.as_str()).unwrap_or(""));
            }
        }
        let unexpected: Vec<&String> = tensors.keys().filter(|k| !used.contains(k.as_str())).collect();
        let unexpected_lambdas: Vec<&&String> =
            unexpected.iter().filter(|k| checkpoint::parse_lambda_key(k).is_some()).collect();
        if !unexpected_lambdas.is_empty() {
            let n = unexpected_lambdas.len();
            let shown: Vec<String> = unexpected_lambdas.iter().take(6).map(|s| s.to_string()).collect();
            return Err(Error::UnexpectedTensors {
                file: file.to_string(),
                count: n,
                keys: format!("{}{}", shown.join(", "), if n > shown.len() { " ..." } else { "" }),
                hint: format!(
                    ". The adapter was trained on another model or module naming scheme (targets matched here: \
                     {:?}); load it on the model it was trained for",
                    info.targets.iter().take(6).collect::<Vec<_>>()
                ),
            });
        }
        if !unexpected.is_empty() {
            let shown: Vec<String> = unexpected.iter().take(6).map(|s| s.to_string()).collect();
            self.warn(format!(
                "{file}: {} tensor(s) are not used by this model and are kept to be saved back \
                 unchanged: {}",
                unexpected.len(),
                shown.join(", ")
            ));
            let kept: BTreeMap<String, Tensor> =
                unexpected.iter().map(|k| ((*k).clone(), tensors[k.as_str()].tensor.clone())).collect();
            if let Some(a) = self.adapters.get_mut(name) {
                a.passthrough = kept;
            }
        }
        Ok(())
    }

    fn remove_adapter_everywhere(&mut self, name: &str) -> Result<()> {
        for lin in self.registry.sites() {
            lin.site().delete_adapter(name)?;
        }
        self.adapters.remove(name);
        self.order.retain(|n| n != name);
        Ok(())
    }

    /// `set_adapter(names)`: activates one or several adapters (their outputs are summed).
    pub fn set_adapter(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if !self.adapters.contains_key(*n) {
                return Err(self.unknown(n));
            }
        }
        self.state().set_active_adapters(names.iter().map(|s| s.to_string()).collect())?;
        self.refresh_trainable();
        Ok(())
    }

    /// The active adapters.
    pub fn active_adapters(&self) -> Vec<String> {
        self.state().active_adapters()
    }

    fn refresh_trainable(&self) {
        let active = self.state().active_adapters();
        for (name, info) in &self.adapters {
            let on = active.contains(name) && !info.config.inference_mode;
            for path in &info.targets {
                if let Some(site) = self.registry.site(path) {
                    let _ = site.set_trainable(name, on);
                }
            }
        }
    }

    /// `delete_adapter(name)`. Refused while merged. If it was active, the first remaining
    /// adapter (sorted) becomes active, as in PEFT.
    pub fn delete_adapter(&mut self, name: &str) -> Result<()> {
        if !self.adapters.contains_key(name) {
            return Err(self.unknown(name));
        }
        for lin in self.registry.sites() {
            if lin.site().merged_adapters()?.iter().any(|m| m == name) {
                return Err(Error::Adapter(format!(
                    "cannot delete adapter {name:?}: it is merged into {}; call unmerge_adapter() first",
                    lin.site().path()
                )));
            }
        }
        self.remove_adapter_everywhere(name)?;
        let mut active = self.state().active_adapters();
        if active.iter().any(|a| a == name) {
            active.retain(|a| a != name);
            if active.is_empty() {
                if let Some(first) = self.adapters.keys().next() {
                    active.push(first.clone());
                }
            }
            self.state().set_active_adapters(active)?;
        }
        self.refresh_trainable();
        Ok(())
    }

    /// Switches sampling at inference at run time for adapter `adapter`: in every adapted layer
    /// (`modules = None`) or in the layers whose module path equals, or ends with `.` + one of,
    /// `modules` (the matching of the config's per-module `sample_at_inference` dict). Returns the
    /// module paths switched. Every name is checked before anything changes: a module no layer of
    /// the adapter matches is an error (a typo is not silently ignored) and leaves all flags as
    /// they were.
    pub fn set_sample_at_inference(&self, adapter: &str, modules: Option<&[&str]>, on: bool) -> Result<Vec<String>> {
        if !self.adapters.contains_key(adapter) {
            return Err(Error::UnknownAdapter { name: adapter.to_string(), known: format!("{:?}", self.adapter_names()) });
        }
        let matches = |path: &str, m: &str| {
            path == m || (path.len() > m.len() && path.ends_with(m) && path.as_bytes()[path.len() - m.len() - 1] == b'.')
        };
        let mut switched = Vec::new();
        let mut used = vec![false; modules.map_or(0, <[&str]>::len)];
        for lin in self.registry.sites() {
            let site = lin.site();
            if !site.has_adapter(adapter)? {
                continue;
            }
            let hit = match modules {
                None => true,
                Some(ms) => {
                    let mut any = false;
                    for (k, m) in ms.iter().enumerate() {
                        if matches(site.path(), m) {
                            used[k] = true;
                            any = true;
                        }
                    }
                    any
                }
            };
            if hit {
                switched.push(lin.clone());
            }
        }
        if let Some(ms) = modules {
            if let Some(k) = used.iter().position(|u| !u) {
                return Err(Error::Adapter(format!(
                    "set_sample_at_inference: no layer of adapter `{adapter}` matches module `{}`; adapted layers: {:?}",
                    ms[k], self.adapters[adapter].targets
                )));
            }
        }
        for lin in &switched {
            lin.site().set_sample_at_inference(adapter, on)?;
        }
        Ok(switched.iter().map(|l| l.site().path().to_string()).collect())
    }

    /// Disables (true) or re-enables (false) every adapter; the base model's output results,
    /// except for trained biases (`bias` != none), which PEFT does not restore either.
    pub fn set_adapters_disabled(&mut self, disabled: bool) -> Result<()> {
        if disabled && self.adapters.values().any(|a| a.config.bias != Bias::None) {
            self.warn(
                "disabling adapters does not undo the trained biases (bias != \"none\"): the \
                 output differs from the base model's"
                    .into(),
            );
        }
        self.state().set_adapters_disabled(disabled)
    }

    /// Runs `f` with adapters disabled (PEFT's `with model.disable_adapter():`), re-enabling them
    /// afterwards even when `f` fails.
    pub fn with_adapters_disabled<T>(&mut self, f: impl FnOnce(&Self) -> T) -> Result<T> {
        let was = self.state().adapters_disabled();
        self.set_adapters_disabled(true)?;
        let out = f(self);
        self.state().set_adapters_disabled(was)?;
        Ok(out)
    }

    /// `merge_adapter(adapter_names, safe_merge)`: folds ΔW of the given (default: active)
    /// adapters into the base weights. With `safe`, every merged weight is checked before any
    /// layer changes, so a non-finite merge leaves the whole model untouched.
    pub fn merge_adapter(&mut self, adapters: Option<&[&str]>, safe: bool) -> Result<Vec<String>> {
        let names: Vec<String> = match adapters {
            Some(a) => a.iter().map(|s| s.to_string()).collect(),
            None => self.state().active_adapters(),
        };
        for n in &names {
            if !self.adapters.contains_key(n) {
                return Err(self.unknown(n));
            }
        }
        if safe {
            for lin in self.registry.sites() {
                let site = lin.site();
                let merged = site.merged_adapters()?;
                let mut w = site.weight()?.to_dtype(DType::F32)?;
                for n in &names {
                    if merged.contains(n) || !site.has_adapter(n)? {
                        continue;
                    }
                    w = (w + site.delta_weight(n)?)?;
                }
                let bad = count_non_finite(&w.to_dtype(site.weight()?.dtype())?)?;
                if bad > 0 {
                    return Err(Error::NonFinite {
                        what: format!("merged weight of {}", site.path()),
                        count: bad,
                        hint: format!(
                            " (NaNs detected in the merged weights. The adapter {} seems to be \
                             broken); no layer was changed",
                            names.join(", ")
                        ),
                    });
                }
            }
        }
        let mut merged_any = Vec::new();
        for lin in self.registry.sites() {
            for m in lin.site().merge(Some(&names), false)? {
                if !merged_any.contains(&m) {
                    merged_any.push(m);
                }
            }
        }
        if merged_any.is_empty() {
            self.warn("All adapters are already merged, nothing to do.".into());
        }
        Ok(merged_any)
    }

    /// `unmerge_adapter()`: undoes every merge, last first.
    pub fn unmerge_adapter(&mut self) -> Result<()> {
        let mut n = 0;
        for lin in self.registry.sites() {
            n += lin.site().unmerge()?;
        }
        if n == 0 {
            self.warn("Already unmerged. Nothing to do.".into());
        }
        Ok(())
    }

    /// `merge_and_unload(safe_merge, adapter_names)`: merges, then strips every adapter; returns
    /// the plain model and its registry. As in PEFT, a layer in `modules_to_save` becomes the
    /// active adapter's trained copy, so the registry's base tensors are the merged model's.
    /// Refused (nothing changed) when an active adapter's file holds trained values for base
    /// tensors that pvera does not apply (see [`PeftModel::unapplied_module_tensors`]): the merged
    /// model would silently lack them.
    pub fn merge_and_unload(mut self, safe: bool, adapters: Option<&[&str]>) -> Result<(M, Registry)> {
        self.check_unloadable("merge_and_unload")?;
        self.merge_adapter(adapters, safe)?;
        self.strip_all()?;
        Ok((self.model, self.registry))
    }

    /// `unload()`: strips every adapter without merging (weights already merged stay merged,
    /// as in PEFT); `modules_to_save` layers keep the active adapter's copy, as in PEFT. Refused
    /// like [`PeftModel::merge_and_unload`].
    pub fn unload(mut self) -> Result<(M, Registry)> {
        self.check_unloadable("unload")?;
        self.strip_all()?;
        Ok((self.model, self.registry))
    }

    /// Keys of the active adapters' files that hold values for tensors this model has but pvera
    /// does not apply: `modules_to_save` entries naming a module that is not a single linear
    /// layer (e.g. a whole `pooler` or a LayerNorm). Such values are kept for saving but take no
    /// part in the forward pass, and unloading would drop them.
    pub fn unapplied_module_tensors(&self) -> Vec<String> {
        let mut base: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        let forms = self.name_forms();
        for p in self.registry.params() {
            let Some((module, leaf)) = p.name.rsplit_once('.') else { continue };
            for f in &forms {
                if let Some(n) = self.form_name(f, module) {
                    base.insert(checkpoint::module_param_key(&n, leaf));
                }
            }
        }
        let active = self.state().active_adapters();
        let mut out = Vec::new();
        for (name, info) in &self.adapters {
            if active.contains(name) {
                out.extend(info.passthrough.keys().filter(|k| base.contains(k.as_str())).cloned());
            }
        }
        out
    }

    fn check_unloadable(&self, what: &str) -> Result<()> {
        let keys = self.unapplied_module_tensors();
        if keys.is_empty() {
            return Ok(());
        }
        let shown: Vec<&str> = keys.iter().take(6).map(String::as_str).collect();
        Err(Error::Adapter(format!(
            "{what}: the adapter holds trained values for {} tensor(s) of this model that pvera does not \
             apply ({}{}): their modules_to_save entries name modules that are not a single linear layer, so \
             the unloaded model would silently keep the base values. List the linear layers themselves in \
             modules_to_save (e.g. \"pooler.dense\" rather than \"pooler\"), or merge with PEFT",
            keys.len(),
            shown.join(", "),
            if keys.len() > shown.len() { ", ..." } else { "" }
        )))
    }

    fn strip_all(&mut self) -> Result<()> {
        let active = self.state().active_adapters();
        for lin in self.registry.sites() {
            lin.site().strip_adapters(&active)?;
        }
        self.adapters.clear();
        self.order.clear();
        self.state().set_active_adapters(Vec::new())?;
        self.state().set_adapters_disabled(false)?;
        Ok(())
    }

    /// The variables an optimiser should update: λ's of active, trainable adapters, their
    /// `modules_to_save` copies and trainable biases. Base weights never appear here.
    pub fn trainable_vars(&self) -> Result<Vec<NamedVar>> {
        let active = self.state().active_adapters();
        let mut out = Vec::new();
        for (name, info) in &self.adapters {
            if !active.contains(name) || info.config.inference_mode {
                continue;
            }
            for path in &info.targets {
                let Some(site) = self.registry.site(path) else { continue };
                site.with_slot(name, |s| {
                    out.push(NamedVar { name: checkpoint::lambda_b_key(&self.file_name(info, path)), var: s.lambda_b().clone() });
                    out.push(NamedVar { name: checkpoint::lambda_d_key(&self.file_name(info, path)), var: s.lambda_d().clone() });
                })?;
            }
            for path in &info.modules_to_save {
                let Some(site) = self.registry.site(path) else { continue };
                if let Some((w, b)) = site.module_copy(name)? {
                    out.push(NamedVar { name: checkpoint::module_param_key(&self.file_name(info, path), "weight"), var: w });
                    if let Some(b) = b {
                        out.push(NamedVar { name: checkpoint::module_param_key(&self.file_name(info, path), "bias"), var: b });
                    }
                }
            }
            for path in &info.bias_modules {
                let Some(site) = self.registry.site(path) else { continue };
                if let Some(v) = site.trainable_bias()? {
                    out.push(NamedVar { name: checkpoint::bias_key(&self.file_name(info, path), info.targets.contains(path)), var: v });
                }
            }
        }
        Ok(out)
    }

    /// `get_nb_trainable_parameters()`: (trainable, all) as PEFT counts them: all parameters
    /// of the model including every adapter's λ's and module copies, not the A/B buffers.
    pub fn trainable_parameter_counts(&self) -> Result<(usize, usize)> {
        let trainable: usize = self.trainable_vars()?.iter().map(|v| v.var.elem_count()).sum();
        let mut all = self.registry.base_param_count();
        for (name, info) in &self.adapters {
            for path in &info.targets {
                if let Some(site) = self.registry.site(path) {
                    all += site.with_slot(name, |s| s.lambda_b().elem_count() + s.lambda_d().elem_count())?;
                }
            }
            for path in &info.modules_to_save {
                if let Some(site) = self.registry.site(path) {
                    if let Some((w, b)) = site.module_copy(name)? {
                        all += w.elem_count() + b.map(|b| b.elem_count()).unwrap_or(0);
                    }
                }
            }
        }
        Ok((trainable, all))
    }

    /// PEFT's `print_trainable_parameters()` line.
    pub fn trainable_parameters_line(&self) -> Result<String> {
        let (t, a) = self.trainable_parameter_counts()?;
        Ok(format_trainable_line(t, a))
    }

    /// The tensors PEFT's `get_peft_model_state_dict` yields for one adapter, by file key.
    pub fn adapter_state_dict(&self, name: &str) -> Result<BTreeMap<String, Tensor>> {
        let info = self.adapter(name)?;
        let mut out = BTreeMap::new();
        for path in &info.targets {
            let Some(site) = self.registry.site(path) else { continue };
            site.with_slot(name, |s| {
                out.insert(checkpoint::lambda_b_key(&self.file_name(info, path)), s.lambda_b().as_detached_tensor());
                out.insert(checkpoint::lambda_d_key(&self.file_name(info, path)), s.lambda_d().as_detached_tensor());
            })?;
        }
        if info.config.save_projection {
            out.insert(PROJ_A_KEY.to_string(), info.projections.a().clone());
            out.insert(PROJ_B_KEY.to_string(), info.projections.b().clone());
        }
        for path in &info.modules_to_save {
            let Some(site) = self.registry.site(path) else { continue };
            if let Some((w, b)) = site.module_copy(name)? {
                out.insert(checkpoint::module_param_key(&self.file_name(info, path), "weight"), w.as_detached_tensor());
                if let Some(b) = b {
                    out.insert(checkpoint::module_param_key(&self.file_name(info, path), "bias"), b.as_detached_tensor());
                }
            }
        }
        for path in &info.bias_modules {
            let Some(site) = self.registry.site(path) else { continue };
            if let Some(v) = site.trainable_bias()? {
                out.insert(checkpoint::bias_key(&self.file_name(info, path), info.targets.contains(path)), v.as_detached_tensor());
            }
        }
        for (k, t) in &info.passthrough {
            out.entry(k.clone()).or_insert_with(|| t.clone());
        }
        for (k, t) in out.iter_mut() {
            if t.dtype() == DType::F16 || t.dtype() == DType::BF16 {
                // PEFT autocasts adapter weights to f32 (cast_adapter_dtype); base-module copies
                // keep the model dtype.
                if checkpoint::parse_lambda_key(k).is_some() {
                    *t = t.to_dtype(DType::F32)?;
                }
            }
        }
        Ok(out)
    }

    /// `save_pretrained(dir)`: every adapter (or the named ones), `default` in `dir`, others in
    /// `dir/<name>`; atomic per file. Returns warnings (e.g. a sample_at_inference dict PEFT
    /// will misread).
    pub fn save_pretrained(&self, dir: &Path, adapters: Option<&[&str]>) -> Result<Warnings> {
        let names: Vec<String> = match adapters {
            Some(a) => a.iter().map(|s| s.to_string()).collect(),
            None => self.adapter_names(),
        };
        let mut warnings = Vec::new();
        for name in &names {
            let info = self.adapter(name)?.clone();
            let mut cfg = info.config.clone();
            cfg.inference_mode = true;
            if cfg.task_type.is_none() && cfg.auto_mapping.is_none() && !self.info.class_name.is_empty() {
                cfg.auto_mapping = Some(serde_json::json!({
                    "base_model_class": self.info.class_name,
                    "parent_library": "pvera",
                }));
            }
            if cfg.peft_version.is_none() {
                cfg.peft_version = Some(format!("pvera {}", env!("CARGO_PKG_VERSION")));
            }
            warnings.extend(cfg.save_warnings());
            let tensors = self.adapter_state_dict(name)?;
            let d = checkpoint::adapter_dir(dir, name);
            checkpoint::write_adapter_dir(&d, &cfg, &tensors)?;
        }
        for w in &warnings {
            tracing::warn!("{w}");
        }
        Ok(warnings)
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

fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

fn bias_str(b: &Bias) -> String {
    match b {
        Bias::None => "none".into(),
        Bias::All => "all".into(),
        Bias::Only(s) => s.clone(),
    }
}

/// `trainable params: 1,234 || all params: 5,678 || trainable%: 21.7330`
pub fn format_trainable_line(trainable: usize, all: usize) -> String {
    let pct = if all == 0 { 0.0 } else { 100.0 * trainable as f64 / all as f64 };
    format!(
        "trainable params: {} || all params: {} || trainable%: {pct:.4}",
        group_thousands(trainable),
        group_thousands(all)
    )
}

/// `1234567` -> `1,234,567`.
pub fn group_thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn check_finite_tensor(t: &Tensor, file: &str, key: &str) -> Result<()> {
    let bad = count_non_finite(t)?;
    if bad > 0 {
        return Err(Error::NonFinite {
            what: format!("{file}: tensor `{key}`"),
            count: bad,
            hint: " (the adapter is corrupt or training diverged; use an earlier checkpoint)".into(),
        });
    }
    Ok(())
}

fn set_var_checked(var: &Var, t: &Tensor, file: &str, key: &str) -> Result<()> {
    if var.dims() != t.dims() {
        return Err(Error::ShapeMismatch {
            file: file.to_string(),
            key: key.to_string(),
            expected: format!("{:?}", var.dims()),
            got: t.dims().to_vec(),
            hint: " (the module in this model has another size)".into(),
        });
    }
    check_finite_tensor(t, file, key)?;
    var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?.contiguous()?)?;
    Ok(())
}

