//! Hugging Face model directories: `config.json` plus `model.safetensors` or a sharded
//! `model.safetensors.index.json`, with or without a task prefix (`bert.`, `vit.`, `model.`, ...).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::Value;

use super::config_json::ConfigJson;
use crate::error::{Error, Result};
use crate::builder::Builder;
use crate::state::RunState;

/// Task prefixes under which transformers' task classes keep the base model.
pub const TASK_PREFIXES: &[&str] = &["bert", "roberta", "vit", "dinov2", "model", "transformer"];

/// An opened model directory.
#[derive(Clone, Debug)]
pub struct ModelDir {
    /// The directory.
    pub path: PathBuf,
    /// Parsed `config.json`.
    pub config: Value,
    /// `config.model_type`.
    pub model_type: String,
    /// The safetensors files holding the weights.
    pub weights: Vec<PathBuf>,
    /// Every tensor name in the weights.
    pub names: BTreeSet<String>,
    /// The dtype the weights are stored in (the most common one).
    pub stored_dtype: DType,
}

fn io_err(path: &Path, what: &str) -> Error {
    Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string()))
}

impl ModelDir {
    /// Reads `config.json` and finds the weights.
    pub fn open(path: &Path) -> Result<Self> {
        if !path.is_dir() {
            return Err(io_err(path, "model directory not found (expected a Hugging Face model folder with config.json and model.safetensors)"));
        }
        let cfg_path = path.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            Error::io(&cfg_path, std::io::Error::new(e.kind(), format!("{e}: a model directory needs config.json (as transformers' save_pretrained writes)")))
        })?;
        let config: Value = serde_json::from_str(&text).map_err(|e| Error::ConfigParse {
            path: cfg_path.display().to_string(),
            reason: e.to_string(),
        })?;
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::ConfigParse {
                path: cfg_path.display().to_string(),
                reason: "no \"model_type\" string; add the transformers model type (bert, vit, dinov2, llama, gpt2)".into(),
            })?
            .to_string();
        let index = path.join("model.safetensors.index.json");
        let single = path.join("model.safetensors");
        let weights: Vec<PathBuf> = if single.is_file() {
            vec![single]
        } else if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
            let v: Value = serde_json::from_str(&text).map_err(|e| Error::ConfigParse {
                path: index.display().to_string(),
                reason: e.to_string(),
            })?;
            let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::ConfigParse {
                path: index.display().to_string(),
                reason: "no \"weight_map\" object".into(),
            })?;
            let files: BTreeSet<String> = map.values().filter_map(Value::as_str).map(String::from).collect();
            files.into_iter().map(|f| path.join(f)).collect()
        } else {
            return Err(io_err(
                path,
                "no model.safetensors or model.safetensors.index.json (pytorch_model.bin is not read: convert it with safetensors)",
            ));
        };
        let mut names = BTreeSet::new();
        let mut dtype_counts: std::collections::BTreeMap<String, usize> = Default::default();
        for w in &weights {
            let bytes = std::fs::read(w).map_err(|e| Error::io(w, e))?;
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| Error::Safetensors {
                file: w.display().to_string(),
                reason: e.to_string(),
            })?;
            for (name, info) in meta.tensors() {
                *dtype_counts.entry(format!("{:?}", info.dtype)).or_default() += 1;
                names.insert(name);
            }
        }
        let stored_dtype = match dtype_counts.iter().max_by_key(|(_, c)| **c).map(|(d, _)| d.as_str()) {
            Some("F16") => DType::F16,
            Some("BF16") => DType::BF16,
            _ => DType::F32,
        };
        Ok(Self { path: path.to_path_buf(), config, model_type, weights, names, stored_dtype })
    }

    /// The task prefix the weights use for the base model, if any: the `p` in [`TASK_PREFIXES`]
    /// such that `p.<probe>` exists and `<probe>` does not.
    pub fn detect_prefix(&self, probe: &str) -> Option<String> {
        if self.names.contains(probe) {
            return None;
        }
        TASK_PREFIXES
            .iter()
            .find(|p| self.names.contains(&format!("{p}.{probe}")))
            .map(|p| p.to_string())
    }

    /// A builder over the weights (memory-mapped), reading names under `prefix` when given.
    /// `dtype` defaults to the stored dtype.
    pub fn builder(
        &self,
        prefix: Option<&str>,
        dtype: Option<DType>,
        device: &Device,
        state: Arc<RunState>,
    ) -> Result<Builder<'static>> {
        let dtype = dtype.unwrap_or(self.stored_dtype);
        // SAFETY: the files are memory-mapped read-only; they must not be modified while the
        // model lives, as with every memory-mapped safetensors loader (candle, transformers).
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&self.weights, dtype, device)? };
        let vb = match prefix {
            Some(p) => vb.pp(p),
            None => vb,
        };
        Ok(Builder::new_rooted(vb, state))
    }

    /// Typed reads of `config.json` ([`ConfigJson`]).
    pub fn fields(&self) -> ConfigJson<'_> {
        ConfigJson::new(&self.config, &self.path)
    }

    /// A required positive integer of `config.json` (`fields().positive(&[key])`).
    pub fn usize_field(&self, key: &str) -> Result<usize> {
        self.fields().positive(&[key])
    }
}

