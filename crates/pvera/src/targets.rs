//! Which modules get a PVeRA layer: PEFT 0.21.2's target-module rules, as pure functions.
//!
//! * [`TargetMatcher`] ports `check_target_module_exists` (`peft/tuners/tuners_utils.py`), the rule
//!   applied to every `named_modules()` key (the injection loop itself skips the root key `""` and keys
//!   inside existing adapter layers; that is the caller's job).
//! * [`default_target_modules`] is `TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING`.
//! * [`expand_all_linear`], [`find_minimal_target_modules`], [`maybe_compress_target_names`] and
//!   [`compress_target_names`] port `_maybe_include_all_linear_layers` and the `>= 20 targets` suffix
//!   compression of `inject_adapter`.
//!
//! Python regular expressions (a string target, `modules_to_save` and `layers_pattern` fragments)
//! are compiled by [`crate::pyregex`], which keeps Python's `re` semantics.
//!
//! Nothing here panics, whatever the input.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::LazyLock;

use regex::Regex;

use crate::config::{LayersPattern, LayersToTransform, Method, PveraConfig, TargetModules, ALL_LINEAR};
use crate::error::{Error, Result};
use crate::pyregex::{compile_fullmatch, compile_py, layers_pattern_regex, modules_to_save_regex, py_digit_value, Anchor};

/// Target lists at least this long are compressed to minimal suffixes (PEFT's
/// `MIN_TARGET_MODULES_FOR_OPTIMIZATION`).
pub const MIN_TARGET_MODULES_FOR_OPTIMIZATION: usize = 20;

/// Classifier-head attribute names PEFT excludes from `all-linear` for `SEQ_CLS` (`SEQ_CLS_HEAD_NAMES`).
pub const SEQ_CLS_HEAD_NAMES: [&str; 2] = ["score", "classifier"];

// =================================================================================================
// Default targets
// =================================================================================================

/// One entry of PEFT's default target table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultTargets {
    /// Module names (PEFT turns them into a set).
    List(&'static [&'static str]),
    /// A regex for `re.fullmatch` (only `gemma4`).
    Regex(&'static str),
}

/// `TRANSFORMERS_MODELS_TO_PVERA_TARGET_MODULES_MAPPING` of PEFT 0.21.2, in PEFT's order (41 entries):
/// the VeRA table (LoRA's with `phi -> [q_proj, v_proj]`) plus `dinov2 -> [query, value]`.
///
/// Note (docs/peft-behaviour.md §3): with transformers v5, Dinov2 names its projections `q_proj`/`v_proj`, so the
/// `dinov2` default matches nothing there; PEFT fails the same way.
pub const DEFAULT_TARGET_MODULES: [(&str, DefaultTargets); 41] = {
    use DefaultTargets::{List, Regex};
    const QV: &[&str] = &["q_proj", "v_proj"];
    const QUERY_VALUE: &[&str] = &["query", "value"];
    const QKV: &[&str] = &["query_key_value"];
    [
        ("t5", List(&["q", "v"])),
        ("mt5", List(&["q", "v"])),
        ("bart", List(QV)),
        ("gpt2", List(&["c_attn"])),
        ("bloom", List(QKV)),
        ("blip-2", List(&["q", "v", "q_proj", "v_proj"])),
        ("opt", List(QV)),
        ("gptj", List(QV)),
        ("gpt_neox", List(QKV)),
        ("gpt_neo", List(QV)),
        ("bert", List(QUERY_VALUE)),
        ("roberta", List(QUERY_VALUE)),
        ("xlm-roberta", List(QUERY_VALUE)),
        ("electra", List(QUERY_VALUE)),
        ("deberta-v2", List(&["query_proj", "value_proj"])),
        ("deberta", List(&["in_proj"])),
        ("layoutlm", List(QUERY_VALUE)),
        ("llama", List(QV)),
        ("llama4", List(QV)),
        ("chatglm", List(QKV)),
        ("gpt_bigcode", List(&["c_attn"])),
        ("mpt", List(&["Wqkv"])),
        ("RefinedWebModel", List(QKV)),
        ("RefinedWeb", List(QKV)),
        ("falcon", List(QKV)),
        ("btlm", List(&["c_proj", "c_attn"])),
        ("codegen", List(&["qkv_proj"])),
        ("mistral", List(QV)),
        ("mixtral", List(QV)),
        ("stablelm", List(QV)),
        ("phi", List(QV)),
        ("gemma", List(QV)),
        ("gemma2", List(QV)),
        ("gemma3_text", List(QV)),
        ("gemma4", Regex(r".*language_model\..*\.(q_proj|v_proj)")),
        ("qwen2", List(QV)),
        ("qwen3", List(QV)),
        ("nemotron_h", List(&["q_proj", "k_proj", "v_proj", "o_proj"])),
        ("rwkv", List(&["key", "value", "receptance", "output"])),
        ("rwkv7", List(&["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"])),
        ("dinov2", List(QUERY_VALUE)),
    ]
};

/// PEFT's default targets of `method` for a transformers `model_type` (case-sensitive, e.g.
/// `"llama"`, `"RefinedWeb"`), or `None` when PEFT has none (ViT, custom models, ...). VeRA's table
/// (`TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING`) is PVeRA's without `dinov2`.
pub fn default_target_modules(method: Method, model_type: &str) -> Option<TargetModules> {
    if method == Method::Vera && model_type == "dinov2" {
        return None;
    }
    DEFAULT_TARGET_MODULES.iter().find(|(k, _)| *k == model_type).map(|(_, t)| match t {
        DefaultTargets::List(v) => TargetModules::list(v.iter().copied()),
        DefaultTargets::Regex(r) => TargetModules::Regex((*r).to_string()),
    })
}

