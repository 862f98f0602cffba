//! How an adapter file names the model's modules: the naming forms (task prefix, alternative
//! schemes) and a site's name in each.

use super::{AdapterInfo, NameForm, PeftModel};

impl<M> PeftModel<M> {
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
    pub(super) fn all_names(&self, path: &str) -> Vec<String> {
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
    pub(super) fn file_name(&self, info: &AdapterInfo, path: &str) -> String {
        self.form_name(&info.form, path).unwrap_or_else(|| path.to_string())
    }

    /// Every `named_modules()` key the model would have (module prefixes of its parameters).
    pub(super) fn module_keys(&self) -> Vec<String> {
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

    pub(super) fn site_paths(&self) -> Vec<String> {
        self.registry.sites().iter().map(|l| l.site().path().to_string()).collect()
    }
}
