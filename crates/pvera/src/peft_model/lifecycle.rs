//! An adapter's life after injection: activating, disabling, per-layer sampling switches,
//! merging and unmerging, deleting, and unloading (`merge_and_unload`, `unload`).

use candle_core::DType;

use super::PeftModel;
use crate::builder::Registry;
use crate::checkpoint;
use crate::config::Bias;
use crate::error::{Error, Result};
use crate::layer::count_non_finite;

impl<M> PeftModel<M> {
    /// Removes an adapter from every layer and the bookkeeping (no checks; callers check).
    pub(super) fn remove_adapter_everywhere(&mut self, name: &str) -> Result<()> {
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

    pub(super) fn refresh_trainable(&self) {
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
    /// module paths switched. Switching a VeRA adapter on is an [`Error::Request`] (it has no
    /// latent). Every name is checked before anything changes: a module no layer of
    /// the adapter matches is an error (a typo is not silently ignored) and leaves all flags as
    /// they were.
    pub fn set_sample_at_inference(&self, adapter: &str, modules: Option<&[&str]>, on: bool) -> Result<Vec<String>> {
        let Some(info) = self.adapters.get(adapter) else {
            return Err(Error::UnknownAdapter { name: adapter.to_string(), known: format!("{:?}", self.adapter_names()) });
        };
        if on && !info.config.method.samples() {
            return Err(crate::layer::vera_cannot_sample(adapter));
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

    pub(super) fn check_unloadable(&self, what: &str) -> Result<()> {
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

    pub(super) fn strip_all(&mut self) -> Result<()> {
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
}
