//! `PveraConfig`: the adapter configuration of a PVeRA or a VeRA adapter, read from and written to
//! `adapter_config.json` exactly as Hugging Face PEFT 0.21.2 does (`PveraConfig` / `VeraConfig`).
//!
//! # One type, two methods
//!
//! PEFT's `VeraConfig` is `PveraConfig` without the two sampling fields (`sample_at_inference`,
//! `generator_seed`) and with `vera_dropout` for `pvera_dropout`; every other field, default and
//! check is the same. So one type holds both, told apart by [`PveraConfig::method`] (read from
//! `peft_type`: `"PVERA"` or `"VERA"`, [`Method`]). A VeRA config is written without the sampling
//! fields, and refuses them in [`PveraConfig::validate`] (VeRA has no latent to sample).
//!
//! # File format
//!
//! PEFT writes the config with `json.dumps(asdict(config), indent=2, sort_keys=True)` (`peft/config.py`):
//! two-space indentation, keys sorted at every level, non-ASCII characters escaped as `\uXXXX`, floats
//! in Python's `repr` form (`0.1`, `1e-05`, `1e+16`, `NaN`, `Infinity`), no trailing newline.
//! [`PveraConfig::to_json_string`] reproduces that byte for byte, and the loader accepts everything
//! Python's `json` module accepts in such a file (including `NaN`/`Infinity` and integers beyond 64 bits,
//! which PEFT writes for e.g. `d_initial=float("inf")` or `projection_prng_key=2**64`).
//!
//! # Differences from PEFT, on purpose
//!
//! * Types are checked when loading (`"r": "4"` is an error naming the field and the fix); PEFT accepts
//!   anything and fails later, deep inside torch.
//! * Unknown keys are kept in [`PveraConfig::extra`] and written back; PEFT drops them with a warning.
//! * `target_modules` lists keep the order in which they were read (duplicates removed); PEFT stores a
//!   `set` and writes it in hash order. Matching treats the list as a set, as PEFT does.
//!
//! Warnings are reported through [`tracing`]; the library never prints.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::pyjson::{self, PyInt, PyJson};
use crate::pyregex;

/// The PEFT version whose behaviour and file format this module reproduces. New configs are stamped
/// with it in `peft_version`, as PEFT 0.21.2 stamps its own version.
pub const PEFT_VERSION: &str = "0.21.2";

pub use crate::method::{Method, PEFT_TYPE, VERA_PEFT_TYPE};

/// File name of the config inside an adapter directory (PEFT's `CONFIG_NAME`).
pub const CONFIG_NAME: &str = "adapter_config.json";

/// The task types PEFT 0.21.2 accepts in `task_type` (`peft.utils.TaskType`), in PEFT's order.
pub const TASK_TYPES: [&str; 6] =
    ["SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION"];

/// PEFT's shorthand for "every linear / Conv1D layer" (`INCLUDE_LINEAR_LAYERS_SHORTHAND`).
pub const ALL_LINEAR: &str = "all-linear";

/// Warning PEFT 0.21.2 emits when a config has `save_projection=False` (`PveraConfig.__post_init__`).
pub const SAVE_PROJECTION_WARNING: &str = "Specified to not save pvera_A and pvera_B within the state dictionary, \
instead they will be restored using the PRNG key store in `config.projection_prng_key`. Consider setting \
`config.save_projection` to `True` to guarantee restoring the checkpoint correctly on all system configurations.";

/// The same warning from `VeraConfig.__post_init__`.
pub const VERA_SAVE_PROJECTION_WARNING: &str = "Specified to not save vera_A and vera_B within the state dictionary, \
instead they will be restored using the PRNG key store in `config.projection_prng_key`. Consider setting \
`config.save_projection` to `True` to guarantee restoring the checkpoint correctly on all system configurations.";

/// PEFT's error text when `layers_pattern` is given without `layers_to_transform` (trailing space included).
pub const LAYERS_PATTERN_WITHOUT_LAYERS_MESSAGE: &str =
    "When `layers_pattern` is specified, `layers_to_transform` must also be specified. ";

/// Smallest value `torch.Generator.manual_seed` accepts (`-2^63`).
pub const MANUAL_SEED_MIN: i128 = -(1i128 << 63);
/// One past the largest value `torch.Generator.manual_seed` accepts (`2^64`).
pub const MANUAL_SEED_END: i128 = 1i128 << 64;

/// Field names PEFT 0.21.2 writes for a `VeraConfig`: [`KNOWN_KEYS`] without `generator_seed` and
/// `sample_at_inference`, with `vera_dropout` for `pvera_dropout`.
pub const VERA_KNOWN_KEYS: [&str; 19] = [
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "d_initial",
    "fan_in_fan_out",
    "inference_mode",
    "init_weights",
    "layers_pattern",
    "layers_to_transform",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "projection_prng_key",
    "r",
    "revision",
    "save_projection",
    "target_modules",
    "task_type",
    "vera_dropout",
];

/// Field names PEFT 0.21.2 writes for a `PveraConfig` (the dataclass fields, `peft_type` included).
pub const KNOWN_KEYS: [&str; 21] = [
    "auto_mapping",
    "base_model_name_or_path",
    "bias",
    "d_initial",
    "fan_in_fan_out",
    "generator_seed",
    "inference_mode",
    "init_weights",
    "layers_pattern",
    "layers_to_transform",
    "modules_to_save",
    "peft_type",
    "peft_version",
    "projection_prng_key",
    "pvera_dropout",
    "r",
    "revision",
    "sample_at_inference",
    "save_projection",
    "target_modules",
    "task_type",
];

// =================================================================================================
// Field types
// =================================================================================================

/// `target_modules`: which modules get a PVeRA layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    /// Module names, matched exactly or as a `"."`-separated suffix of the module path. PEFT stores a
    /// `set`; this keeps the order in which the names were read (or given) and has no duplicates when
    /// built by [`TargetModules::list`] or read from a file.
    List(Vec<String>),
    /// A Python regular expression that must match the **whole** module path (`re.fullmatch`).
    Regex(String),
    /// `"all-linear"` (case-insensitive on read, written back as `"all-linear"`): every `nn.Linear` /
    /// `Conv1D` except the output embedding (or, for `SEQ_CLS`, the classifier head). PEFT replaces it
    /// with the full module names before matching; see [`crate::targets::expand_all_linear`].
    AllLinear,
}

impl TargetModules {
    /// A name list with duplicates removed (first occurrence kept), as PEFT's `set(...)` does.
    pub fn list<I, S>(names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut out: Vec<String> = Vec::new();
        for name in names {
            let name = name.into();
            if !out.contains(&name) {
                out.push(name);
            }
        }
        TargetModules::List(out)
    }

    /// How PEFT reads a string value: `"all-linear"` in any case is [`TargetModules::AllLinear`],
    /// anything else a regex.
    pub fn from_str_value(s: &str) -> Self {
        if s.to_lowercase() == ALL_LINEAR {
            TargetModules::AllLinear
        } else {
            TargetModules::Regex(s.to_string())
        }
    }

    /// The names, if this is a list.
    pub fn as_list(&self) -> Option<&[String]> {
        match self {
            TargetModules::List(v) => Some(v),
            _ => None,
        }
    }
}

/// `bias`: which biases are trained (and saved).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Bias {
    /// `"none"`: no bias is trained.
    #[default]
    None,
    /// `"all"`: every `*.bias` of the model is trained.
    All,
    /// Any `"*_only"` value (`"pvera_only"`, `"lora_only"`, ...): the base-layer bias of every PVeRA
    /// layer is trained. PEFT accepts any prefix; the spelling is kept for round trips.
    Only(String),
}

impl Bias {
    /// Parses PEFT's spelling. Anything else is an [`Error::InvalidConfig`] naming the value and the
    /// accepted ones (PEFT itself only fails at injection: `Requested bias: {bias}, is not implemented.`).
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "none" => Ok(Bias::None),
            "all" => Ok(Bias::All),
            s if s.ends_with("_only") => Ok(Bias::Only(s.to_string())),
            s => Err(Error::config(
                "bias",
                format!(
                    "got {s:?}; accepted values are \"none\", \"all\" and any \"<method>_only\" such as \
                     \"pvera_only\" (PEFT fails at injection with \"Requested bias: {s}, is not implemented.\")"
                ),
            )),
        }
    }

    /// The spelling written to the file.
    pub fn as_str(&self) -> &str {
        match self {
            Bias::None => "none",
            Bias::All => "all",
            Bias::Only(s) => s,
        }
    }
}

