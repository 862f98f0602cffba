//! Injection (`get_peft_model`, `add_adapter`): resolving `target_modules` as PEFT does, the
//! matched layers, PEFT's checks of a new adapter against the existing ones, and creating the
//! adapter in every matched layer (projections, λ's, `modules_to_save` copies, trainable biases).

use std::collections::BTreeMap;
use std::sync::Arc;

use super::{AdapterInfo, NameForm, PeftModel};
use crate::config::{Bias, LayersToTransform, Method, PveraConfig, TargetModules};
use crate::error::{Error, Result};
use crate::layer::{Linear, SlotSpec};
use crate::projection::Projections;
use crate::rng::mix_seed;
use crate::state::NoisePolicy;
use crate::targets::{self, TargetMatcher};

impl<M> PeftModel<M> {
    /// Resolves `target_modules` as PEFT does: default table by model type, `all-linear`
    /// expansion (minus the output head and, for SEQ_CLS, the classifier), compression of long
    /// lists to suffixes.
    pub(super) fn resolve_targets(&self, config: &mut PveraConfig) -> Result<()> {
        match &config.target_modules {
            None => {
                let found = targets::default_target_modules(config.method, &self.info.model_type).ok_or_else(|| {
                    Error::NoDefaultTargets { method: config.method, model_type: self.info.model_type.clone() }
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

    pub(super) fn matched_sites(&self, config: &PveraConfig) -> Result<Vec<Linear>> {
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
            return Err(Error::NoTargetMatched { method: config.method, patterns, known });
        }
        Ok(matched)
    }

    /// When `target_modules` selects layers but `layers_to_transform` keeps none of them, the
    /// error names the layer filter and the indices that exist, not the targets.
    pub(super) fn layer_filter_matched_none(&self, config: &PveraConfig) -> Result<()> {
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

    /// PEFT's `_check_new_adapter_config` against the existing adapters (of the same method: a
    /// VeRA and a PVeRA adapter have separate projections).
    pub(super) fn check_new_adapter(&self, name: &str, config: &PveraConfig) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(Error::Adapter(format!(
                "Adapter with name {name} already exists; pick another name or delete_adapter({name:?}) first"
            )));
        }
        if name.is_empty() {
            return Err(Error::Adapter("adapter names must not be empty".into()));
        }
        let method = config.method;
        if let Some(first) = self.first_of(method) {
            // PEFT's texts: "PVeRA PRNG ..." / "Vera PRNG ...".
            let prng = match method {
                Method::Pvera => "PVeRA",
                Method::Vera => "Vera",
            };
            if first.config.projection_prng_key != config.projection_prng_key {
                return Err(Error::Adapter(format!(
                    "{prng} PRNG initialisation key must be the same for all adapters. Got \
                     config.projection_prng_key={} but previous config had {}.",
                    config.projection_prng_key, first.config.projection_prng_key
                )));
            }
            if first.config.save_projection != config.save_projection {
                let (a, b) = (first.config.save_projection, config.save_projection);
                // PEFT's VeRA sorts the set (False first); PVeRA prints it as Python's set does.
                let (a, b) = if method == Method::Vera { (a.min(b), a.max(b)) } else { (a, b) };
                let set = if method == Method::Vera { ("[", "]") } else { ("{", "}") };
                return Err(Error::Adapter(format!(
                    "{} projection weights must be saved for all adapters or none, but got \
                     multiple different values: {}{}, {}{}",
                    method.name(),
                    set.0,
                    py_bool(a),
                    py_bool(b),
                    set.1
                )));
            }
        }
        let with_bias = self.adapters.values().filter(|a| a.config.bias != Bias::None).count()
            + usize::from(config.bias != Bias::None);
        if with_bias > 1 {
            return Err(Error::Adapter(format!(
                "{} supports only 1 adapter with bias. When using multiple adapters, set \
                 bias to 'none' for all adapters (adapter {name:?} has bias {:?}).",
                method.model_class(),
                bias_str(&config.bias)
            )));
        }
        Ok(())
    }

    /// Creates the adapter in every matched layer. `projections` overrides the regenerated ones
    /// (checkpoint values).
    pub(super) fn inject(
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

        let method = config.method;
        let projections = match (projections, self.first_of(method)) {
            (Some(p), _) => p,
            (None, Some(first)) => first.projections.clone(),
            (None, None) => {
                let in_max = matched.iter().map(|l| l.site().in_features()).max().unwrap_or(0);
                let out_max = matched.iter().map(|l| l.site().out_features()).max().unwrap_or(0);
                Arc::new(Projections::generate(
                    method,
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
                "adapter {name:?} has r={r} but the model's shared {method} projections have rank {} (set by \
                 the first {method} adapter); all {method} adapters of one model must use the same r",
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
                    method,
                    r,
                    dropout: config.dropout,
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
        let prefix = format!("{}_lambda_", config.method.stem());
        if prefix.contains(name) {
            self.warn(format!(
                "Adapter name {name:?} should not be contained in the prefix \"{prefix}\"; \
                 this may lead to reinitialization of the adapter weights during loading."
            ));
        }
        self.inject(name, config, None, NameForm::default(), true)?;
        self.refresh_trainable();
        Ok(())
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
