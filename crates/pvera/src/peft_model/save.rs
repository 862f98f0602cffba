//! What an adapter saves and trains: the trainable variables (and PEFT's counts of them), the
//! state dict by file key, and `save_pretrained`.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::{NamedVar, PeftModel, Warnings};
use crate::checkpoint;
use crate::error::Result;

impl<M> PeftModel<M> {
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
                let m = info.config.method;
                site.with_slot(name, |s| {
                    out.push(NamedVar { name: checkpoint::lambda_b_key(m, &self.file_name(info, path)), var: s.lambda_b().clone() });
                    out.push(NamedVar { name: checkpoint::lambda_d_key(m, &self.file_name(info, path)), var: s.lambda_d().clone() });
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
        let m = info.config.method;
        let mut out = BTreeMap::new();
        for path in &info.targets {
            let Some(site) = self.registry.site(path) else { continue };
            site.with_slot(name, |s| {
                out.insert(checkpoint::lambda_b_key(m, &self.file_name(info, path)), s.lambda_b().as_detached_tensor());
                out.insert(checkpoint::lambda_d_key(m, &self.file_name(info, path)), s.lambda_d().as_detached_tensor());
            })?;
        }
        if info.config.save_projection {
            out.insert(checkpoint::proj_a_key(m).to_string(), info.projections.a().clone());
            out.insert(checkpoint::proj_b_key(m).to_string(), info.projections.b().clone());
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
                if checkpoint::parse_lambda_key(m, k).is_some() {
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
        // Returned, not logged: a caller that saves often (the trainer, at every epoch) says each
        // warning once, which a log line per save could not.
        Ok(warnings)
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