impl fmt::Display for Bias {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `layers_to_transform`: the layer indices that get adapters (list targets only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayersToTransform {
    /// A single index: only that layer.
    One(i64),
    /// A list of indices. An **empty** list means "no layer filter" in PEFT.
    Many(Vec<i64>),
}

impl LayersToTransform {
    /// Whether the layer `idx` is selected (`==` for a single index, membership for a list).
    pub fn contains(&self, idx: i64) -> bool {
        match self {
            LayersToTransform::One(i) => *i == idx,
            LayersToTransform::Many(v) => v.contains(&idx),
        }
    }

    /// Whether PEFT applies a layer filter at all: a single index or a non-empty list.
    pub fn is_filter(&self) -> bool {
        match self {
            LayersToTransform::One(_) => true,
            LayersToTransform::Many(v) => !v.is_empty(),
        }
    }
}

/// `layers_pattern`: the name(s) of the `nn.ModuleList` holding the layers (`"layers"`, `"h"`, ...).
/// Each entry is a Python regex fragment inserted into `(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayersPattern {
    /// One pattern.
    One(String),
    /// Several patterns, tried in order; the first one that matches decides.
    Many(Vec<String>),
}

impl LayersPattern {
    /// The patterns in order.
    pub fn patterns(&self) -> Vec<&str> {
        match self {
            LayersPattern::One(s) => vec![s.as_str()],
            LayersPattern::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }

    /// PEFT's `len(layers_pattern) == 0`: `""` or `[]`, which means "use the default index regex".
    pub fn is_empty(&self) -> bool {
        match self {
            LayersPattern::One(s) => s.is_empty(),
            LayersPattern::Many(v) => v.is_empty(),
        }
    }
}

/// `sample_at_inference`: whether layers sample `z = mu + eps * std` outside training.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SampleAtInference {
    /// The documented form: one flag for every layer.
    All(bool),
    /// A dict keyed by module name (the pre-#3563 form). Meaning here: a key selects a module whose path
    /// equals it or ends with `"." + key` (the list-target rule); an exact key wins over suffix keys,
    /// a longer suffix over a shorter one; a module no key selects does not sample.
    ///
    /// **PEFT 0.21.2 does not implement this**: it only takes the dict's truthiness, so `{}` never
    /// samples and any non-empty dict samples in **every** layer (docs/peft-behaviour.md §4). See
    /// [`SampleAtInference::peft_reads_as`] and [`PveraConfig::save_warnings`].
    PerModule(BTreeMap<String, bool>),
}

impl Default for SampleAtInference {
    fn default() -> Self {
        SampleAtInference::All(false)
    }
}

impl SampleAtInference {
    /// Whether the module at `path` samples at inference, under the documented meaning above.
    pub fn for_module(&self, path: &str) -> bool {
        match self {
            SampleAtInference::All(b) => *b,
            SampleAtInference::PerModule(map) => {
                if let Some(v) = map.get(path) {
                    return *v;
                }
                map.iter()
                    .filter(|(k, _)| {
                        path.len() > k.len()
                            && path.ends_with(k.as_str())
                            && path.as_bytes()[path.len() - k.len() - 1] == b'.'
                    })
                    .max_by_key(|(k, _)| k.len())
                    .map(|(_, v)| *v)
                    .unwrap_or(false)
            }
        }
    }

    /// What PEFT 0.21.2 does with this value in every layer: Python truthiness (`bool(value)`), so a
    /// non-empty dict means `true` everywhere and `{}` means `false`.
    pub fn peft_reads_as(&self) -> bool {
        match self {
            SampleAtInference::All(b) => *b,
            SampleAtInference::PerModule(map) => !map.is_empty(),
        }
    }
}

// =================================================================================================
// PveraConfig
// =================================================================================================

/// The adapter configuration: `peft.PveraConfig` or `peft.VeraConfig` of PEFT 0.21.2 (with
/// `PeftConfig`'s fields), by [`PveraConfig::method`]. `PveraConfig::default()` is PEFT's
/// `PveraConfig()`; [`PveraConfig::for_method`] gives `VeraConfig()`.
#[derive(Debug, Clone, PartialEq)]
pub struct PveraConfig {
    /// PVeRA or VeRA (`peft_type`). Default PVeRA.
    pub method: Method,
    /// Rank `r`: `A` is `[2r, IN]` (VeRA: `[r, IN]`), `B` is `[OUT, r]`, `λ_d` has `2r` (VeRA: `r`)
    /// entries. Default 256.
    pub r: i64,
    /// Which modules to adapt; `None` means "use the model type's defaults"
    /// ([`crate::targets::default_target_modules`]).
    pub target_modules: Option<TargetModules>,
    /// Seed of the generator that draws `A` then `B` (`torch.Generator().manual_seed(key)`). Default 0.
    /// Python accepts any integer; torch accepts `[-2^63, 2^64)` ([`PveraConfig::validate`] checks).
    pub projection_prng_key: i128,
    /// Whether `A` and `B` are saved in the checkpoint. Default `true`.
    pub save_projection: bool,
    /// Dropout probability on the adapter input (`pvera_dropout` / `vera_dropout`). Default 0.0.
    pub dropout: f64,
    /// Initial value of every entry of `λ_d`. Default 0.1.
    pub d_initial: f64,
    /// Whether weights are stored `(in, out)` (GPT-2 `Conv1D`). PEFT overwrites it per layer type.
    pub fan_in_fan_out: bool,
    /// Which biases are trained. Default `"none"`.
    pub bias: Bias,
    /// Modules (regex fragments, see [`crate::targets::excluded_by_modules_to_save`]) that are trained
    /// fully and saved; they are never adapted.
    pub modules_to_save: Option<Vec<String>>,
    /// `true`: `λ_b = 0`, `λ_d = d_initial`; `false`: `λ_b = 1`, `λ_d ~ N(0, 1)`. Default `true`.
    pub init_weights: bool,
    /// Layer filter for list targets.
    pub layers_to_transform: Option<LayersToTransform>,
    /// Name(s) of the layer list used to find the layer index.
    pub layers_pattern: Option<LayersPattern>,
    /// Whether to sample at inference. Default `false`. PVeRA only: a VeRA config has no such field
    /// (it must stay `false`).
    pub sample_at_inference: SampleAtInference,
    /// Seed of the per-layer sampling generator; `None` uses the global RNG. PVeRA only (`None` for
    /// VeRA).
    pub generator_seed: Option<i128>,
    /// `PeftConfig.base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// `PeftConfig.revision`.
    pub revision: Option<String>,
    /// `PeftConfig.task_type`; one of [`TASK_TYPES`] or `None`.
    pub task_type: Option<String>,
    /// `PeftConfig.inference_mode`. PEFT's `PeftModel.save_pretrained` always writes `true`
    /// (see [`PveraConfig::for_adapter_save`]).
    pub inference_mode: bool,
    /// `PeftConfigMixin.auto_mapping` (`{"base_model_class", "parent_library"}` when PEFT saves a model
    /// without `task_type`).
    pub auto_mapping: Option<serde_json::Value>,
    /// The PEFT version that wrote the file. New configs and files without one get [`PEFT_VERSION`]
    /// (PEFT fills in its own version the same way).
    pub peft_version: Option<String>,
    /// Keys PEFT 0.21.2 does not know. Kept and written back (PEFT drops them with a warning). Entries
    /// whose name is a known key are ignored when writing. Integers beyond 64 bits are stored as floats
    /// and non-finite floats as `null` here (a `serde_json` limit), with a warning when read.
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for PveraConfig {
    /// PEFT 0.21.2's `PveraConfig()`.
    fn default() -> Self {
        PveraConfig {
            method: Method::Pvera,
            r: 256,
            target_modules: None,
            projection_prng_key: 0,
            save_projection: true,
            dropout: 0.0,
            d_initial: 0.1,
            fan_in_fan_out: false,
            bias: Bias::None,
            modules_to_save: None,
            init_weights: true,
            layers_to_transform: None,
            layers_pattern: None,
            sample_at_inference: SampleAtInference::All(false),
            generator_seed: None,
            base_model_name_or_path: None,
            revision: None,
            task_type: None,
            inference_mode: false,
            auto_mapping: None,
            peft_version: Some(PEFT_VERSION.to_string()),
            extra: serde_json::Map::new(),
        }
    }
}

impl PveraConfig {
    /// PEFT's `PveraConfig()` or `VeraConfig()`: the defaults, which the two share.
    pub fn for_method(method: Method) -> Self {
        PveraConfig { method, ..PveraConfig::default() }
    }

    /// The field names PEFT writes for this config's method ([`KNOWN_KEYS`] / [`VERA_KNOWN_KEYS`]).
    pub fn known_keys(&self) -> &'static [&'static str] {
        match self.method {
            Method::Pvera => &KNOWN_KEYS,
            Method::Vera => &VERA_KNOWN_KEYS,
        }
    }

    /// The name of the dropout field in the file (`pvera_dropout` / `vera_dropout`).
    pub fn dropout_key(&self) -> &'static str {
        match self.method {
            Method::Pvera => "pvera_dropout",
            Method::Vera => "vera_dropout",
        }
    }