/// PEFT's `_prepare_adapter_config`: the config's `target_modules`, or the model type's defaults when
/// it is `None`. Custom models (PEFT uses `model_type = "custom"`) and unknown types give
/// [`Error::NoDefaultTargets`]. `AllLinear` is returned as is: expand it with [`expand_all_linear`].
pub fn resolve_target_modules(config: &PveraConfig, model_type: &str) -> Result<TargetModules> {
    match &config.target_modules {
        Some(t) => Ok(t.clone()),
        None => default_target_modules(config.method, model_type)
            .ok_or_else(|| Error::NoDefaultTargets { method: config.method, model_type: model_type.to_string() }),
    }
}

/// PEFT's `_maybe_include_all_linear_layers` once the model has been inspected: the full names of
/// all linear / `Conv1D` modules (`linear_module_names`, in any order) minus
///
/// * `output_embedding`: the name of the module returned by `get_output_embeddings()` (`lm_head`);
///   pass `None` for non-transformers models, where PEFT excludes nothing;
/// * otherwise, if `task_type` is `"SEQ_CLS"`: the first of `score`, `classifier` that is a
///   **top-level attribute** of the model (`top_level_names`: the names of the model's direct children).
///
/// The result (sorted, deduplicated) replaces `target_modules` as a list. Pass only plain layers: PEFT
/// also skips modules inside existing adapter layers.
pub fn expand_all_linear(
    linear_module_names: &[String],
    output_embedding: Option<&str>,
    task_type: Option<&str>,
    top_level_names: &[String],
) -> Vec<String> {
    let mut exclude: Option<&str> = None;
    if let Some(out) = output_embedding {
        exclude = Some(out);
    } else if task_type == Some("SEQ_CLS") {
        exclude = SEQ_CLS_HEAD_NAMES.iter().copied().find(|h| top_level_names.iter().any(|n| n == h));
    }
    let set: BTreeSet<&String> = linear_module_names.iter().filter(|n| Some(n.as_str()) != exclude).collect();
    set.into_iter().cloned().collect()
}

// =================================================================================================
// Compression
// =================================================================================================

fn generate_suffixes(s: &str) -> Vec<String> {
    let parts: Vec<&str> = s.split('.').collect();
    (0..parts.len()).rev().map(|i| parts[i..].join(".")).collect()
}

/// PEFT's `_find_minimal_target_modules(target_modules, other_module_names)`: the smallest set of
/// `"."`-suffixes that still selects every target (exactly or as a dotted suffix) and no other module.
/// Returned sorted (PEFT returns a set).
///
/// Errors, with PEFT's messages: empty `targets`, an empty string in `targets`, or a name in both lists.
pub fn find_minimal_target_modules(targets: &[String], other_module_names: &[String]) -> Result<Vec<String>> {
    if targets.is_empty() {
        return Err(Error::config("target_modules", "target_modules should be a list or set of strings."));
    }
    let targets: BTreeSet<&str> = targets.iter().map(String::as_str).collect();
    if targets.contains("") {
        return Err(Error::config("target_modules", "target_modules should not contain an empty string."));
    }
    let others: HashSet<&str> = other_module_names.iter().map(String::as_str).collect();
    if targets.iter().any(|t| others.contains(t)) {
        return Err(Error::config(
            "target_modules",
            "target_modules and other_module_names contain common elements, this should not happen, please \
             open a GitHub issue at https://github.com/huggingface/peft/issues with the code to reproduce this issue",
        ));
    }
    let other_suffixes: HashSet<String> = others.iter().flat_map(|o| generate_suffixes(o)).collect();
    let mut items: Vec<(&str, Vec<String>)> = targets.iter().map(|t| (*t, generate_suffixes(t))).collect();
    items.sort_by(|a, b| a.1.cmp(&b.1));
    let mut required: BTreeSet<String> = BTreeSet::new();
    for (item, suffixes) in &items {
        for suffix in suffixes {
            if required.contains(suffix) || other_suffixes.contains(suffix) {
                continue;
            }
            let covered = required.iter().any(|r| {
                item.len() > r.len() && item.ends_with(r.as_str()) && item.as_bytes()[item.len() - r.len() - 1] == b'.'
            });
            if !covered {
                required.insert(suffix.clone());
                break;
            }
        }
    }
    if required.is_empty() {
        return Ok(targets.into_iter().map(str::to_string).collect());
    }
    Ok(required.into_iter().collect())
}

