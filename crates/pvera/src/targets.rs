//! STUB: replaced by the helper's PEFT-exact matcher.
#![allow(missing_docs, dead_code)]
use crate::config::{PveraConfig, TargetModules, LayersPattern};
use crate::error::{Error, Result};
pub fn excluded_by_modules_to_save(key: &str, m: &[String]) -> bool { m.iter().any(|m| key == m || key.ends_with(&format!(".{m}"))) }
pub fn layer_index(_key: &str, _p: Option<&LayersPattern>) -> Option<i64> { None }
pub struct TargetMatcher { cfg: PveraConfig, re: Option<regex::Regex> }
impl TargetMatcher {
    pub fn new(config: &PveraConfig) -> Result<Self> { let re = match &config.target_modules { Some(TargetModules::Regex(s)) => Some(regex::Regex::new(&format!("^(?:{s})$")).map_err(|e| Error::config("target_modules", e.to_string()))?), _ => None }; Ok(Self { cfg: config.clone(), re }) }
    pub fn matches(&self, key: &str) -> bool {
        if excluded_by_modules_to_save(key, self.cfg.modules_to_save.as_deref().unwrap_or(&[])) { return false; }
        match &self.cfg.target_modules { Some(TargetModules::List(l)) => l.iter().any(|t| key == t || key.ends_with(&format!(".{t}"))), Some(TargetModules::Regex(_)) => self.re.as_ref().is_some_and(|r| r.is_match(key)), _ => false }
    }
}
pub fn default_target_modules(model_type: &str) -> Option<TargetModules> { match model_type { "bert" | "dinov2" => Some(TargetModules::List(vec!["query".into(), "value".into()])), "llama" => Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])), "gpt2" => Some(TargetModules::List(vec!["c_attn".into()])), _ => None } }
pub fn compress_target_names(names: &[String]) -> Vec<String> { names.to_vec() }