    /// PEFT's `save_projection=False` warning for this method.
    pub fn save_projection_warning(&self) -> &'static str {
        match self.method {
            Method::Pvera => SAVE_PROJECTION_WARNING,
            Method::Vera => VERA_SAVE_PROJECTION_WARNING,
        }
    }

    /// Parses the text of an `adapter_config.json`. `source` names the file in error messages.
    ///
    /// Accepts every file PEFT 0.21.2 writes. Missing keys take PEFT's defaults. Checks done here: JSON
    /// syntax (Python's `json` dialect), `peft_type` `"PVERA"` or `"VERA"` (required, as
    /// `PeftModel.from_pretrained` requires it; it sets [`PveraConfig::method`]), the type of every known field, `bias`, and the two checks PEFT makes when it
    /// constructs the config while loading (`task_type` and `layers_pattern` without
    /// `layers_to_transform`). Everything else is left to [`PveraConfig::validate`], since PEFT loads
    /// such files too (e.g. `r = 0` fails only at injection).
    ///
    /// Errors: [`Error::ConfigParse`] for syntax and type problems, [`Error::WrongPeftType`] for another
    /// method's config, [`Error::InvalidConfig`] for bad `bias`, `task_type` and `layers_pattern`.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let value = pyjson::parse(text).map_err(|reason| Error::ConfigParse { path: source.to_string(), reason })?;
        let entries = match value {
            PyJson::Dict(entries) => entries,
            other => {
                return Err(Error::ConfigParse {
                    path: source.to_string(),
                    reason: format!("expected a JSON object with the adapter settings, found {}", describe(&other)),
                })
            }
        };
        // `peft_type` first: another method's config is reported as such, not as a type error.
        let method = match entries.iter().find(|(k, _)| k == "peft_type").map(|(_, v)| v) {
            None => {
                return Err(Error::ConfigParse {
                    path: source.to_string(),
                    reason: "missing the required key `peft_type` (PEFT refuses such files too); a PVeRA \
                             adapter has \"peft_type\": \"PVERA\", a VeRA adapter \"peft_type\": \"VERA\""
                        .to_string(),
                })
            }
            Some(PyJson::Str(s)) => match Method::from_peft_type(s) {
                Some(m) => m,
                None => return Err(Error::WrongPeftType { path: source.to_string(), found: s.clone() }),
            },
            Some(other) => {
                return Err(Error::ConfigParse {
                    path: source.to_string(),
                    reason: format!(
                        "field `peft_type`: expected the string \"PVERA\" or \"VERA\", found {}",
                        describe(other)
                    ),
                })
            }
        };
        let in_file = |e: Error| match e {
            Error::InvalidConfig { field, reason } => {
                Error::InvalidConfig { field, reason: format!("{reason} (in {source})") }
            }
            other => other,
        };
        let cfg = Self::from_entries(entries, source, method).map_err(in_file)?;
        if let Some(tt) = &cfg.task_type {
            check_task_type(tt).map_err(in_file)?;
        }
        if layers_pattern_truthy(&cfg.layers_pattern) && cfg.layers_to_transform.is_none() {
            return Err(in_file(Error::config("layers_pattern", LAYERS_PATTERN_WITHOUT_LAYERS_MESSAGE)));
        }
        if !cfg.save_projection {
            tracing::warn!("{source}: {}", cfg.save_projection_warning());
        }
        if let SampleAtInference::PerModule(map) = &cfg.sample_at_inference {
            if !map.is_empty() {
                tracing::warn!("{source}: {}", sample_dict_warning(map));
            }
        }
        if !cfg.extra.is_empty() {
            tracing::warn!("{source}: {}", unknown_keys_warning(&cfg.extra, method));
        }
        Ok(cfg)
    }

    /// Reads and parses a config file (see [`PveraConfig::from_json_str`]).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let source = path.display().to_string();
        let text = String::from_utf8(bytes).map_err(|e| Error::ConfigParse {
            path: source.clone(),
            reason: format!(
                "not valid UTF-8 (invalid byte at offset {}); adapter_config.json must be UTF-8 text",
                e.utf8_error().valid_up_to()
            ),
        })?;
        Self::from_json_str(&text, &source)
    }

    /// Reads `dir/adapter_config.json` (PEFT's `PeftConfig.from_pretrained` on a local directory).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join(CONFIG_NAME))
    }

    /// Serialises exactly as PEFT 0.21.2 writes `adapter_config.json`:
    /// `json.dumps(config.to_dict(), indent=2, sort_keys=True)` with `peft_type` `"PVERA"` (or, for
    /// VeRA, `"VERA"`, `vera_dropout` and no sampling fields). Unknown keys from
    /// [`PveraConfig::extra`] are included (sorted with the rest).
    pub fn to_json_string(&self) -> String {
        let pvera = self.method == Method::Pvera;
        let mut entries: Vec<(String, PyJson)> = Vec::with_capacity(KNOWN_KEYS.len() + self.extra.len());
        let opt_str = |v: &Option<String>| v.as_ref().map_or(PyJson::Null, |s| PyJson::Str(s.clone()));
        let str_list = |v: &[String]| PyJson::List(v.iter().cloned().map(PyJson::Str).collect());
        let opt_int = |v: Option<i128>| v.map_or(PyJson::Null, |i| PyJson::Int(PyInt::Small(i)));

        entries.push(("auto_mapping".into(), self.auto_mapping.as_ref().map_or(PyJson::Null, PyJson::from_serde)));
        entries.push(("base_model_name_or_path".into(), opt_str(&self.base_model_name_or_path)));
        entries.push(("bias".into(), PyJson::Str(self.bias.as_str().to_string())));
        entries.push(("d_initial".into(), PyJson::Float(self.d_initial)));
        entries.push(("fan_in_fan_out".into(), PyJson::Bool(self.fan_in_fan_out)));
        if pvera {
            entries.push(("generator_seed".into(), opt_int(self.generator_seed)));
        }
        entries.push(("inference_mode".into(), PyJson::Bool(self.inference_mode)));
        entries.push(("init_weights".into(), PyJson::Bool(self.init_weights)));
        entries.push((
            "layers_pattern".into(),
            match &self.layers_pattern {
                None => PyJson::Null,
                Some(LayersPattern::One(s)) => PyJson::Str(s.clone()),
                Some(LayersPattern::Many(v)) => str_list(v),
            },
        ));
        entries.push((
            "layers_to_transform".into(),
            match &self.layers_to_transform {
                None => PyJson::Null,
                Some(LayersToTransform::One(i)) => PyJson::Int(PyInt::Small(*i as i128)),
                Some(LayersToTransform::Many(v)) => {
                    PyJson::List(v.iter().map(|i| PyJson::Int(PyInt::Small(*i as i128))).collect())
                }
            },
        ));
        entries.push(("modules_to_save".into(), self.modules_to_save.as_deref().map_or(PyJson::Null, str_list)));
        entries.push(("peft_type".into(), PyJson::Str(self.method.peft_type().into())));
        entries.push(("peft_version".into(), opt_str(&self.peft_version)));
        entries.push(("projection_prng_key".into(), PyJson::Int(PyInt::Small(self.projection_prng_key))));
        if pvera {
            entries.push(("pvera_dropout".into(), PyJson::Float(self.dropout)));
        }
        entries.push(("r".into(), PyJson::Int(PyInt::Small(self.r as i128))));
        entries.push(("revision".into(), opt_str(&self.revision)));
        if pvera {
            entries.push((
                "sample_at_inference".into(),
                match &self.sample_at_inference {
                    SampleAtInference::All(b) => PyJson::Bool(*b),
                    SampleAtInference::PerModule(m) => {
                        PyJson::Dict(m.iter().map(|(k, v)| (k.clone(), PyJson::Bool(*v))).collect())
                    }
                },
            ));
        }
        entries.push(("save_projection".into(), PyJson::Bool(self.save_projection)));
        entries.push((
            "target_modules".into(),
            match &self.target_modules {
                None => PyJson::Null,
                Some(TargetModules::List(v)) => str_list(v),
                Some(TargetModules::Regex(s)) => PyJson::Str(s.clone()),
                Some(TargetModules::AllLinear) => PyJson::Str(ALL_LINEAR.into()),
            },
        ));
        entries.push(("task_type".into(), opt_str(&self.task_type)));
        if !pvera {
            entries.push(("vera_dropout".into(), PyJson::Float(self.dropout)));
        }
        let known = self.known_keys();
        for (k, v) in &self.extra {
            if known.contains(&k.as_str()) {
                continue;
            }
            entries.push((k.clone(), PyJson::from_serde(v)));
        }
        let mut out = String::new();
        pyjson::write(&PyJson::Dict(entries), 0, &mut out);
        out
    }

    /// Writes `dir/adapter_config.json` (creating `dir`), like PEFT's `PeftConfig.save_pretrained`, and
    /// reports [`PveraConfig::save_warnings`] through `tracing`. It writes the config as it is; use
    /// [`PveraConfig::for_adapter_save`] first to get what `PeftModel.save_pretrained` writes.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        if dir.is_file() {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!("Provided path ({}) should be a directory, not a file", dir.display()),
                ),
            ));
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        for w in self.save_warnings() {
            tracing::warn!("{w}");
        }
        let path = dir.join(CONFIG_NAME);
        std::fs::write(&path, self.to_json_string()).map_err(|e| Error::io(&path, e))
    }

    /// The config as `PeftModel.save_pretrained` writes it: `inference_mode` is `true`, and when
    /// `task_type` is `None` the `auto_mapping` is replaced by `auto_mapping` (PEFT passes
    /// `{"base_model_class": <class name>, "parent_library": <module>}` there). With a `task_type`,
    /// the stored `auto_mapping` is kept, as in PEFT.
    pub fn for_adapter_save(&self, auto_mapping: Option<serde_json::Value>) -> Self {
        let mut c = self.clone();
        c.inference_mode = true;
        if c.task_type.is_none() {
            c.auto_mapping = auto_mapping;
        }
        c
    }

    /// Checks everything that would make PEFT (or torch) fail or misbehave later, with PEFT's message
    /// where PEFT has one. Returns the first problem found:
    ///
    /// * `r <= 0` (PEFT's `update_layer` text);
    /// * `layers_pattern` (non-empty) without `layers_to_transform` (PEFT's `__post_init__` text);
    /// * `pvera_dropout` outside `[0, 1)` or NaN (PEFT silently uses no dropout for `p <= 0` and NaN,
    ///   torch drops everything for `p == 1` and raises for `p > 1`);
    /// * non-finite `d_initial`;
    /// * `projection_prng_key` / `generator_seed` outside `[-2^63, 2^64)` (torch's `manual_seed` fails
    ///   with "Overflow when unpacking long long");
    /// * an empty `target_modules` list, an invalid or unsupported target regex, and invalid
    ///   `modules_to_save` / `layers_pattern` fragments (when PEFT would use them);
    /// * a `bias` that is not `none`, `all` or `*_only`;
    /// * a `task_type` PEFT does not know.
    pub fn validate(&self) -> Result<()> {
        if self.r <= 0 {
            return Err(Error::config(
                "r",
                format!("`r` should be a positive integer value but the value passed is {}", self.r),
            ));
        }
        if layers_pattern_truthy(&self.layers_pattern) && self.layers_to_transform.is_none() {
            return Err(Error::config("layers_pattern", LAYERS_PATTERN_WITHOUT_LAYERS_MESSAGE));
        }
        let p = self.dropout;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::config(
                self.dropout_key(),
                format!(
                    "must be in [0, 1), got {}; PEFT uses no dropout for values <= 0 or NaN, drops \
                     everything at 1 and fails for values above 1 (\"dropout probability has to be \
                     between 0 and 1\")",
                    pyjson::float_repr(p)
                ),
            ));
        }
        if !self.d_initial.is_finite() {
            return Err(Error::config(
                "d_initial",
                format!(
                    "must be a finite number, got {}; it fills every entry of {}_lambda_d",
                    pyjson::float_repr(self.d_initial),
                    self.method.stem()
                ),
            ));
        }
        if !self.method.samples() {
            // VeRA has no latent: the sampling fields do not exist in PEFT's VeraConfig.
            if self.sample_at_inference != SampleAtInference::All(false) {
                return Err(Error::config(
                    "sample_at_inference",
                    "is set on a VeRA adapter, which has no latent to sample (VeraConfig has no such field); \
                     leave it false, or train a PVeRA adapter (peft_type \"PVERA\") to sample at inference",
                ));
            }
            if self.generator_seed.is_some() {
                return Err(Error::config(
                    "generator_seed",
                    "is set on a VeRA adapter, which draws no noise (VeraConfig has no such field); leave it \
                     null, or use a PVeRA adapter (peft_type \"PVERA\")",
                ));
            }
        }
        check_seed("projection_prng_key", self.projection_prng_key)?;
        if let Some(seed) = self.generator_seed {
            check_seed("generator_seed", seed)?;
        }
        if let Bias::Only(s) = &self.bias {
            if !s.ends_with("_only") {
                Bias::parse(s)?;
            }
        }
        if let Some(tt) = &self.task_type {
            check_task_type(tt)?;
        }
        if let Some(TargetModules::List(v)) = &self.target_modules {
            if v.is_empty() {
                return Err(Error::config(
                    "target_modules",
                    format!(
                        "is an empty list, so no module would be adapted (PEFT fails with \"No layers types \
                         compatible with {} were found\"); list module names, or leave it null to use the \
                         model type's defaults",
                        self.method.name()
                    ),
                ));
            }
        }
        self.check_patterns()
    }

    /// Compiles every regex PEFT would compile for this config: a string target, each
    /// `modules_to_save` entry, and the `layers_pattern` entries when a list target is filtered by
    /// layer (the same rules [`crate::targets::TargetMatcher`] applies).
    fn check_patterns(&self) -> Result<()> {
        for m in self.modules_to_save.iter().flatten() {
            pyregex::modules_to_save_regex(m)?;
        }
        match &self.target_modules {
            Some(TargetModules::Regex(s)) => {
                pyregex::compile_fullmatch("target_modules", s)?;
            }
            Some(TargetModules::AllLinear) => {}
            Some(TargetModules::List(_)) | None => {
                if self.layers_to_transform.as_ref().is_some_and(LayersToTransform::is_filter) {
                    for p in self.layers_pattern.iter().filter(|lp| !lp.is_empty()).flat_map(LayersPattern::patterns) {
                        pyregex::layers_pattern_regex(p)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// `projection_prng_key` as the `u64` seed torch uses: negative keys wrap modulo 2^64, as
    /// `torch.Generator.manual_seed` does (`-1` is `2^64 - 1`). Out-of-range keys (rejected by
    /// [`PveraConfig::validate`]) are also reduced modulo 2^64.
    pub fn projection_seed(&self) -> u64 {
        self.projection_prng_key as u64
    }

    /// `generator_seed` as torch's `u64` seed (negatives wrap modulo 2^64), or `None`.
    pub fn generator_seed_u64(&self) -> Option<u64> {
        self.generator_seed.map(|s| s as u64)
    }

    /// Warnings for saving this config, each saying what PEFT 0.21.2 will do with it:
    ///
    /// * `save_projection = false`: PEFT's own warning text ([`SAVE_PROJECTION_WARNING`]);
    /// * a non-empty `sample_at_inference` dict: PEFT samples in every layer;
    /// * unknown keys in [`PveraConfig::extra`]: PEFT drops them when loading.
    pub fn save_warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.save_projection {
            out.push(self.save_projection_warning().to_string());
        }
        if let SampleAtInference::PerModule(map) = &self.sample_at_inference {
            if !map.is_empty() && self.method.samples() {
                out.push(sample_dict_warning(map));
            }
        }
        let known = self.known_keys();
        let unknown: serde_json::Map<String, serde_json::Value> = self
            .extra
            .iter()
            .filter(|(k, _)| !known.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if !unknown.is_empty() {
            out.push(unknown_keys_warning(&unknown, self.method));
        }
        out
    }

    fn from_entries(entries: Vec<(String, PyJson)>, source: &str, method: Method) -> Result<Self> {
        let mut cfg = PveraConfig::for_method(method);
        let known = cfg.known_keys();
        let err = |field: &str, reason: String| Error::ConfigParse {
            path: source.to_string(),
            reason: format!("field `{field}`: {reason}"),
        };
        for (key, value) in entries {
            let k = key.as_str();
            if !known.contains(&k) {
                // Unknown to this method's config class (a VeRA file's `sample_at_inference` too).
                let v = value.to_serde(&format!("{source}: unknown key `{key}`"));
                cfg.extra.insert(key, v);
                continue;
            }
            match k {
                "peft_type" => {} // checked by from_json_str
                "r" => cfg.r = get_i64(k, &value).map_err(|r| err(k, r))?,
                "target_modules" => {
                    cfg.target_modules = match &value {
                        PyJson::Null => None,
                        PyJson::Str(s) => Some(TargetModules::from_str_value(s)),
                        PyJson::List(_) => Some(TargetModules::list(get_str_list(k, &value).map_err(|r| err(k, r))?)),
                        other => {
                            return Err(err(
                                k,
                                format!(
                                    "expected a list of module names, a regex string or null, found {}; \
                                     e.g. \"target_modules\": [\"q_proj\", \"v_proj\"]",
                                    describe(other)
                                ),
                            ))
                        }
                    }
                }
                "projection_prng_key" => cfg.projection_prng_key = get_i128(k, &value).map_err(|r| err(k, r))?,
                "save_projection" => cfg.save_projection = get_bool(k, &value).map_err(|r| err(k, r))?,
                "pvera_dropout" | "vera_dropout" => cfg.dropout = get_f64(k, &value).map_err(|r| err(k, r))?,
                "d_initial" => cfg.d_initial = get_f64(k, &value).map_err(|r| err(k, r))?,
                "fan_in_fan_out" => cfg.fan_in_fan_out = get_bool(k, &value).map_err(|r| err(k, r))?,
                "bias" => match &value {
                    PyJson::Str(s) => cfg.bias = Bias::parse(s)?,
                    other => {
                        return Err(err(
                            k,
                            format!(
                                "expected one of the strings \"none\", \"all\", \"pvera_only\", found {}",
                                describe(other)
                            ),
                        ))
                    }
                },
                "modules_to_save" => {
                    cfg.modules_to_save = match &value {
                        PyJson::Null => None,
                        _ => Some(get_str_list(k, &value).map_err(|r| err(k, r))?),
                    }
                }
                "init_weights" => cfg.init_weights = get_bool(k, &value).map_err(|r| err(k, r))?,
                "layers_to_transform" => {
                    cfg.layers_to_transform = match &value {
                        PyJson::Null => None,
                        PyJson::List(items) => Some(LayersToTransform::Many(
                            items
                                .iter()
                                .map(|v| get_i64(k, v))
                                .collect::<std::result::Result<Vec<_>, _>>()
                                .map_err(|r| err(k, format!("{r} (in the list)")))?,
                        )),
                        v @ PyJson::Int(_) => Some(LayersToTransform::One(get_i64(k, v).map_err(|r| err(k, r))?)),
                        other => {
                            return Err(err(
                                k,
                                format!(
                                    "expected a layer index, a list of layer indices or null, found {}; \
                                     e.g. \"layers_to_transform\": [0, 1]",
                                    describe(other)
                                ),
                            ))
                        }
                    }
                }
                "layers_pattern" => {
                    cfg.layers_pattern = match &value {
                        PyJson::Null => None,
                        PyJson::Str(s) => Some(LayersPattern::One(s.clone())),
                        PyJson::List(_) => Some(LayersPattern::Many(get_str_list(k, &value).map_err(|r| err(k, r))?)),
                        other => {
                            return Err(err(
                                k,
                                format!(
                                    "expected a string, a list of strings or null, found {}; \
                                     e.g. \"layers_pattern\": \"layers\"",
                                    describe(other)
                                ),
                            ))
                        }
                    }
                }
                "sample_at_inference" => {
                    cfg.sample_at_inference = match &value {
                        PyJson::Bool(b) => SampleAtInference::All(*b),
                        PyJson::Dict(items) => {
                            let mut map = BTreeMap::new();
                            for (name, v) in items {
                                match v {
                                    PyJson::Bool(b) => {
                                        map.insert(name.clone(), *b);
                                    }
                                    other => {
                                        return Err(err(
                                            k,
                                            format!("entry {name:?} must be true or false, found {}", describe(other)),
                                        ))
                                    }
                                }
                            }
                            SampleAtInference::PerModule(map)
                        }
                        other => {
                            return Err(err(
                                k,
                                format!("expected true or false, found {}; e.g. \"{k}\": false", describe(other)),
                            ))
                        }
                    }
                }
                "generator_seed" => {
                    cfg.generator_seed = match &value {
                        PyJson::Null => None,
                        v => Some(get_i128(k, v).map_err(|r| err(k, r))?),
                    }
                }
                "base_model_name_or_path" => {
                    cfg.base_model_name_or_path = get_opt_str(k, &value).map_err(|r| err(k, r))?
                }
                "revision" => cfg.revision = get_opt_str(k, &value).map_err(|r| err(k, r))?,
                "task_type" => cfg.task_type = get_opt_str(k, &value).map_err(|r| err(k, r))?,
                "inference_mode" => cfg.inference_mode = get_bool(k, &value).map_err(|r| err(k, r))?,
                "auto_mapping" => {
                    cfg.auto_mapping = match &value {
                        PyJson::Null => None,
                        v => Some(v.to_serde(&format!("{source}: `auto_mapping`"))),
                    }
                }
                "peft_version" => {
                    // PEFT fills in its own version when the value is null.
                    cfg.peft_version = Some(
                        get_opt_str(k, &value).map_err(|r| err(k, r))?.unwrap_or_else(|| PEFT_VERSION.to_string()),
                    );
                }
                _ => {
                    let v = value.to_serde(&format!("{source}: unknown key `{key}`"));
                    cfg.extra.insert(key, v);
                }
            }
        }
        Ok(cfg)
    }
}

fn layers_pattern_truthy(lp: &Option<LayersPattern>) -> bool {
    lp.as_ref().is_some_and(|p| !p.is_empty())
}

fn check_task_type(tt: &str) -> Result<()> {
    if TASK_TYPES.contains(&tt) {
        Ok(())
    } else {
        Err(Error::config(
            "task_type",
            format!("Invalid task type: '{tt}'. Must be one of the following task types: {}.", TASK_TYPES.join(", ")),
        ))
    }
}

fn check_seed(field: &str, value: i128) -> Result<()> {
    if (MANUAL_SEED_MIN..MANUAL_SEED_END).contains(&value) {
        Ok(())
    } else {
        Err(Error::config(
            field,
            format!(
                "{value} is outside [-2^63, 2^64), the range torch.Generator.manual_seed accepts (PEFT \
                 fails with \"ValueError: Overflow when unpacking long long\"); use a value in \
                 [-9223372036854775808, 18446744073709551615]"
            ),
        ))
    }
}

fn sample_dict_warning(map: &BTreeMap<String, bool>) -> String {
    let shown = map.iter().map(|(k, v)| format!("{k:?}: {v}")).collect::<Vec<_>>().join(", ");
    if map.is_empty() {
        "`sample_at_inference` is an empty dict; PEFT 0.21.2 reads it as false (no layer samples at \
         inference), which is also what it means here"
            .to_string()
    } else {
        format!(
            "`sample_at_inference` is a per-module dict {{{shown}}}, which PEFT 0.21.2 does not support: \
             it only checks the dict's truthiness, so when PEFT loads this adapter EVERY PVeRA layer samples \
             at inference (including modules mapped to false and modules not listed). Use a single \
             true/false for PEFT compatibility"
        )
    }
}

fn unknown_keys_warning(extra: &serde_json::Map<String, serde_json::Value>, method: Method) -> String {
    let class = match method {
        Method::Pvera => "PveraConfig",
        Method::Vera => "VeraConfig",
    };
    let mut keys: Vec<&str> = extra.keys().map(String::as_str).collect();
    keys.sort_unstable();
    let list = keys.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ");
    format!(
        "keys unknown to PEFT 0.21.2's {class} are kept: [{list}]. PEFT drops them when loading, with \
         \"Unexpected keyword arguments [{list}] for class {class}, these are ignored. This probably means \
         that you're loading a configuration file that was saved using a higher version of the library and \
         additional parameters have been introduced since. It is highly recommended to upgrade the PEFT \
         version before continuing (e.g. by running `pip install -U peft`).\""
    )
}

// ---- field extraction ---------------------------------------------------------------------------

fn describe(v: &PyJson) -> String {
    match v {
        PyJson::Null => "null".into(),
        PyJson::Bool(b) => format!("the boolean {b}"),
        PyJson::Int(i) => format!("the integer {}", i.text()),
        PyJson::Float(f) => format!("the number {}", pyjson::float_repr(*f)),
        PyJson::Str(s) => {
            let shown: String = s.chars().take(80).collect();
            let more = if s.chars().count() > 80 { "..." } else { "" };
            format!("the string {shown:?}{more}")
        }
        PyJson::List(_) => "a list".into(),
        PyJson::Dict(_) => "an object".into(),
    }
}

fn int_hint(field: &str, v: &PyJson) -> String {
    match v {
        PyJson::Str(s) if s.trim().parse::<i128>().is_ok() => {
            format!("; write the number without quotes: \"{field}\": {}", s.trim())
        }
        PyJson::Float(f) if f.is_finite() && f.fract() == 0.0 && f.abs() < 1e30 => {
            format!("; write it as an integer: \"{field}\": {}", *f as i128)
        }
        _ => String::new(),
    }
}

fn get_i128(field: &str, v: &PyJson) -> std::result::Result<i128, String> {
    match v {
        PyJson::Int(PyInt::Small(i)) => Ok(*i),
        PyJson::Int(PyInt::Big(s)) => Err(format!("the integer {s} is too large (it must fit in 128 bits)")),
        other => Err(format!("expected an integer, found {}{}", describe(other), int_hint(field, other))),
    }
}

fn get_i64(field: &str, v: &PyJson) -> std::result::Result<i64, String> {
    let i = get_i128(field, v)?;
    i64::try_from(i).map_err(|_| format!("the integer {i} is out of range (it must fit in a signed 64-bit integer)"))
}

fn get_f64(field: &str, v: &PyJson) -> std::result::Result<f64, String> {
    match v {
        PyJson::Float(f) => Ok(*f),
        PyJson::Int(PyInt::Small(i)) => Ok(*i as f64),
        PyJson::Int(PyInt::Big(s)) => Ok(s.parse::<f64>().unwrap_or(f64::INFINITY)),
        PyJson::Str(s) if s.trim().parse::<f64>().is_ok() => {
            Err(format!("expected a number, found {}; write it without quotes: \"{field}\": {}", describe(v), s.trim()))
        }
        other => Err(format!("expected a number, found {}", describe(other))),
    }
}

fn get_bool(field: &str, v: &PyJson) -> std::result::Result<bool, String> {
    match v {
        PyJson::Bool(b) => Ok(*b),
        PyJson::Str(s) if s.eq_ignore_ascii_case("true") || s.eq_ignore_ascii_case("false") => Err(format!(
            "expected true or false, found {}; write it without quotes: \"{field}\": {}",
            describe(v),
            s.to_lowercase()
        )),
        other => Err(format!("expected true or false, found {}", describe(other))),
    }
}

fn get_opt_str(_field: &str, v: &PyJson) -> std::result::Result<Option<String>, String> {
    match v {
        PyJson::Null => Ok(None),
        PyJson::Str(s) => Ok(Some(s.clone())),
        other => Err(format!("expected a string or null, found {}", describe(other))),
    }
}

fn get_str_list(field: &str, v: &PyJson) -> std::result::Result<Vec<String>, String> {
    match v {
        PyJson::List(items) => items
            .iter()
            .enumerate()
            .map(|(i, it)| match it {
                PyJson::Str(s) => Ok(s.clone()),
                other => Err(format!("entry {i} must be a string, found {}", describe(other))),
            })
            .collect(),
        PyJson::Str(s) => {
            Err(format!("expected a list of strings, found {}; write a list: \"{field}\": [{s:?}]", describe(v)))
        }
        other => Err(format!("expected a list of strings or null, found {}", describe(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/configs");

    fn fixture(name: &str) -> String {
        let path = format!("{FIXTURES}/{name}");
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// `{name: exact file text}` for every config PEFT 0.21.2 wrote in tools/make_config_fixtures.py.
    fn peft_written() -> Vec<(String, String)> {
        let v: Value = serde_json::from_str(&fixture("all_written_configs.json")).unwrap();
        assert_eq!(v["peft_version"], "0.21.2");
        v["files"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string())).collect()
    }

    fn written(name: &str) -> PveraConfig {
        let (_, text) = peft_written().into_iter().find(|(n, _)| n == name).unwrap();
        PveraConfig::from_json_str(&text, name).unwrap()
    }

    fn parse(text: &str) -> Result<PveraConfig> {
        PveraConfig::from_json_str(text, "test.json")
    }

    fn minimal(extra: &str) -> String {
        format!("{{\"peft_type\": \"PVERA\"{}{extra}}}", if extra.is_empty() { "" } else { ", " })
    }

    fn parse_err(text: &str) -> String {
        parse(text).expect_err("should fail").to_string()
    }

    #[test]
    fn defaults_are_peft_defaults_byte_for_byte() {
        let text = peft_written().into_iter().find(|(n, _)| n == "defaults").unwrap().1;
        assert_eq!(PveraConfig::default().to_json_string(), text);
        assert_eq!(PveraConfig::from_json_str(&text, "d").unwrap(), PveraConfig::default());
        // A file with only peft_type also gets PEFT's defaults.
        assert_eq!(parse(&minimal("")).unwrap(), PveraConfig::default());
    }

    #[test]
    fn every_peft_written_file_round_trips_byte_identically() {
        let files = peft_written();
        assert!(files.len() >= 30, "{}", files.len());
        for (name, text) in files {
            let cfg = PveraConfig::from_json_str(&text, &name).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(cfg.to_json_string(), text, "{name}");
            // and again from our own output
            let again = PveraConfig::from_json_str(&cfg.to_json_string(), &name).unwrap();
            assert_eq!(again.to_json_string(), text, "{name}");
        }
    }

    #[test]
    fn committed_fixture_files_round_trip() {
        for name in ["peft_model_mlp", "layers_list_pattern_list", "task_seq_cls", "key_above_i64", "unicode_name"] {
            let path = std::path::PathBuf::from(format!("{FIXTURES}/{name}.json"));
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg = PveraConfig::from_file(&path).unwrap();
            assert_eq!(cfg.to_json_string(), text, "{name}");
        }
    }

    #[test]
    fn golden_peft_adapter_configs_round_trip() {
        // Every adapter_config.json PEFT wrote for the parity fixtures (tests/fixtures/peft/**).
        fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
            let Ok(entries) = std::fs::read_dir(dir) else { return };
            for e in entries.flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else if p.file_name().is_some_and(|n| n == CONFIG_NAME) {
                    out.push(p);
                }
            }
        }
        let mut files = Vec::new();
        walk(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/peft")), &mut files);
        assert!(files.len() >= 10, "{files:?}");
        for path in files {
            let text = std::fs::read_to_string(&path).unwrap();
            let cfg = PveraConfig::from_file(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(cfg.to_json_string(), text, "{}", path.display());
            cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        }
    }

    #[test]
    fn model_saved_file_values() {
        let cfg = PveraConfig::from_file(Path::new(&format!("{FIXTURES}/peft_model_mlp.json"))).unwrap();
        assert_eq!(cfg.r, 4);
        assert!(cfg.inference_mode);
        assert_eq!(cfg.target_modules, Some(TargetModules::List(vec!["lin0".into(), "lin3".into()])));
        assert_eq!(cfg.modules_to_save, Some(vec!["lin1".to_string()]));
        assert_eq!(
            cfg.auto_mapping,
            Some(serde_json::json!({"base_model_class": "MLP", "parent_library": "__main__"}))
        );
        assert_eq!(cfg.peft_version.as_deref(), Some("0.21.2"));
        assert!(cfg.validate().is_ok());
        // for_adapter_save reproduces what PeftModel.save_pretrained wrote
        let mut plain = cfg.clone();
        plain.inference_mode = false;
        plain.auto_mapping = None;
        let saved = plain.for_adapter_save(cfg.auto_mapping.clone());
        assert_eq!(saved.to_json_string(), fixture("peft_model_mlp.json"));
        // with a task type the auto mapping is left alone
        let seq = written("task_seq_cls").for_adapter_save(Some(serde_json::json!({"x": 1})));
        assert!(seq.inference_mode);
        assert_eq!(seq.auto_mapping, None);
    }

    #[test]
    fn field_values_read_from_peft_files() {
        let c = written("layers_list_pattern_list");
        assert_eq!(c.layers_to_transform, Some(LayersToTransform::Many(vec![0, 2])));
        assert_eq!(c.layers_pattern, Some(LayersPattern::Many(vec!["h".into(), "layers".into()])));
        let c = written("layers_int_pattern_str");
        assert_eq!(c.layers_to_transform, Some(LayersToTransform::One(1)));
        assert_eq!(c.layers_pattern, Some(LayersPattern::One("layers".into())));
        assert_eq!(written("layers_empty_list").layers_to_transform, Some(LayersToTransform::Many(vec![])));
        assert_eq!(written("regex_target").target_modules, Some(TargetModules::Regex(r".*\.(q|v)_proj".into())));
        assert_eq!(written("all_linear").target_modules, Some(TargetModules::AllLinear));
        assert_eq!(written("bias_all").bias, Bias::All);
        assert_eq!(written("bias_pvera_only").bias, Bias::Only("pvera_only".into()));
        assert_eq!(written("bias_lora_only").bias, Bias::Only("lora_only".into()));
        assert_eq!(written("task_seq_cls").task_type.as_deref(), Some("SEQ_CLS"));
        assert_eq!(written("generator_seed").generator_seed, Some(1234));
        assert_eq!(written("generator_seed").sample_at_inference, SampleAtInference::All(true));
        assert_eq!(written("generator_seed_negative").generator_seed_u64(), Some(u64::MAX - 4));
        assert_eq!(written("key_negative").projection_seed(), u64::MAX);
        assert_eq!(written("key_min").projection_prng_key, -(1i128 << 63));
        assert_eq!(written("key_min").projection_seed(), 1u64 << 63);
        assert_eq!(written("key_above_i64").projection_prng_key, (1i128 << 63) + 5);
        assert_eq!(written("key_above_i64").projection_seed(), (1u64 << 63) + 5);
        assert_eq!(written("key_max").projection_seed(), u64::MAX);
        assert!(!written("no_save_projection").save_projection);
        let f = written("floats");
        assert_eq!((f.dropout, f.d_initial), (0.05, 1e-5));
        let f = written("floats_odd");
        assert_eq!((f.dropout, f.d_initial), (1.0 / 3.0, 1e16));
        assert!(written("d_initial_nan").d_initial.is_nan());
        assert_eq!(written("d_initial_inf").d_initial, f64::INFINITY);
        let c = written("fan_in_fan_out_no_init");
        assert!(c.fan_in_fan_out && !c.init_weights);
        let c = written("base_model_revision");
        assert_eq!(c.base_model_name_or_path.as_deref(), Some("meta-llama/Llama-3.2-1B"));
        assert_eq!(c.revision.as_deref(), Some("main"));
        assert!(c.inference_mode);
        assert_eq!(
            written("unicode_name").base_model_name_or_path.as_deref(),
            Some("modèle/模型-\u{1f600}\"q\"\\\t\u{7f}")
        );
        assert_eq!(written("many_targets").target_modules.unwrap().as_list().unwrap().len(), 21);
        let s = written("sample_dict").sample_at_inference;
        assert_eq!(s, SampleAtInference::PerModule([("lin1".to_string(), false)].into_iter().collect()));
        for (name, _) in peft_written() {
            let c = written(&name);
            let expect_ok = !matches!(name.as_str(), "d_initial_inf" | "d_initial_nan");
            assert_eq!(c.validate().is_ok(), expect_ok, "{name}: {:?}", c.validate());
        }
    }

    #[test]
    fn unknown_keys_survive_a_round_trip_sorted_in_place() {
        let text =
            minimal(r#""zzz_future": {"b": [1, 2.5, null], "a": "x"}, "alpha_new": 3, "runtime_config": {}, "r": 8"#);
        let cfg = parse(&text).unwrap();
        assert_eq!(cfg.r, 8);
        assert_eq!(cfg.extra.len(), 3);
        let out = cfg.to_json_string();
        assert!(out.starts_with("{\n  \"alpha_new\": 3,\n  \"auto_mapping\": null,"), "{out}");
        assert!(
            out.contains(
                "\"zzz_future\": {\n    \"a\": \"x\",\n    \"b\": [\n      1,\n      2.5,\n      null\n    ]\n  }\n}"
            ),
            "{out}"
        );
        assert!(out.contains("\"runtime_config\": {},"), "{out}");
        assert_eq!(parse(&out).unwrap(), cfg);
        let w = cfg.save_warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("['alpha_new', 'runtime_config', 'zzz_future']"), "{}", w[0]);
        assert!(w[0].contains("Unexpected keyword arguments"));
        // An extra entry named like a known key is ignored on write.
        let mut c = PveraConfig::default();
        c.extra.insert("r".into(), Value::from(3));
        assert_eq!(c.to_json_string(), PveraConfig::default().to_json_string());
    }

    #[test]
    fn target_modules_forms() {
        let c = parse(&minimal(r#""target_modules": ["b", "a", "b", "c"]"#)).unwrap();
        assert_eq!(c.target_modules, Some(TargetModules::List(vec!["b".into(), "a".into(), "c".into()])));
        for s in ["all-linear", "ALL-LINEAR", "All-Linear"] {
            let c = parse(&minimal(&format!(r#""target_modules": "{s}""#))).unwrap();
            assert_eq!(c.target_modules, Some(TargetModules::AllLinear));
            assert!(c.to_json_string().contains("\"target_modules\": \"all-linear\""));
        }
        let c = parse(&minimal(r#""target_modules": "q_proj""#)).unwrap();
        assert_eq!(c.target_modules, Some(TargetModules::Regex("q_proj".into())));
        let c = parse(&minimal(r#""target_modules": []"#)).unwrap();
        assert_eq!(c.target_modules, Some(TargetModules::List(vec![])));
        assert!(c.to_json_string().contains("\"target_modules\": [],"));
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("`target_modules`") && e.contains("empty list"), "{e}");
        let e = parse_err(&minimal(r#""target_modules": 5"#));
        assert!(e.contains("`target_modules`") && e.contains("the integer 5"), "{e}");
        let e = parse_err(&minimal(r#""target_modules": ["a", 1]"#));
        assert!(e.contains("entry 1 must be a string"), "{e}");
    }

    #[test]
    fn bias_values() {
        assert_eq!(Bias::parse("none").unwrap(), Bias::None);
        assert_eq!(Bias::parse("all").unwrap(), Bias::All);
        assert_eq!(Bias::parse("boft_only").unwrap(), Bias::Only("boft_only".into()));
        let e = Bias::parse("some").unwrap_err();
        assert!(matches!(&e, Error::InvalidConfig { field, .. } if field == "bias"));
        let e = e.to_string();
        assert!(
            e.contains("\"some\"") && e.contains("\"none\"") && e.contains("\"all\"") && e.contains("_only"),
            "{e}"
        );
        assert!(matches!(parse(&minimal(r#""bias": "lora""#)), Err(Error::InvalidConfig { .. })));
        assert!(parse_err(&minimal(r#""bias": null"#)).contains("`bias`"));
        let mut c = PveraConfig { bias: Bias::Only("weird".into()), ..Default::default() };
        assert!(c.validate().is_err());
        c.bias = Bias::Only("x_only".into());
        assert!(c.validate().is_ok());
        assert_eq!(c.bias.to_string(), "x_only");
    }

    #[test]
    fn wrong_types_name_the_field_value_and_fix() {
        let e = parse_err(&minimal(r#""r": "4""#));
        assert!(e.contains("test.json") && e.contains("`r`") && e.contains("\"4\"") && e.contains("\"r\": 4"), "{e}");
        let e = parse_err(&minimal(r#""r": 4.0"#));
        assert!(e.contains("`r`") && e.contains("4.0") && e.contains("\"r\": 4"), "{e}");
        let e = parse_err(&minimal(r#""r": true"#));
        assert!(e.contains("`r`") && e.contains("boolean true"), "{e}");
        let e = parse_err(&minimal(r#""r": 99999999999999999999"#));
        assert!(e.contains("`r`") && e.contains("out of range"), "{e}");
        let e = parse_err(&minimal(r#""save_projection": "false""#));
        assert!(e.contains("`save_projection`") && e.contains("\"save_projection\": false"), "{e}");
        let e = parse_err(&minimal(r#""d_initial": "0.1""#));
        assert!(e.contains("`d_initial`") && e.contains("\"d_initial\": 0.1"), "{e}");
        let e = parse_err(&minimal(r#""modules_to_save": "classifier""#));
        assert!(e.contains("`modules_to_save`") && e.contains("[\"classifier\"]"), "{e}");
        let e = parse_err(&minimal(r#""layers_to_transform": [0, "1"]"#));
        assert!(e.contains("`layers_to_transform`") && e.contains("\"1\""), "{e}");
        let e = parse_err(&minimal(r#""layers_to_transform": 1.5"#));
        assert!(e.contains("`layers_to_transform`"), "{e}");
        let e = parse_err(&minimal(r#""sample_at_inference": {"a": 1}"#));
        assert!(e.contains("`sample_at_inference`") && e.contains("\"a\""), "{e}");
        let e = parse_err(&minimal(r#""projection_prng_key": 1e3"#));
        assert!(e.contains("`projection_prng_key`") && e.contains("\"projection_prng_key\": 1000"), "{e}");
        let e = parse_err(&minimal(r#""projection_prng_key": 1000000000000000000000000000000000000000"#));
        assert!(e.contains("too large"), "{e}");
        let e = parse_err(&minimal(r#""task_type": 3"#));
        assert!(e.contains("`task_type`"), "{e}");
        assert!(matches!(parse(&minimal(r#""r": "4""#)), Err(Error::ConfigParse { .. })));
        // integers are accepted in float fields (Python would keep the int; we write it as a float)
        let c = parse(&minimal(r#""d_initial": 1, "pvera_dropout": 0"#)).unwrap();
        assert_eq!((c.d_initial, c.dropout), (1.0, 0.0));
    }

    #[test]
    fn peft_type_is_required_and_checked() {
        let e = parse(r#"{"r": 4}"#).unwrap_err();
        assert!(matches!(&e, Error::ConfigParse { .. }), "{e:?}");
        assert!(e.to_string().contains("peft_type") && e.to_string().contains("\"PVERA\""), "{e}");
        let e = parse(r#"{"peft_type": "LORA", "r": 4}"#).unwrap_err();
        assert!(matches!(&e, Error::WrongPeftType { found, path } if found == "LORA" && path == "test.json"), "{e:?}");
        let e = parse(r#"{"peft_type": "pvera"}"#).unwrap_err();
        assert!(matches!(&e, Error::WrongPeftType { found, .. } if found == "pvera"));
        let e = parse_err(r#"{"peft_type": null}"#);
        assert!(e.contains("`peft_type`") && e.contains("null"), "{e}");
    }

    #[test]
    fn malformed_json_is_a_clear_error() {
        let full = peft_written().into_iter().find(|(n, _)| n == "modules_to_save").unwrap().1;
        for cut in [1, 10, full.len() / 2, full.len() - 1] {
            let e = parse(&full[..cut]).unwrap_err();
            assert!(matches!(&e, Error::ConfigParse { .. }), "{e:?}");
            assert!(e.to_string().contains("truncated"), "{cut}: {e}");
        }
        let cases = [
            ("", "expecting a value"),
            ("   ", "expecting a value"),
            ("[1, 2]", "expected a JSON object"),
            ("{\"peft_type\": \"PVERA\",}", "trailing comma"),
            ("{\"peft_type\": \"PVERA\", 3: 4}", "property name"),
            ("{\"peft_type\": \"PVERA\" \"r\": 4}", "delimiter"),
            ("{\"peft_type\": \"PVERA\"} x", "extra data"),
            ("{\"peft_type\": \"PVERA\", \"r\": [1,]}", "trailing comma"),
            ("{'peft_type': 'PVERA'}", "double quotes"),
            ("{\"peft_type\": \"PV\nERA\"}", "control character"),
            ("{\"peft_type\": \"\\x\"}", "escape"),
            ("{\"peft_type\": \"\\ud800\"}", "surrogate"),
            ("\u{feff}{\"peft_type\": \"PVERA\"}", "byte order mark"),
            ("{\"peft_type\": \"PVERA\", \"r\": 01}", "delimiter"),
            ("{\"peft_type\": \"PVERA\", \"r\": -}", "expecting a value"),
            ("{\"peft_type\": \"PVERA\", \"r\": tru}", "expecting a value"),
        ];
        for (text, want) in cases {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains("test.json") && e.contains(want), "{text:?}: {e}");
        }
        let e = parse_err("{\n  \"peft_type\": \"PVERA\",\n  \"r\": 4,\n}");
        assert!(e.contains("trailing comma") && e.contains("line 4 column 1"), "{e}");
        // deep nesting is an error, not a stack overflow
        let deep = format!("{{\"peft_type\": \"PVERA\", \"x\": {}{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(parse_err(&deep).contains("nesting"));
        // Python dialect: NaN / Infinity, big integers, duplicate keys (last wins)
        let c = parse(&minimal(r#""d_initial": -Infinity, "r": 2, "r": 3"#)).unwrap();
        assert_eq!((c.d_initial, c.r), (f64::NEG_INFINITY, 3));
        assert!(c.to_json_string().contains("\"d_initial\": -Infinity,"));
        let c = parse(&minimal(r#""projection_prng_key": 340282366920938463463374607431768211455"#));
        assert!(c.is_err());
        let c = parse(&minimal(r#""future": 123456789012345678901234567890, "nan": NaN"#)).unwrap();
        assert!(c.extra["future"].is_f64());
        assert!(c.extra["nan"].is_null());
        // surrogate pairs decode
        let c = parse(&minimal(r#""revision": "\ud83d\ude00\u00e9""#)).unwrap();
        assert_eq!(c.revision.as_deref(), Some("\u{1f600}é"));
    }

    #[test]
    fn fuzzed_input_never_panics() {
        let mut seeds: Vec<String> = peft_written().into_iter().map(|(_, t)| t).collect();
        seeds.push(minimal(
            r#""target_modules": "(?=x)", "modules_to_save": ["("], "layers_to_transform": 1, "layers_pattern": "["#,
        ));
        let mut state: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let alphabet: Vec<char> = "{}[]\",:0123456789-+.eE \n\\utrfalsNIny\u{e9}\u{1f600}abc_".chars().collect();
        for round in 0..4000 {
            let base = &seeds[round % seeds.len()];
            let mut chars: Vec<char> = base.chars().collect();
            for _ in 0..(1 + next() % 4) {
                if chars.is_empty() {
                    break;
                }
                let pos = (next() as usize) % chars.len();
                match next() % 3 {
                    0 => {
                        chars.remove(pos);
                    }
                    1 => chars.insert(pos, alphabet[(next() as usize) % alphabet.len()]),
                    _ => chars[pos] = alphabet[(next() as usize) % alphabet.len()],
                }
            }
            let text: String = chars.into_iter().collect();
            if let Ok(c) = parse(&text) {
                let _ = c.validate();
                let _ = c.save_warnings();
                let out = c.to_json_string();
                assert_eq!(parse(&out).map(|c2| c2.to_json_string()).ok().as_deref(), Some(out.as_str()), "{text}");
            }
        }
    }

    #[test]
    fn validate_checks() {
        let ok = PveraConfig { target_modules: Some(TargetModules::list(["q_proj"])), ..Default::default() };
        assert!(ok.validate().is_ok());
        let field_of = |c: &PveraConfig| match c.validate() {
            Err(Error::InvalidConfig { field, reason }) => (field, reason),
            other => panic!("{other:?}"),
        };
        let (f, r) = field_of(&PveraConfig { r: 0, ..ok.clone() });
        assert_eq!((f.as_str(), r.as_str()), ("r", "`r` should be a positive integer value but the value passed is 0"));
        let lp = PveraConfig { layers_pattern: Some(LayersPattern::One("layers".into())), ..ok.clone() };
        let (f, r) = field_of(&lp);
        assert_eq!((f.as_str(), r.as_str()), ("layers_pattern", LAYERS_PATTERN_WITHOUT_LAYERS_MESSAGE));
        // PEFT's truthiness: "" and [] are fine without layers_to_transform, [""] is not
        assert!(PveraConfig { layers_pattern: Some(LayersPattern::One("".into())), ..ok.clone() }.validate().is_ok());
        assert!(PveraConfig { layers_pattern: Some(LayersPattern::Many(vec![])), ..ok.clone() }.validate().is_ok());
        assert!(PveraConfig { layers_pattern: Some(LayersPattern::Many(vec!["".into()])), ..ok.clone() }
            .validate()
            .is_err());
        // and PEFT refuses to load such a file
        let e = parse(&minimal(r#""layers_pattern": "layers""#)).unwrap_err();
        assert!(e.to_string().contains(LAYERS_PATTERN_WITHOUT_LAYERS_MESSAGE), "{e}");
        for p in [-0.1, 1.0, 1.5, f64::NAN] {
            assert_eq!(field_of(&PveraConfig { dropout: p, ..ok.clone() }).0, "pvera_dropout");
        }
        assert!(PveraConfig { dropout: 0.999, ..ok.clone() }.validate().is_ok());
        for d in [f64::NAN, f64::INFINITY] {
            assert_eq!(field_of(&PveraConfig { d_initial: d, ..ok.clone() }).0, "d_initial");
        }
        for (key, good) in
            [(-(1i128 << 63), true), ((1i128 << 64) - 1, true), (-(1i128 << 63) - 1, false), (1i128 << 64, false)]
        {
            let c = PveraConfig { projection_prng_key: key, ..ok.clone() };
            assert_eq!(c.validate().is_ok(), good, "{key}");
            let c = PveraConfig { generator_seed: Some(key), ..ok.clone() };
            assert_eq!(c.validate().is_ok(), good, "{key}");
        }
        let (f, r) = field_of(&PveraConfig { projection_prng_key: 1i128 << 64, ..ok.clone() });
        assert!(f == "projection_prng_key" && r.contains("18446744073709551616") && r.contains("manual_seed"), "{r}");
        let (f, r) =
            field_of(&PveraConfig { target_modules: Some(TargetModules::Regex("(?<=a)b".into())), ..ok.clone() });
        assert!(f == "target_modules" && r.contains("(?<=a)b") && r.contains("look-behind"), "{r}");
        let (f, r) = field_of(&PveraConfig { target_modules: Some(TargetModules::Regex("a(".into())), ..ok.clone() });
        assert!(f == "target_modules" && r.contains("\"a(\""), "{r}");
        let (f, _) = field_of(&PveraConfig { modules_to_save: Some(vec!["a)".into()]), ..ok.clone() });
        assert_eq!(f, "modules_to_save");
        let bad_lp = PveraConfig {
            layers_to_transform: Some(LayersToTransform::One(0)),
            layers_pattern: Some(LayersPattern::One("(".into())),
            ..ok.clone()
        };
        assert_eq!(field_of(&bad_lp).0, "layers_pattern");
        let (f, r) = field_of(&PveraConfig { task_type: Some("CLS".into()), ..ok.clone() });
        assert_eq!(f, "task_type");
        assert_eq!(
            r,
            "Invalid task type: 'CLS'. Must be one of the following task types: SEQ_CLS, SEQ_2_SEQ_LM, CAUSAL_LM, \
             TOKEN_CLS, QUESTION_ANS, FEATURE_EXTRACTION."
        );
        assert!(matches!(parse(&minimal(r#""task_type": "CLS""#)), Err(Error::InvalidConfig { .. })));
        // target_modules None (defaults from the model type) is valid
        assert!(PveraConfig::default().validate().is_ok());
    }

    #[test]
    fn seeds_wrap_like_manual_seed() {
        let c = PveraConfig { projection_prng_key: -1, generator_seed: Some(-2), ..Default::default() };
        assert_eq!(c.projection_seed(), u64::MAX);
        assert_eq!(c.generator_seed_u64(), Some(u64::MAX - 1));
        let c = PveraConfig { projection_prng_key: 42, ..Default::default() };
        assert_eq!(c.projection_seed(), 42);
        assert_eq!(c.generator_seed_u64(), None);
    }

    #[test]
    fn sample_at_inference_dict() {
        let map: BTreeMap<String, bool> = [("lin1", false), ("q_proj", true), ("layers.0.q_proj", false)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let s = SampleAtInference::PerModule(map.clone());
        assert!(!s.for_module("lin1"));
        assert!(!s.for_module("sub.lin1"));
        assert!(!s.for_module("lin0"));
        assert!(!s.for_module("mylin1"));
        assert!(s.for_module("model.layers.1.q_proj"));
        assert!(!s.for_module("model.layers.0.q_proj")); // longer suffix wins
        assert!(s.for_module("q_proj"));
        assert!(s.peft_reads_as());
        assert!(!SampleAtInference::PerModule(BTreeMap::new()).peft_reads_as());
        assert!(SampleAtInference::All(true).for_module("x") && SampleAtInference::All(true).peft_reads_as());
        let c = PveraConfig { sample_at_inference: s, ..Default::default() };
        let w = c.save_warnings();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("EVERY PVeRA layer samples") && w[0].contains("\"lin1\": false"), "{}", w[0]);
        let text = c.to_json_string();
        assert!(text.contains(
            "\"sample_at_inference\": {\n    \"layers.0.q_proj\": false,\n    \"lin1\": false,\n    \"q_proj\": true\n  },"
        ));
        assert_eq!(parse(&text).unwrap(), c);
        let empty =
            PveraConfig { sample_at_inference: SampleAtInference::PerModule(BTreeMap::new()), ..Default::default() };
        assert!(empty.save_warnings().is_empty());
        assert!(empty.to_json_string().contains("\"sample_at_inference\": {},"));
    }

    #[test]
    fn save_projection_warning_is_peft_text() {
        let c = written("no_save_projection");
        assert_eq!(c.save_warnings(), vec![SAVE_PROJECTION_WARNING.to_string()]);
        assert!(PveraConfig::default().save_warnings().is_empty());
    }

    #[test]
    fn layers_helpers() {
        assert!(LayersToTransform::One(2).contains(2) && !LayersToTransform::One(2).contains(1));
        assert!(LayersToTransform::Many(vec![0, 2]).contains(2) && !LayersToTransform::Many(vec![0, 2]).contains(1));
        assert!(!LayersToTransform::Many(vec![]).is_filter() && LayersToTransform::One(0).is_filter());
        assert_eq!(LayersPattern::Many(vec!["h".into(), "layers".into()]).patterns(), vec!["h", "layers"]);
        assert!(LayersPattern::One(String::new()).is_empty());
    }

    #[test]
    fn files_and_directories() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = written("layers_list_pattern_list");
        cfg.save_pretrained(dir.path()).unwrap();
        let text = std::fs::read_to_string(dir.path().join(CONFIG_NAME)).unwrap();
        assert_eq!(text, fixture("layers_list_pattern_list.json"));
        assert_eq!(PveraConfig::from_dir(dir.path()).unwrap(), cfg);
        // nested directory is created
        let nested = dir.path().join("a/b");
        cfg.save_pretrained(&nested).unwrap();
        assert!(nested.join(CONFIG_NAME).is_file());
        // missing file: Io error naming the path
        let e = PveraConfig::from_dir(&dir.path().join("nope")).unwrap_err();
        assert!(matches!(&e, Error::Io { path, .. } if path.ends_with("nope/adapter_config.json")), "{e:?}");
        // saving into a file path fails
        let file = dir.path().join(CONFIG_NAME);
        assert!(cfg.save_pretrained(&file).is_err());
        // invalid UTF-8
        let bad = dir.path().join("bad.json");
        std::fs::write(&bad, b"{\"peft_type\": \"PV\xffERA\"}").unwrap();
        let e = PveraConfig::from_file(&bad).unwrap_err();
        assert!(
            matches!(&e, Error::ConfigParse { path, reason } if path.ends_with("bad.json") && reason.contains("UTF-8"))
        );
    }
}