/// The optimisation `inject_adapter` applies to list targets (`tuners_utils.py` l.918-936): with at
/// least [`MIN_TARGET_MODULES_FOR_OPTIMIZATION`] distinct names, the names are compressed against the
/// other module keys (`all_module_keys`: every `named_modules()` key, the root `""` included; keys that
/// are targets or end with `"." + target` are left out as PEFT does), and the result replaces
/// `target_modules` only if it is shorter. `Ok(None)` means "keep the list". Errors as
/// [`find_minimal_target_modules`] (PEFT raises the same `ValueError`s).
pub fn maybe_compress_target_names(targets: &[String], all_module_keys: &[String]) -> Result<Option<Vec<String>>> {
    let set: HashSet<&str> = targets.iter().map(String::as_str).collect();
    if set.len() < MIN_TARGET_MODULES_FOR_OPTIMIZATION {
        return Ok(None);
    }
    let suffixes: Vec<String> = set.iter().map(|t| format!(".{t}")).collect();
    let others: Vec<String> = all_module_keys
        .iter()
        .filter(|k| !set.contains(k.as_str()) && !suffixes.iter().any(|s| k.ends_with(s.as_str())))
        .cloned()
        .collect();
    let unique: Vec<String> = set.iter().map(|s| s.to_string()).collect();
    let new = find_minimal_target_modules(&unique, &others)?;
    Ok((new.len() < set.len()).then_some(new))
}

/// PEFT's suffix compression when no module outside `names` needs to be told apart from them:
/// [`find_minimal_target_modules`]`(names, [])`, kept only if shorter than the distinct names (as
/// `inject_adapter` does); otherwise the names, deduplicated, in their order. Inputs PEFT rejects
/// (an empty list or an empty name) are returned deduplicated, unchanged. The size threshold
/// ([`MIN_TARGET_MODULES_FOR_OPTIMIZATION`]) is the caller's.
///
/// This equals PEFT's result only when no other module key shares a dotted suffix with a target; for
/// instance an all-linear expansion that excluded `classifier` while targeting `head.classifier` would
/// compress to `classifier` and select the excluded head again. When the other module names are known
/// (at least the excluded output head / classifier), prefer [`maybe_compress_target_names`].
pub fn compress_target_names(names: &[String]) -> Vec<String> {
    let mut unique: Vec<String> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for n in names {
        if seen.insert(n.as_str()) {
            unique.push(n.clone());
        }
    }
    match find_minimal_target_modules(&unique, &[]) {
        Ok(minimal) if minimal.len() < unique.len() => minimal,
        _ => unique,
    }
}

/// `re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)`: the default layer-index regex.
static DEFAULT_LAYER_RE: LazyLock<Regex> = LazyLock::new(|| {
    compile_py(r".*?\.[^.]*\.(?P<idx>\d+)\.", Anchor::Prefix).unwrap_or_else(|_| {
        // Unreachable: the pattern is fixed and valid. Fall back to an ASCII-digit version.
        Regex::new(r"\A(?:.*?\.[^.]*\.(?P<idx>[0-9]+)\.)").unwrap_or_else(|_| Regex::new("$^").expect("valid"))
    })
});

thread_local! {
    /// Compiled fragments for the free functions, so repeated calls do not recompile.
    static FRAGMENT_CACHE: RefCell<HashMap<(bool, String), Option<Regex>>> = RefCell::new(HashMap::new());
}

/// Compiles (or fetches) a `modules_to_save` (`layer == false`) or `layers_pattern` (`layer == true`)
/// fragment; `None` if it is not usable.
fn cached_fragment(layer: bool, fragment: &str) -> Option<Regex> {
    let build = || {
        if layer {
            layers_pattern_regex(fragment).ok()
        } else {
            modules_to_save_regex(fragment).ok()
        }
    };
    FRAGMENT_CACHE.with(|cache| {
        let Ok(mut cache) = cache.try_borrow_mut() else {
            return build();
        };
        let key = (layer, fragment.to_string());
        if let Some(hit) = cache.get(&key) {
            return hit.clone();
        }
        if cache.len() >= 256 {
            cache.clear();
        }
        let compiled = build();
        cache.insert(key, compiled.clone());
        compiled
    })
}

/// Literal version of `re.match(rf"(^|.*\.){m}($|\..*)", key)` (used when `m` is not a valid regex).
fn literal_excluded(key: &str, m: &str) -> bool {
    let mut starts: Vec<usize> = vec![0];
    starts.extend(key.match_indices('.').map(|(p, _)| p + 1));
    starts.into_iter().any(|p| {
        // `.*\.` cannot cross a newline.
        !key[..p].contains('\n')
            && key[p..].starts_with(m)
            && (p + m.len() == key.len() || key[p + m.len()..].starts_with('.'))
    })
}

/// PEFT's `modules_to_save` exclusion: true if any entry `m` satisfies
/// `re.match(rf"(^|.*\.){m}($|\..*)", key)`, i.e. `m` is a whole dotted component sequence of `key`.
/// Each `m` is a Python regex **fragment** pasted in unescaped (so `"lin.*"` or `"a|b"` behave as regex).
/// An entry that is not a usable regex (PEFT would raise `re.error`) is matched literally here;
/// [`TargetMatcher::new`] and [`PveraConfig::validate`] report it instead. Use
/// a [`TargetMatcher`] when matching many keys (compiled fragments are cached per thread).
pub fn excluded_by_modules_to_save(key: &str, modules_to_save: &[String]) -> bool {
    modules_to_save.iter().any(|m| match cached_fragment(false, m) {
        Some(re) => re.is_match(key),
        None => literal_excluded(key, m),
    })
}

/// Reads a layer index the way Python's `int()` reads the `\d+` text (any script's decimal digits).
/// Numbers beyond `i64` give `None` (they cannot equal a configured index, so the decision is the same).
fn parse_py_int(digits: &str) -> Option<i64> {
    let mut v: i64 = 0;
    for c in digits.chars() {
        let d = py_digit_value(c)? as i64;
        v = v.checked_mul(10)?.checked_add(d)?;
    }
    Some(v)
}

