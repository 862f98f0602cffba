//! Loading a saved adapter (`load_adapter`, `from_pretrained`): projections from the file or
//! regenerated from the key (with the checks PEFT lacks), the naming form the file uses, the λ's,
//! `modules_to_save` copies and biases, and the tensors this model does not use.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::{NameForm, PeftModel};
use crate::checkpoint::{self, proj_a_key, proj_a_name, proj_b_key, proj_b_name, AdapterFiles};
use crate::error::{Error, Result};
use crate::layer::count_non_finite;
use crate::projection::{count_bit_differences, Projections};

impl<M> PeftModel<M> {
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
        let method = config.method;
        let (proj_a, proj_b) = (proj_a_key(method), proj_b_key(method));
        let (an, bn) = (proj_a_name(method), proj_b_name(method));
        let a_rows = method.latent_rows(r);

        // Projections: PEFT regenerates from the key, sized by the matched layers of this model,
        // then (save_projection) overwrites them with the checkpoint's.
        let a_file = tensors.get(proj_a).map(|t| t.tensor.clone());
        let b_file = tensors.get(proj_b).map(|t| t.tensor.clone());
        let mut probe = config.clone();
        self.resolve_targets(&mut probe)?;
        let matched = self.matched_sites(&probe)?;
        let (in_max, out_max) = match self.first_of(method) {
            Some(first) => (first.projections.in_max(), first.projections.out_max()),
            None => (
                matched.iter().map(|l| l.site().in_features()).max().unwrap_or(0),
                matched.iter().map(|l| l.site().out_features()).max().unwrap_or(0),
            ),
        };
        let regenerated = || {
            Projections::generate(method, config.projection_seed(), r, in_max, out_max, self.kernel, self.registry.device())
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
            (true, None, _) => return Err(checkpoint::missing_projections(method, &file)),
            (true, Some(a), Some(b)) => {
                check_shape(proj_a, &a, (a_rows, in_max))?;
                check_shape(proj_b, &b, (out_max, r))?;
                let p = Projections::from_tensors(method, a, b)?;
                check_finite_tensor(p.a(), &file, proj_a)?;
                check_finite_tensor(p.b(), &file, proj_b)?;
                Some(Arc::new(p))
            }
            (true, Some(a), None) => {
                check_shape(proj_a, &a, (a_rows, in_max))?;
                let regen = regenerated()?;
                let diff = count_bit_differences(&a.to_dtype(DType::F32)?, regen.a())?;
                if diff != 0 {
                    return Err(checkpoint::unrecoverable_b(method, &file, config.projection_prng_key, diff));
                }
                warnings.push(checkpoint::regenerated_b_warning(method, &file, config.projection_prng_key));
                Some(Arc::new(regen))
            }
            (false, Some(a), b) => {
                check_shape(proj_a, &a, (a_rows, in_max))?;
                let regen = regenerated()?;
                let da = count_bit_differences(&a.to_dtype(DType::F32)?, regen.a())?;
                let db = match &b {
                    Some(b) => {
                        check_shape(proj_b, b, (out_max, r))?;
                        count_bit_differences(&b.to_dtype(DType::F32)?, regen.b())?
                    }
                    None => 0,
                };
                if da == 0 && db == 0 {
                    Some(Arc::new(regen))
                } else if let Some(b) = b {
                    warnings.push(checkpoint::stored_projections_ignored_warning(method, &file, da, db));
                    Some(Arc::new(Projections::from_tensors(method, a, b)?))
                } else {
                    warnings.push(checkpoint::stored_a_ignored_warning(method, &file, da));
                    Some(Arc::new(regen))
                }
            }
            (false, None, _) => {
                warnings.push(format!(
                    "{file}: save_projection=false: {an} and {bn} are regenerated from \
                     projection_prng_key={} (relying on PRNG initialisation; bit-exact with \
                     PyTorch's AVX2 kernel)",
                    config.projection_prng_key
                ));
                None
            }
        };
        // A second adapter whose projections differ keeps its own (PEFT would overwrite).
        let first = self.first_name_of(method).and_then(|n| Some((self.adapters.get(n)?.projections.clone(), n.clone())));
        let projections = match (projections, first) {
            (Some(p), Some((first, first_name))) => {
                if p.bit_equal(&first)? {
                    Some(first)
                } else {
                    warnings.push(format!(
                        "adapter {name:?} brings projections that differ from those of adapter \
                         {first_name:?}; pvera keeps both (PEFT would overwrite the first adapter's)"
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
                .filter(|n| tensors.contains_key(&checkpoint::lambda_b_key(method, n)))
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

    pub(super) fn fill_from_tensors(
        &mut self,
        name: &str,
        tensors: &BTreeMap<String, checkpoint::StoredTensor>,
        file: &str,
    ) -> Result<()> {
        let info = self.adapter(name)?.clone();
        let method = info.config.method;
        let mut used: std::collections::BTreeSet<&str> = [proj_a_key(method), proj_b_key(method)].into_iter().collect();
        let mut missing = Vec::new();
        for path in &info.targets {
            let Some(site) = self.registry.site(path) else { continue };
            let fname = self.file_name(&info, path);
            let kb = checkpoint::lambda_b_key(method, &fname);
            let kd = checkpoint::lambda_d_key(method, &fname);
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
            let exp_d = [method.latent_rows(r)];
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
            unexpected.iter().filter(|k| checkpoint::parse_lambda_key(method, k).is_some()).collect();
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