/// The local Hugging Face hub cache: `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
/// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub` (huggingface_hub's order).
pub fn hub_cache_dir() -> Option<PathBuf> {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("HF_HUB_CACHE")
        .or_else(|| var("HF_HOME").map(|h| h.join("hub")))
        .or_else(|| var("XDG_CACHE_HOME").map(|c| c.join("huggingface").join("hub")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("huggingface").join("hub")))
}

/// Whether `s` looks like a hub model id `org/name` (optionally `@revision`).
fn hub_id(s: &str) -> Option<(&str, &str, &str)> {
    let (id, rev) = s.split_once('@').unwrap_or((s, "main"));
    let (org, name) = id.split_once('/')?;
    let ok = |x: &str| {
        !x.is_empty() && !x.starts_with('.') && x.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    (ok(org) && ok(name) && !rev.is_empty() && !rev.contains('/')).then_some((org, name, rev))
}

/// A model directory: `spec` itself when it is a directory, else a hub id `org/name[@revision]`
/// resolved in the local hub cache ([`hub_cache_dir`]) to its snapshot folder, as
/// `from_pretrained` finds it offline. Nothing is downloaded.
pub fn resolve_model_dir(spec: &Path) -> Result<PathBuf> {
    if spec.is_dir() {
        return Ok(spec.to_path_buf());
    }
    let Some((org, name, rev)) = spec.to_str().and_then(hub_id) else {
        return Ok(spec.to_path_buf()); // ModelDir::open reports the missing directory
    };
    let Some(cache) = hub_cache_dir() else {
        return Err(io_err(spec, "neither a directory nor resolvable as a hub id: no hub cache (set HF_HUB_CACHE)"));
    };
    let repo = cache.join(format!("models--{org}--{name}"));
    let commit = if rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit()) {
        rev.to_string()
    } else {
        let r = repo.join("refs").join(rev);
        match std::fs::read_to_string(&r) {
            Ok(c) => c.trim().to_string(),
            Err(_) => {
                return Err(io_err(
                    spec,
                    &format!(
                        "not a directory, and the hub id {org}/{name} (revision {rev}) is not in the local hub cache \
                         ({} missing). pvera does not download: fetch it where there is internet \
                         (`hf download {org}/{name}` or transformers' from_pretrained) and copy {}, or point \
                         HF_HUB_CACHE at a cache that has it, or pass the model folder itself",
                        r.display(),
                        repo.display()
                    ),
                ))
            }
        }
    };
    let snap = repo.join("snapshots").join(&commit);
    if !snap.join("config.json").is_file() {
        return Err(io_err(
            &snap,
            &format!(
                "hub snapshot of {org}/{name} at {commit} has no config.json (an incomplete download?); fetch it again"
            ),
        ));
    }
    Ok(snap)
}

#[cfg(test)]
mod hub_tests {
    use super::hub_id;

    #[test]
    fn hub_ids_are_recognised() {
        assert_eq!(hub_id("facebook/dinov2-small"), Some(("facebook", "dinov2-small", "main")));
        assert_eq!(hub_id("org/name@v1.0"), Some(("org", "name", "v1.0")));
        assert_eq!(hub_id("./model"), None);
        assert_eq!(hub_id("a/b/c"), None);
        assert_eq!(hub_id("../x"), None);
        assert_eq!(hub_id("model"), None);
    }
}