/// Outcome of one layer regex: `None` = no match; `Some(idx)` = matched, with the index if the `idx`
/// group took part (a pattern like `"a|b"` can match without it).
fn index_from(re: &Regex, key: &str) -> Option<Option<i64>> {
    re.captures(key).map(|c| c.name("idx").and_then(|m| parse_py_int(m.as_str())))
}

/// Literal version of the layers_pattern regex for a fragment that is not a valid regex.
fn literal_layer_index(key: &str, p: &str) -> Option<Option<i64>> {
    let mut starts: Vec<usize> = vec![0];
    starts.extend(key.match_indices('.').map(|(q, _)| q + 1));
    for q in starts {
        if key[..q].contains('\n') {
            break;
        }
        let Some(rest) = key[q..].strip_prefix(p).and_then(|r| r.strip_prefix('.')) else {
            continue;
        };
        let end = rest.char_indices().find(|(_, c)| py_digit_value(*c).is_none()).map_or(rest.len(), |(k, _)| k);
        if end > 0 && rest[end..].starts_with('.') {
            return Some(parse_py_int(&rest[..end]));
        }
    }
    None
}

/// PEFT's layer index of `key`: the first numbered component after a `layers_pattern` entry
/// (`re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", key)`, entries tried in order, the first that
/// matches decides), or with no / empty pattern, the first number that is a whole component preceded by
/// at least two components (`re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)`). So
/// `model.layers.1.mlp.experts.0.up_proj` is layer 1.
///
/// `None` when there is no index, when the matching pattern matched without the index group, or when
/// the number does not fit in `i64` (PEFT then never selects the module either). Fragments that are not
/// valid regexes are matched literally here (see [`excluded_by_modules_to_save`]).
pub fn layer_index(key: &str, layers_pattern: Option<&LayersPattern>) -> Option<i64> {
    match layers_pattern {
        Some(lp) if !lp.is_empty() => {
            for p in lp.patterns() {
                let found = match cached_fragment(true, p) {
                    Some(re) => index_from(&re, key),
                    None => literal_layer_index(key, p),
                };
                if let Some(idx) = found {
                    return idx;
                }
            }
            None
        }
        _ => index_from(&DEFAULT_LAYER_RE, key).flatten(),
    }
}

// =================================================================================================
// TargetMatcher
// =================================================================================================

#[derive(Debug, Clone)]
enum CompiledTarget {
    /// A string target: `re.fullmatch`.
    FullMatch(Regex),
    /// A name list: exact key, or `"." + name` suffix.
    Names { exact: HashSet<String>, dotted: Vec<String> },
}

#[derive(Debug, Clone)]
struct LayerFilter {
    indexes: LayersToTransform,
    /// Compiled `layers_pattern` entries; empty means the default index regex.
    patterns: Vec<Regex>,
}

impl LayerFilter {
    fn index(&self, key: &str) -> Option<i64> {
        if self.patterns.is_empty() {
            return index_from(&DEFAULT_LAYER_RE, key).flatten();
        }
        self.patterns.iter().find_map(|re| index_from(re, key)).flatten()
    }
}

/// PEFT's `check_target_module_exists` for one config, with every regex compiled once.
#[derive(Debug, Clone)]
pub struct TargetMatcher {
    excluded: Vec<Regex>,
    target: CompiledTarget,
    layer_filter: Option<LayerFilter>,
}

fn compile_exclusions(config: &PveraConfig) -> Result<Vec<Regex>> {
    match &config.modules_to_save {
        Some(list) if !list.is_empty() => list.iter().map(|m| modules_to_save_regex(m)).collect(),
        _ => Ok(Vec::new()),
    }
}

fn compile_target(target: &TargetModules) -> Result<CompiledTarget> {
    Ok(match target {
        TargetModules::Regex(s) => CompiledTarget::FullMatch(compile_fullmatch("target_modules", s)?),
        TargetModules::AllLinear => CompiledTarget::FullMatch(compile_fullmatch("target_modules", ALL_LINEAR)?),
        TargetModules::List(names) => CompiledTarget::Names {
            exact: names.iter().cloned().collect(),
            dotted: names.iter().map(|n| format!(".{n}")).collect(),
        },
    })
}

fn compile_layer_filter(config: &PveraConfig) -> Result<Option<LayerFilter>> {
    let Some(indexes) = &config.layers_to_transform else {
        return Ok(None);
    };
    if !indexes.is_filter() {
        return Ok(None);
    }
    let patterns = match &config.layers_pattern {
        Some(lp) if !lp.is_empty() => {
            lp.patterns().into_iter().map(layers_pattern_regex).collect::<Result<Vec<_>>>()?
        }
        _ => Vec::new(),
    };
    Ok(Some(LayerFilter { indexes: indexes.clone(), patterns }))
}

impl TargetMatcher {
    /// Compiles the matching rule of `config`.
    ///
    /// `config.target_modules` must be resolved (`Some`): PEFT fills in the model type's defaults first
    /// ([`resolve_target_modules`]). [`TargetModules::AllLinear`] is accepted, but PEFT expands it to
    /// module names before matching ([`expand_all_linear`]); unexpanded, it is matched as PEFT would
    /// match the literal string, with `re.fullmatch("all-linear", key)`, which selects nothing real.
    ///
    /// Errors ([`Error::InvalidConfig`]): no targets; a target regex, `modules_to_save` entry or (when
    /// used) `layers_pattern` entry that Python rejects or the `regex` crate cannot run.
    pub fn new(config: &PveraConfig) -> Result<Self> {
        let target = config.target_modules.as_ref().ok_or_else(|| {
            Error::config(
                "target_modules",
                "is null; resolve it first (PEFT uses the model type's defaults, see \
                 targets::resolve_target_modules) or list the modules to adapt",
            )
        })?;
        let excluded = compile_exclusions(config)?;
        let compiled = compile_target(target)?;
        let layer_filter = match compiled {
            CompiledTarget::Names { .. } => compile_layer_filter(config)?,
            CompiledTarget::FullMatch(_) => None,
        };
        Ok(TargetMatcher { excluded, target: compiled, layer_filter })
    }

    /// PEFT's decision for one `named_modules()` key:
    ///
    /// 1. excluded if a `modules_to_save` entry matches ([`excluded_by_modules_to_save`]);
    /// 2. a string target: `re.fullmatch(target, key)`; `layers_to_transform` is ignored;
    /// 3. a list target: a key equal to an entry is selected **without** the layer filter; otherwise
    ///    the key must end with `"." + entry`, and then, if `layers_to_transform` is a single index or a
    ///    non-empty list, the key's [`layer_index`] must equal it / be in it (no index: not selected).
    pub fn matches(&self, key: &str) -> bool {
        if self.excluded.iter().any(|re| re.is_match(key)) {
            return false;
        }
        match &self.target {
            CompiledTarget::FullMatch(re) => re.is_match(key),
            CompiledTarget::Names { exact, dotted } => {
                if exact.contains(key) {
                    return true;
                }
                if !dotted.iter().any(|d| key.ends_with(d.as_str())) {
                    return false;
                }
                match &self.layer_filter {
                    None => true,
                    Some(f) => f.index(key).is_some_and(|idx| f.indexes.contains(idx)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PveraConfig;
    use crate::pyregex::translate_python_regex;
    use serde_json::Value;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/configs");

    fn fixture_json(name: &str) -> Value {
        let path = format!("{FIXTURES}/{name}");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        serde_json::from_str(&text).unwrap()
    }

    fn strings(v: &Value) -> Vec<String> {
        v.as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect()
    }

    fn cfg(json: &str) -> PveraConfig {
        PveraConfig::from_json_str(json, "inline").unwrap()
    }

    fn matcher(json: &str) -> TargetMatcher {
        TargetMatcher::new(&cfg(json)).unwrap()
    }

    fn llama_keys() -> Vec<String> {
        let mut keys = vec!["model.embed_tokens".to_string(), "lm_head".to_string()];
        for i in 0..3 {
            for p in ["q_proj", "k_proj", "v_proj", "o_proj"] {
                keys.push(format!("model.layers.{i}.self_attn.{p}"));
            }
        }
        keys
    }

    fn selected(m: &TargetMatcher, keys: &[String]) -> Vec<String> {
        keys.iter().filter(|k| m.matches(k)).cloned().collect()
    }

    #[test]
    fn decisions_equal_peft_check_target_module_exists() {
        let data = fixture_json("matching_cases.json");
        assert_eq!(data["peft_version"], "0.21.2");
        let keys = strings(&data["keys"]);
        let cases = data["cases"].as_array().unwrap();
        assert!(cases.len() >= 30);
        for case in cases {
            let config_text = serde_json::to_string(&case["config"]).unwrap();
            let config = PveraConfig::from_json_str(&config_text, "case").unwrap();
            let m = TargetMatcher::new(&config).unwrap_or_else(|e| panic!("{config_text}: {e}"));
            let want = strings(&case["matched"]);
            let got = selected(&m, &keys);
            assert_eq!(got, want, "{config_text}");
            // the free functions agree with the matcher
            for key in &keys {
                if let Some(mts) = &config.modules_to_save {
                    if excluded_by_modules_to_save(key, mts) {
                        assert!(!m.matches(key), "{config_text} {key}");
                    }
                }
            }
        }
    }

    #[test]
    fn spec_ran_examples_llama() {
        let keys = llama_keys();
        let q = |i: usize| format!("model.layers.{i}.self_attn.q_proj");
        let v = |i: usize| format!("model.layers.{i}.self_attn.v_proj");
        let m =
            matcher(r#"{"peft_type": "PVERA", "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}"#);
        assert_eq!(selected(&m, &keys), vec![q(1), v(1)]);
        let m = matcher(
            r#"{"peft_type": "PVERA", "target_modules": ["q_proj", "v_proj"], "layers_to_transform": 1, "layers_pattern": "layers"}"#,
        );
        assert_eq!(selected(&m, &keys), vec![q(1), v(1)]);
        let m = matcher(
            r#"{"peft_type": "PVERA", "target_modules": ["q_proj", "v_proj"], "layers_to_transform": [0, 2], "layers_pattern": ["h", "layers"]}"#,
        );
        assert_eq!(selected(&m, &keys), vec![q(0), v(0), q(2), v(2)]);
        // a str target must fullmatch the whole name
        let m = matcher(r#"{"peft_type": "PVERA", "target_modules": "q_proj"}"#);
        assert!(selected(&m, &keys).is_empty());
        let m = matcher(r#"{"peft_type": "PVERA", "target_modules": ".*\\.q_proj"}"#);
        assert_eq!(selected(&m, &keys), vec![q(0), q(1), q(2)]);
        // layers_to_transform is ignored for str targets
        let m = matcher(r#"{"peft_type": "PVERA", "target_modules": ".*\\.q_proj", "layers_to_transform": [1]}"#);
        assert_eq!(selected(&m, &keys).len(), 3);
        // list entries need a "." boundary
        let m = matcher(r#"{"peft_type": "PVERA", "target_modules": ["proj"]}"#);
        assert!(selected(&m, &keys).is_empty());
    }

    #[test]
    fn layer_index_rules() {
        let one = |s: &str| LayersPattern::One(s.to_string());
        assert_eq!(layer_index("model.layers.1.self_attn.q_proj", None), Some(1));
        assert_eq!(layer_index("model.layers.1.mlp.experts.0.up_proj", None), Some(1));
        assert_eq!(layer_index("layers.1.q_proj", None), None);
        assert_eq!(layer_index("layers.1.q_proj", Some(&one("layers"))), Some(1));
        assert_eq!(layer_index("layers.1.q_proj", Some(&one(""))), None);
        assert_eq!(layer_index("transformer.h.11.attn.c_attn", Some(&one("h"))), Some(11));
        assert_eq!(layer_index("model.layers.\u{663}.q_proj", None), Some(3));
        assert_eq!(layer_index("model.layers.1\u{1d7d9}.q_proj", None), Some(11));
        assert_eq!(layer_index("model.layers.99999999999999999999999.q_proj", None), None);
        assert_eq!(layer_index("model.layers.1.q_proj", Some(&one("layers|h"))), None);
        let many = LayersPattern::Many(vec!["h".into(), "layers".into()]);
        assert_eq!(layer_index("model.layers.2.q_proj", Some(&many)), Some(2));
        assert_eq!(layer_index("model.blocks.2.q_proj", Some(&many)), None);
        // invalid fragments are matched literally and never panic
        assert_eq!(layer_index("model.(.4.x", Some(&one("("))), Some(4));
        assert_eq!(layer_index("model.layers.4.x", Some(&one("("))), None);
    }

    #[test]
    fn modules_to_save_exclusion() {
        let m = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(excluded_by_modules_to_save("classifier", &m(&["classifier"])));
        assert!(excluded_by_modules_to_save("model.classifier.dense", &m(&["classifier"])));
        assert!(!excluded_by_modules_to_save("model.my_classifier", &m(&["classifier"])));
        assert!(excluded_by_modules_to_save("model.lin1", &m(&["lin.*"])));
        assert!(excluded_by_modules_to_save("lin1", &m(&["lin0|lin1"])));
        assert!(!excluded_by_modules_to_save("sub.lin1", &m(&["lin0|lin1"])));
        assert!(!excluded_by_modules_to_save("anything", &m(&[])));
        // invalid regex fragments: literal match, no panic
        assert!(excluded_by_modules_to_save("a.(x.b", &m(&["(x"])));
        assert!(!excluded_by_modules_to_save("a.x.b", &m(&["(x"])));
        assert!(excluded_by_modules_to_save("[", &m(&["["])));
    }

    #[test]
    fn matcher_errors() {
        let e = TargetMatcher::new(&PveraConfig::default()).unwrap_err();
        assert!(matches!(&e, Error::InvalidConfig { field, .. } if field == "target_modules"), "{e:?}");
        for (json, field, needle) in [
            (r#"{"peft_type": "PVERA", "target_modules": "(?=q)q_proj"}"#, "target_modules", "look-ahead"),
            (r#"{"peft_type": "PVERA", "target_modules": "(a)\\1"}"#, "target_modules", "back-references"),
            (r#"{"peft_type": "PVERA", "target_modules": "a)"}"#, "target_modules", "unbalanced"),
            (
                r#"{"peft_type": "PVERA", "target_modules": ["x"], "modules_to_save": ["(?<=a)b"]}"#,
                "modules_to_save",
                "look-behind",
            ),
            (
                r#"{"peft_type": "PVERA", "target_modules": ["x"], "layers_to_transform": 0, "layers_pattern": ["h", "("]}"#,
                "layers_pattern",
                "\"(\"",
            ),
        ] {
            let e = TargetMatcher::new(&cfg(json)).unwrap_err();
            match &e {
                Error::InvalidConfig { field: f, reason } => {
                    assert_eq!(f, field, "{json}");
                    assert!(reason.contains(needle), "{json}: {reason}");
                }
                other => panic!("{other:?}"),
            }
        }
        // an unused layers_pattern (no filter) is not compiled, as in PEFT
        assert!(TargetMatcher::new(&cfg(
            r#"{"peft_type": "PVERA", "target_modules": ["x"], "layers_to_transform": [], "layers_pattern": "("}"#
        ))
        .is_ok());
        // AllLinear unexpanded behaves like PEFT's fullmatch of the literal string
        let m = matcher(r#"{"peft_type": "PVERA", "target_modules": "ALL-LINEAR"}"#);
        assert!(m.matches("all-linear") && !m.matches("model.layers.0.self_attn.q_proj"));
    }

    #[test]
    fn python_regex_semantics_match_python() {
        // Valid in Python but not runnable by the regex crate: must be rejected with a reason.
        let unsupported = [
            "(?P<n>a)(?P=n)",
            "(?=a)a",
            "(?<=a)b",
            "a*+",
            "(?>a)",
            r"(a)\1",
            "(?x)a b",
            r"(?a)\w",
            r"\N{LATIN SMALL LETTER A}",
        ];
        let data = fixture_json("matching_cases.json");
        let pool = strings(&data["regex_strings"]);
        let cases = data["regex_cases"].as_array().unwrap();
        assert!(cases.len() > 100);
        for case in cases {
            let pat = case["pattern"].as_str().unwrap();
            let full = compile_py(pat, Anchor::Full);
            let prefix = compile_py(pat, Anchor::Prefix);
            if let Some(err) = case.get("error") {
                assert!(full.is_err() && prefix.is_err(), "{pat:?}: Python says {err}, we accept");
                continue;
            }
            if unsupported.contains(&pat) {
                assert!(full.is_err(), "{pat:?} should be reported as unsupported");
                continue;
            }
            let full = full.unwrap_or_else(|e| panic!("{pat:?}: {e}"));
            let prefix = prefix.unwrap();
            let got: Vec<String> = pool.iter().filter(|s| full.is_match(s)).cloned().collect();
            assert_eq!(got, strings(&case["fullmatch"]), "fullmatch {pat:?} -> {:?}", translate_python_regex(pat));
            let got: Vec<String> = pool.iter().filter(|s| prefix.is_match(s)).cloned().collect();
            assert_eq!(got, strings(&case["match"]), "match {pat:?}");
        }
    }

    #[test]
    fn default_table_equals_peft() {
        let data = fixture_json("default_targets.json");
        let mapping = data["mapping"].as_array().unwrap();
        assert_eq!(mapping.len(), 41);
        assert_eq!(DEFAULT_TARGET_MODULES.len(), 41);
        for ((name, ours), pair) in DEFAULT_TARGET_MODULES.iter().zip(mapping.iter()) {
            let (peft_name, peft) = (pair[0].as_str().unwrap(), &pair[1]);
            assert_eq!(*name, peft_name);
            match (ours, peft) {
                (DefaultTargets::List(v), Value::Array(_)) => {
                    assert_eq!(v.iter().map(|s| s.to_string()).collect::<Vec<_>>(), strings(peft), "{name}")
                }
                (DefaultTargets::Regex(r), Value::String(s)) => assert_eq!(r, s, "{name}"),
                _ => panic!("{name}: {ours:?} vs {peft}"),
            }
        }
        let pv = Method::Pvera;
        assert_eq!(default_target_modules(pv, "llama"), Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])));
        assert_eq!(default_target_modules(pv, "dinov2"), Some(TargetModules::List(vec!["query".into(), "value".into()])));
        // VeRA's table is PVeRA's without dinov2 (PEFT's TRANSFORMERS_MODELS_TO_VERA_TARGET_MODULES_MAPPING).
        assert_eq!(default_target_modules(Method::Vera, "dinov2"), None);
        assert_eq!(default_target_modules(Method::Vera, "llama"), default_target_modules(pv, "llama"));
        assert_eq!(
            default_target_modules(pv, "gemma4"),
            Some(TargetModules::Regex(r".*language_model\..*\.(q_proj|v_proj)".into()))
        );
        assert_eq!(default_target_modules(pv, "vit"), None);
        assert_eq!(default_target_modules(pv, "Llama"), None);
        // every default compiles
        for (name, _) in DEFAULT_TARGET_MODULES {
            let c = PveraConfig { target_modules: default_target_modules(pv, name), ..Default::default() };
            assert!(TargetMatcher::new(&c).is_ok(), "{name}");
        }
        // resolution
        let c = PveraConfig::default();
        assert_eq!(resolve_target_modules(&c, "gpt2").unwrap(), TargetModules::List(vec!["c_attn".into()]));
        let e = resolve_target_modules(&c, "custom").unwrap_err();
        assert!(matches!(&e, Error::NoDefaultTargets { model_type, .. } if model_type == "custom"));
        let c = PveraConfig { target_modules: Some(TargetModules::list(["x"])), ..Default::default() };
        assert_eq!(resolve_target_modules(&c, "custom").unwrap(), TargetModules::List(vec!["x".into()]));
    }

    #[test]
    fn compression_equals_peft() {
        let data = fixture_json("compression_cases.json");
        for case in data["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let targets = strings(&case["targets"]);
            let all_keys = strings(&case["all_keys"]);
            let others: Vec<String> = all_keys.iter().filter(|k| !targets.contains(k)).cloned().collect();
            let minimal = find_minimal_target_modules(&targets, &others).unwrap();
            assert_eq!(minimal, strings(&case["minimal"]), "{name}");
            let alone = find_minimal_target_modules(&targets, &[]).unwrap();
            assert_eq!(alone, strings(&case["minimal_no_others"]), "{name}");
            let compressed = compress_target_names(&targets);
            if alone.len() < targets.len() {
                assert_eq!(compressed, alone, "{name}");
            } else {
                assert_eq!(compressed, targets, "{name}");
            }
            let inject = maybe_compress_target_names(&targets, &all_keys).unwrap();
            let want = match &case["inject"] {
                Value::Null => None,
                v => Some(strings(v)),
            };
            assert_eq!(inject, want, "{name}");
        }
        // PEFT's errors
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        assert!(find_minimal_target_modules(&[], &[]).is_err());
        assert!(find_minimal_target_modules(&s(&["a", ""]), &[]).unwrap_err().to_string().contains("empty string"));
        assert!(find_minimal_target_modules(&s(&["a"]), &s(&["a"]))
            .unwrap_err()
            .to_string()
            .contains("common elements"));
        assert_eq!(compress_target_names(&[]), Vec::<String>::new());
        assert_eq!(compress_target_names(&s(&["a.b", "", "a.b"])), s(&["a.b", ""]));
        assert_eq!(compress_target_names(&s(&["x.q", "y.q", "x.v"])), s(&["q", "v"]));
        // the excluded head is selected again without the other names, not with them
        let t = s(&["head.classifier", "a.dense", "b.dense"]);
        assert_eq!(compress_target_names(&t), s(&["classifier", "dense"]));
        assert_eq!(find_minimal_target_modules(&t, &s(&["classifier"])).unwrap(), s(&["dense", "head.classifier"]));
        // the docstring example
        let mut targets: Vec<String> = (0..100).map(|i| format!("model.decoder.layers.{i}.self_attn.q_proj")).collect();
        targets.extend((0..100).map(|i| format!("model.decoder.layers.{i}.self_attn.v_proj")));
        let others: Vec<String> = (0..100).map(|i| format!("model.encoder.layers.{i}.self_attn.k_proj")).collect();
        assert_eq!(find_minimal_target_modules(&targets, &others).unwrap(), s(&["q_proj", "v_proj"]));
    }

    #[test]
    fn all_linear_expansion() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let linear = s(&["model.layers.0.mlp.up_proj", "lm_head", "model.layers.0.self_attn.q_proj"]);
        assert_eq!(
            expand_all_linear(&linear, Some("lm_head"), None, &[]),
            s(&["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"])
        );
        let bert = s(&["bert.encoder.layer.0.attention.self.query", "bert.pooler.dense", "classifier"]);
        let top = s(&["bert", "dropout", "classifier"]);
        assert_eq!(
            expand_all_linear(&bert, None, Some("SEQ_CLS"), &top),
            s(&["bert.encoder.layer.0.attention.self.query", "bert.pooler.dense"])
        );
        // without a task type the classifier is targeted (docs/peft-behaviour.md §3)
        assert_eq!(expand_all_linear(&bert, None, None, &top).len(), 3);
        // "score" is looked for before "classifier"
        let both = s(&["score", "classifier", "x"]);
        assert_eq!(expand_all_linear(&both, None, Some("SEQ_CLS"), &both), s(&["classifier", "x"]));
    }

    #[test]
    fn translation_examples() {
        let t = |p: &str| translate_python_regex(p).unwrap();
        assert_eq!(t("a{"), "a\\{");
        assert_eq!(t("a{,3}"), "a{0,3}");
        assert_eq!(t(r"a\Z"), "a\\z");
        assert_eq!(t("(?P<idx>x)"), "(?P<idx>x)");
        assert_eq!(t("(?i)x"), "(?i)x");
        assert!(translate_python_regex("x(?i)").unwrap_err().contains("global flags"));
        assert!(translate_python_regex("a**").unwrap_err().contains("multiple repeat"));
        assert!(translate_python_regex("*").unwrap_err().contains("nothing to repeat"));
        assert!(translate_python_regex("[z-a]").unwrap_err().contains("bad character range"));
        assert!(translate_python_regex(r"\ud800").unwrap_err().contains("surrogate"));
        assert!(compile_fullmatch("target_modules", "a{1000000}").is_err());
    }

    #[test]
    fn fuzzed_patterns_and_keys_never_panic() {
        struct Rng(u64, Vec<char>);
        impl Rng {
            fn next(&mut self) -> u64 {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0
            }
            fn string(&mut self, len: usize) -> String {
                let n = (self.next() as usize) % (len + 1);
                (0..n)
                    .map(|_| {
                        let k = (self.next() as usize) % self.1.len();
                        self.1[k]
                    })
                    .collect()
            }
        }
        let mut rng = Rng(
            0x2545f4914f6cdd1d,
            "ab.01()[]{}|*+?^$\\-,:<>=!#PiLmsxuZAdDwWbBnNx\u{663}\u{e9}\u{1f600}_ \n".chars().collect(),
        );
        let mut random = |len: usize| rng.string(len);
        let keys: Vec<String> = (0..20).map(|_| random(16)).chain(llama_keys()).collect();
        for _ in 0..3000 {
            let pat = random(10);
            let _ = translate_python_regex(&pat);
            let frag = vec![random(6)];
            let lp = LayersPattern::One(random(6));
            let c = PveraConfig {
                target_modules: Some(if random(1).is_empty() {
                    TargetModules::Regex(pat.clone())
                } else {
                    TargetModules::List(vec![random(5), random(5)])
                }),
                modules_to_save: Some(frag.clone()),
                layers_to_transform: Some(LayersToTransform::Many(vec![0, 1])),
                layers_pattern: Some(lp.clone()),
                ..Default::default()
            };
            let _ = c.validate();
            let m = TargetMatcher::new(&c);
            for key in &keys {
                if let Ok(m) = &m {
                    let _ = m.matches(key);
                }
                let _ = excluded_by_modules_to_save(key, &frag);
                let _ = layer_index(key, Some(&lp));
                let _ = layer_index(key, None);
            }
            let count = random(25).chars().count();
            let names: Vec<String> = (0..count).map(|_| random(8)).collect();
            let others: Vec<String> = (0..5).map(|_| random(8)).collect();
            let _ = find_minimal_target_modules(&names, &others);
            let _ = compress_target_names(&names);
            let _ = maybe_compress_target_names(&names, &others);
        }
    }
}
