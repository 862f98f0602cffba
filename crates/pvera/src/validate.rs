//! Checking an adapter directory without loading it: what `pvera inspect` reports.
//!
//! [`validate_adapter_dir`] runs every check of [`PeftModel::load_adapter`] that needs no base
//! model, and lists *every* problem it finds instead of stopping at the first: the directory, the
//! config (parsing and [`PveraConfig::validate`]), the safetensors file (header, offsets, dtypes),
//! non-finite values, tensor shapes against `r` and against each other (λ_d = 2r, A = (2r, in_max),
//! B = (out_max, r) with out_max the longest λ_b; for VeRA λ_d = r and A = (r, in_max)), complete λ
//! pairs, the projections the config promises (`save_projection`), a missing `pvera_B` / `vera_B`
//! checked against the projections regenerated from `projection_prng_key`, and keys that belong to
//! no part of the adapter. The method comes from the config's `peft_type`, or, when the config
//! cannot be read, from the keys of the weights file.
//! [`validate_with_model`] adds the full load on a model, which is the only way to know whether
//! `target_modules` find the model's layers and whether each λ_b fits its layer.
//!
//! Errors are the very [`Error`] values the loader returns (same variants, same wording where the
//! check is the same); the problems are listed in the loader's order (directory, config, weights
//! file, config validation, tensors), so the first error is the one loading would stop at.
//! Warnings are what the loader accepts with a warning; notes are information (stored projections
//! that `projection_prng_key` does not reproduce: nothing is wrong with the adapter, but
//! `save_projection=false` would change it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{
    self, missing_projections, proj_a_key, proj_a_name, proj_b_key, proj_b_name, regenerated_b_warning,
    stored_a_ignored_warning, stored_projections_ignored_warning, unrecoverable_b, KeyKind, StoredTensor,
};
use crate::config::{Bias, Method, PveraConfig, TargetModules};
use crate::error::{Error, Result};
use crate::layer::count_non_finite;
use crate::models::loader::ModelDir;
use crate::models::AnyModel;
use crate::projection::generate_raw;
use crate::rng::TorchKernel;
use crate::state::RunState;
use crate::peft_model::PeftModel;
use crate::targets::TargetMatcher;

/// How serious a [`Problem`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The adapter would not load.
    Error,
    /// It loads, with a warning (or PEFT would treat it differently).
    Warning,
    /// Information; nothing to fix.
    Info,
}

impl Severity {
    /// `"error"`, `"warning"` or `"info"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
            Severity::Info => "info",
        }
    }
}

/// A warning or a note: a class (a stable name, see [`Problem::class`]) and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Notice {
    /// Stable name of the kind of finding.
    pub class: &'static str,
    /// What was found, where, and what it means.
    pub message: String,
}

/// Warning class: `pvera_B` is missing but `pvera_A` equals the regenerated projection, so B is
/// regenerated (the loader's warning).
pub const REGENERATED_B: &str = "RegeneratedProjectionB";
/// Warning class: `save_projection=false` but the file carries projections that differ from the
/// regenerated ones (pvera uses them, PEFT ignores them).
pub const STORED_PROJECTIONS_IGNORED_BY_PEFT: &str = "StoredProjectionsIgnoredByPeft";
/// Warning class: keys that are neither λ's, projections, `modules_to_save` parameters nor bias
/// entries (the loader keeps them and saves them back; PEFT ignores them).
pub const FOREIGN_TENSORS: &str = "ForeignTensors";
/// Warning class: λ's of modules that `target_modules` does not select under the file's names
/// (the load fails unless the model names the module so that it matches; `--model` decides).
pub const UNTARGETED_LAMBDAS: &str = "UntargetedLambdas";
/// Warning class: λ's or projections stored in an integer dtype (cast to float on load, as torch's
/// `load_state_dict` does).
pub const INTEGER_TENSORS: &str = "IntegerTensors";
/// Note class: stored projections differ from the ones regenerated from `projection_prng_key`.
pub const PROJECTIONS_NOT_FROM_KEY: &str = "ProjectionsNotFromKey";
/// Warning class: a warning of the full load on a model ([`validate_with_model`]).
pub const LOAD_WARNING: &str = "LoadWarning";

/// One finding about an adapter directory.
#[derive(Debug)]
pub enum Problem {
    /// The loader would refuse the adapter with this error.
    Error(Error),
    /// The loader accepts the adapter with this warning.
    Warning(Notice),
    /// Information.
    Info(Notice),
}

impl Problem {
    /// How serious it is.
    pub fn severity(&self) -> Severity {
        match self {
            Problem::Error(_) => Severity::Error,
            Problem::Warning(_) => Severity::Warning,
            Problem::Info(_) => Severity::Info,
        }
    }

    /// The class: the [`Error`] variant's name for errors (`InvalidConfig`, `ShapeMismatch`, ...,
    /// as in `docs/ERRORS.md`), the notice's class otherwise.
    pub fn class(&self) -> &'static str {
        match self {
            Problem::Error(e) => error_class(e),
            Problem::Warning(n) | Problem::Info(n) => n.class,
        }
    }

    /// The message (for errors, the error's `Display`).
    pub fn message(&self) -> String {
        match self {
            Problem::Error(e) => e.to_string(),
            Problem::Warning(n) | Problem::Info(n) => n.message.clone(),
        }
    }
}

/// The name of an [`Error`] variant.
pub fn error_class(e: &Error) -> &'static str {
    match e {
        Error::InvalidConfig { .. } => "InvalidConfig",
        Error::ConfigParse { .. } => "ConfigParse",
        Error::WrongPeftType { .. } => "WrongPeftType",
        Error::NoTargetMatched { .. } => "NoTargetMatched",
        Error::NoDefaultTargets { .. } => "NoDefaultTargets",
        Error::MissingTensor { .. } => "MissingTensor",
        Error::ShapeMismatch { .. } => "ShapeMismatch",
        Error::DtypeMismatch { .. } => "DtypeMismatch",
        Error::NonFinite { .. } => "NonFinite",
        Error::Safetensors { .. } => "Safetensors",
        Error::Adapter(_) => "Adapter",
        Error::UnknownAdapter { .. } => "UnknownAdapter",
        Error::Projection(_) => "Projection",
        Error::Io { .. } => "Io",
        Error::Candle(_) => "Candle",
        Error::Model(_) => "Model",
        Error::UnexpectedTensors { .. } => "UnexpectedTensors",
        Error::UnsupportedModel { .. } => "UnsupportedModel",
        Error::Data(_) => "Data",
        Error::Request(_) => "Request",
        Error::StaleCalibration { .. } => "StaleCalibration",
    }
}

/// The stored projections compared bit for bit with the ones regenerated from
/// `projection_prng_key` (A then B from one generator, shaped like the stored ones).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProjectionComparison {
    /// Elements of A and B together.
    pub elements: usize,
    /// Elements that differ from PyTorch's AVX2/FMA kernel (what PEFT draws on such CPUs and
    /// what the loader regenerates).
    pub differ_fma_kernel: usize,
    /// Elements that differ from the two-rounding kernel (`ATEN_CPU_CAPABILITY=default`).
    pub differ_two_rounding_kernel: usize,
    /// `Some("F16")` / `Some("BF16")` when the stored projections are the regenerated ones (AVX2/FMA
    /// kernel) rounded to that dtype: an adapter saved from a half-precision model, where PEFT
    /// casts the projections with the model.
    pub rounded_to: Option<&'static str>,
}

/// What [`validate_adapter_dir`] found.
#[derive(Debug)]
pub struct AdapterReport {
    /// The adapter directory.
    pub dir: PathBuf,
    /// The config, when it parses (even if [`PveraConfig::validate`] refuses it).
    pub config: Option<PveraConfig>,
    /// The adapter's method: the config's, else the one whose keys the weights file uses.
    pub method: Method,
    /// `dir/adapter_model.safetensors`.
    pub weights_path: PathBuf,
    /// Every tensor that could be read, by key.
    pub tensors: BTreeMap<String, StoredTensor>,
    /// The safetensors metadata.
    pub metadata: HashMap<String, String>,
    /// Both projections stored with consistent shapes: the comparison with the regenerated ones.
    pub projections: Option<ProjectionComparison>,
    /// Everything found, in the loader's order (the first error is the one loading stops at).
    pub problems: Vec<Problem>,
}

impl AdapterReport {
    /// True when no problem is an error.
    pub fn would_load(&self) -> bool {
        self.first_error().is_none()
    }

    /// The first error: the one loading would stop at.
    pub fn first_error(&self) -> Option<&Error> {
        self.problems.iter().find_map(|p| match p {
            Problem::Error(e) => Some(e),
            _ => None,
        })
    }

    /// Number of trainable values in the file: every tensor but the projections.
    pub fn trainable_params(&self) -> usize {
        let (a, b) = (proj_a_key(self.method), proj_b_key(self.method));
        self.tensors
            .iter()
            .filter(|(k, _)| k.as_str() != a && k.as_str() != b)
            .map(|(_, t)| t.tensor.elem_count())
            .sum()
    }

    fn push_new(&mut self, p: Problem) {
        let m = p.message();
        if !self.problems.iter().any(|q| q.message() == m) {
            self.problems.push(p);
        }
    }
}

/// Checks an adapter directory without a base model; see the module documentation.
pub fn validate_adapter_dir(dir: &Path) -> AdapterReport {
    let weights_path = dir.join(checkpoint::WEIGHTS_NAME);
    let mut report = AdapterReport {
        dir: dir.to_path_buf(),
        config: None,
        method: Method::default(),
        weights_path: weights_path.clone(),
        tensors: BTreeMap::new(),
        metadata: HashMap::new(),
        projections: None,
        problems: Vec::new(),
    };
    if let Err(e) = checkpoint::check_adapter_dir(dir) {
        report.problems.push(Problem::Error(e));
        return report;
    }
    // The loader's order: config, weights file, config validation, tensors.
    match PveraConfig::from_dir(dir) {
        Ok(c) => report.config = Some(c),
        Err(e) => report.problems.push(Problem::Error(e)),
    }
    let file = weights_path.display().to_string();
    let mut unreadable = BTreeSet::new();
    let mut weights_read = false;
    let read = checkpoint::weights_file(dir)
        .and_then(|p| std::fs::read(&p).map_err(|e| Error::io(&p, e)))
        .and_then(|bytes| checkpoint::parse_safetensors_each(&bytes, &file, &Device::Cpu));
    match read {
        Ok((each, metadata)) => {
            weights_read = true;
            report.metadata = metadata;
            let mut bad = Vec::new();
            for (key, t) in each {
                match t {
                    Ok(t) => {
                        report.tensors.insert(key, t);
                    }
                    Err(e) => {
                        unreadable.insert(key.clone());
                        bad.push((key, e));
                    }
                }
            }
            bad.sort_by(|x, y| x.0.cmp(&y.0));
            report.problems.extend(bad.into_iter().map(|(_, e)| Problem::Error(e)));
        }
        Err(e) => report.problems.push(Problem::Error(e)),
    }
    report.method = match &report.config {
        Some(c) => c.method,
        None => checkpoint::method_of_keys(report.tensors.keys().chain(unreadable.iter())),
    };
    let config_file = dir.join(checkpoint::CONFIG_NAME);
    let valid = report.config.as_ref().and_then(|c| match c.validate() {
        Ok(()) => Some(c.clone()),
        Err(e) => {
            report.problems.push(Problem::Error(in_config_file(e, &config_file)));
            None
        }
    });
    let mut checks = TensorChecks {
        method: report.method,
        file,
        tensors: &report.tensors,
        unreadable: &unreadable,
        config: valid.as_ref(),
        problems: Vec::new(),
        projections: None,
    };
    if weights_read {
        checks.run();
    }
    let (problems, projections) = (checks.problems, checks.projections);
    report.problems.extend(problems);
    report.projections = projections;
    report
}

/// [`validate_adapter_dir`], then the full load ([`PeftModel::from_pretrained`]) on a fresh copy
/// of the model in `model`: its error (target modules the model lacks, λ's that do not fit the
/// model's layers, ...) comes first, since loading stops there; its warnings are added unless the
/// same message is already listed.
///
/// Errors: only those of building the model itself (they are not the adapter's problem).
pub fn validate_with_model(dir: &Path, model: &ModelDir) -> Result<AdapterReport> {
    let mut report = validate_adapter_dir(dir);
    let state = Arc::new(RunState::new(0));
    let (m, registry, info) = AnyModel::load(model, None, &Device::Cpu, state)?;
    match PeftModel::from_pretrained(m, registry, info, dir, checkpoint::DEFAULT_ADAPTER, false) {
        Ok(mut pm) => {
            for w in pm.take_warnings() {
                report.push_new(Problem::Warning(Notice { class: LOAD_WARNING, message: w }));
            }
        }
        Err(e) => {
            // Loading's own error is the one it stops at: first, whatever the checks above found.
            let m = e.to_string();
            report.problems.retain(|p| p.message() != m);
            report.problems.insert(0, Problem::Error(e));
        }
    }
    Ok(report)
}

/// The loader names the config file in validation errors.
// The same mapping as `PeftModel::load_adapter_files` (private there).
pub(crate) fn in_config_file(e: Error, config_file: &Path) -> Error {
    match e {
        Error::InvalidConfig { field, reason } => {
            Error::InvalidConfig { field, reason: format!("{reason} (in {})", config_file.display()) }
        }
        other => other,
    }
}

/// The loader's error for NaN or Inf in a tensor of an adapter file.
pub(crate) fn non_finite(file: &str, key: &str, count: usize) -> Error {
    Error::NonFinite {
        what: format!("{file}: tensor `{key}`"),
        count,
        hint: " (the adapter is corrupt or training diverged; use an earlier checkpoint)".into(),
    }
}

/// The loader lists at most this many keys in one message.
const SHOWN_KEYS: usize = 6;

fn shown(keys: &[String]) -> String {
    let more = if keys.len() > SHOWN_KEYS { " ..." } else { "" };
    format!("{}{more}", keys.iter().take(SHOWN_KEYS).cloned().collect::<Vec<_>>().join(", "))
}

fn is_float(t: &Tensor) -> bool {
    matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16 | DType::F64)
}

fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn bit_differences(stored: &[f32], generated: &[f32]) -> usize {
    stored.iter().zip(generated).filter(|(a, b)| a.to_bits() != b.to_bits()).count()
        + stored.len().abs_diff(generated.len())
}

/// The checks on the tensors, given what is known of the config.
struct TensorChecks<'a> {
    method: Method,
    file: String,
    tensors: &'a BTreeMap<String, StoredTensor>,
    unreadable: &'a BTreeSet<String>,
    /// The config, when it parsed and validated.
    config: Option<&'a PveraConfig>,
    problems: Vec<Problem>,
    projections: Option<ProjectionComparison>,
}

impl TensorChecks<'_> {
    fn present(&self, key: &str) -> bool {
        self.tensors.contains_key(key) || self.unreadable.contains(key)
    }

    fn error(&mut self, e: Error) {
        self.problems.push(Problem::Error(e));
    }

    fn shape_error(&mut self, key: &str, got: &[usize], expected: String, hint: String) {
        let file = self.file.clone();
        self.error(Error::ShapeMismatch { file, key: key.to_string(), expected, got: got.to_vec(), hint });
    }

    fn run(&mut self) {
        let r = self.config.and_then(|c| usize::try_from(c.r).ok()).filter(|r| *r > 0);
        // λ's by module path.
        let mut pairs: BTreeMap<&str, (bool, bool)> = BTreeMap::new();
        let all_keys: Vec<&String> = self.tensors.keys().chain(self.unreadable.iter()).collect();
        for k in &all_keys {
            if let KeyKind::Lambda { path, which } = checkpoint::classify_key(self.method, k) {
                let e = pairs.entry(path).or_default();
                if which == 'b' {
                    e.0 = true;
                } else {
                    e.1 = true;
                }
            }
        }
        let m = self.method;
        let a = self.tensors.get(proj_a_key(m)).map(|t| t.tensor.clone());
        let b = self.tensors.get(proj_b_key(m)).map(|t| t.tensor.clone());
        let lambda_b: Vec<(String, Vec<usize>)> = pairs
            .keys()
            .map(|p| checkpoint::lambda_b_key(m, p))
            .filter_map(|k| self.tensors.get(&k).map(|t| (k, t.tensor.dims().to_vec())))
            .collect();
        let out_max = lambda_b.iter().filter(|(_, d)| d.len() == 1).map(|(_, d)| d[0]).max();
        // An unreadable λ_b (reported already) may be the longest: B's rows can then only be
        // checked against the readable ones from above.
        let all_b_read = pairs.keys().all(|p| !self.unreadable.contains(&checkpoint::lambda_b_key(m, p)));
        let a_ok = self.check_a(a.as_ref(), b.as_ref(), r);
        let b_ok = self.check_b(b.as_ref(), r, out_max, &lambda_b, all_b_read);
        self.check_projection_presence(a.as_ref(), b.as_ref(), r, a_ok, b_ok, out_max);
        self.check_lambdas(&pairs, r, a.as_ref().filter(|_| a_ok));
        self.check_values(&pairs);
        self.check_keys(&pairs);
    }

    /// A = (2r, in_max) (VeRA: (r, in_max)).
    fn check_a(&mut self, a: Option<&Tensor>, b: Option<&Tensor>, r: Option<usize>) -> bool {
        let Some(a) = a else { return false };
        let m = self.method;
        let dims = a.dims();
        let rows = r.map(|r| m.latent_rows(r)).or_else(|| b.filter(|b| b.dims().len() == 2).map(|b| m.latent_rows(b.dims()[1])));
        let cols = if dims.len() == 2 { dims[1].to_string() } else { "in_max".into() };
        let ok = dims.len() == 2 && rows.is_none_or(|rows| dims[0] == rows);
        if !ok {
            let two_r = if m.samples() { "2r" } else { "r" };
            let rows_s = rows.map_or(two_r.to_string(), |v| v.to_string());
            let why = match r {
                Some(r) => format!("r={r} in adapter_config.json"),
                None => format!("{}'s r columns", proj_b_name(m)),
            };
            self.shape_error(
                proj_a_key(m),
                dims,
                format!("[{rows_s}, {cols}]"),
                format!(
                    " ({} is ({two_r}, in_max), in_max the in-features of the largest targeted layer; {why}; \
                     the projections do not belong to this adapter: re-save it)",
                    proj_a_name(m)
                ),
            );
        }
        ok
    }

    /// B = (out_max, r), out_max the longest λ_b; every λ_b at most B's rows. True when B is
    /// (rows, r), whatever its rows.
    fn check_b(
        &mut self,
        b: Option<&Tensor>,
        r: Option<usize>,
        out_max: Option<usize>,
        lambda_b: &[(String, Vec<usize>)],
        all_b_read: bool,
    ) -> bool {
        let Some(b) = b else { return false };
        let (bk, bn) = (proj_b_key(self.method), proj_b_name(self.method));
        let dims = b.dims().to_vec();
        if dims.len() != 2 || r.is_some_and(|r| dims[1] != r) {
            let r_s = r.map_or("r".to_string(), |v| v.to_string());
            let rows = if dims.len() == 2 { dims[0].to_string() } else { "out_max".into() };
            self.shape_error(
                bk,
                &dims,
                format!("[{rows}, {r_s}]"),
                format!(
                    " ({bn} is (out_max, r), out_max the out-features of the largest targeted layer; r={r_s} \
                     in adapter_config.json; the projections do not belong to this adapter: re-save it)"
                ),
            );
            return false;
        }
        let Some(out_max) = out_max else { return true };
        // From here on B itself is (rows, r): comparable with the regenerated projections.
        let rows = dims[0];
        if out_max > rows {
            for (key, d) in lambda_b.iter().filter(|(_, d)| d.len() == 1 && d[0] > rows) {
                self.shape_error(
                    key,
                    d,
                    format!("at most [{rows}]"),
                    format!(
                        " ({bn} has {rows} rows, one per out-feature of the largest targeted layer, and \
                         this λ_b is longer: λ_b and the projections come from different models)"
                    ),
                );
            }
        } else if out_max < rows && all_b_read {
            self.shape_error(
                bk,
                &dims,
                format!("[{out_max}, {}]", dims[1]),
                format!(
                    " ({bn} has a row per out-feature of the largest targeted layer, but the longest λ_b \
                     has {out_max} values: a λ_b is too short or {bn} belongs to another model; \
                     `pvera inspect --model DIR` names the layer)"
                ),
            );
        }
        true
    }

    /// Projections the config promises, a missing B, and the comparison with the key.
    fn check_projection_presence(
        &mut self,
        a: Option<&Tensor>,
        b: Option<&Tensor>,
        r: Option<usize>,
        a_ok: bool,
        b_ok: bool,
        out_max: Option<usize>,
    ) {
        let Some(cfg) = self.config else { return };
        let Some(r) = r else { return };
        let key = cfg.projection_seed();
        let prng_key = cfg.projection_prng_key;
        let m = self.method;
        let generate = |a: &Tensor, out: usize, kernel| {
            let in_max = a.dims().get(1).copied().unwrap_or(0);
            generate_raw(m, key, r, in_max, out, kernel)
        };
        let a_present = self.present(proj_a_key(m));
        let b_present = self.present(proj_b_key(m));
        match (cfg.save_projection, a, b) {
            (true, None, _) if !a_present => {
                let e = missing_projections(m, &self.file);
                self.error(e);
            }
            (true, Some(a), None) if a_ok && !b_present => {
                let Ok(stored) = f32_values(a) else { return };
                let (ga, _) = generate(a, 0, TorchKernel::Avx2);
                let diff = bit_differences(&stored, &ga);
                if diff == 0 {
                    let message = regenerated_b_warning(m, &self.file, prng_key);
                    self.problems.push(Problem::Warning(Notice { class: REGENERATED_B, message }));
                } else {
                    let e = unrecoverable_b(m, &self.file, prng_key, diff);
                    self.error(e);
                }
            }
            (save, Some(a), Some(b)) if a_ok && b_ok => {
                let (Ok(sa), Ok(sb)) = (f32_values(a), f32_values(b)) else { return };
                let out = b.dims()[0];
                let diff = |kernel| {
                    let (ga, gb) = generate(a, out, kernel);
                    (bit_differences(&sa, &ga), bit_differences(&sb, &gb))
                };
                let (fa, fb) = diff(TorchKernel::Avx2);
                let (da, db) = diff(TorchKernel::Default);
                let rounded_to = if fa + fb == 0 {
                    None
                } else {
                    let (ga, gb) = generate(a, out, TorchKernel::Avx2);
                    let same = |round: fn(f32) -> f32| {
                        let r = |v: &[f32]| v.iter().map(|x| round(*x)).collect::<Vec<f32>>();
                        bit_differences(&sa, &r(&ga)) + bit_differences(&sb, &r(&gb)) == 0
                    };
                    if same(|x| half::f16::from_f32(x).to_f32()) {
                        Some("F16")
                    } else if same(|x| half::bf16::from_f32(x).to_f32()) {
                        Some("BF16")
                    } else {
                        None
                    }
                };
                let cmp = ProjectionComparison {
                    elements: sa.len() + sb.len(),
                    differ_fma_kernel: fa + fb,
                    differ_two_rounding_kernel: da + db,
                    rounded_to,
                };
                self.projections = Some(cmp);
                if cmp.differ_fma_kernel == 0 || cmp.rounded_to.is_some() {
                    return;
                }
                if !save {
                    // The loader's warning (PeftModel::load_adapter_files).
                    let message = stored_projections_ignored_warning(m, &self.file, fa, fb);
                    self.problems.push(Problem::Warning(Notice { class: STORED_PROJECTIONS_IGNORED_BY_PEFT, message }));
                    return;
                }
                let kernel = if cmp.differ_two_rounding_kernel == 0 {
                    "torch's two-rounding kernel (ATEN_CPU_CAPABILITY=default, CPUs without AVX2) reproduces \
                     them exactly"
                } else {
                    "neither torch kernel reproduces them (they were drawn from another key, trained or edited)"
                };
                let message = format!(
                    "{}: the stored {}/{} differ from the projections regenerated from \
                     projection_prng_key={prng_key} in {} of {} elements; {kernel}. They load as stored \
                     (save_projection=true), but keep save_projection=true: with false the adapter would \
                     change (`--verify-projections` exits 3 for this)",
                    self.file,
                    proj_a_name(m),
                    proj_b_name(m),
                    cmp.differ_fma_kernel,
                    cmp.elements
                );
                self.problems.push(Problem::Info(Notice { class: PROJECTIONS_NOT_FROM_KEY, message }));
            }
            (false, Some(a), None) if a_ok => {
                let Ok(stored) = f32_values(a) else { return };
                let (ga, _) = generate(a, out_max.unwrap_or(0), TorchKernel::Avx2);
                let da = bit_differences(&stored, &ga);
                if da != 0 {
                    // The loader's warning (PeftModel::load_adapter_files).
                    let message = stored_a_ignored_warning(m, &self.file, da);
                    self.problems.push(Problem::Warning(Notice { class: STORED_PROJECTIONS_IGNORED_BY_PEFT, message }));
                }
            }
            _ => {}
        }
    }

    /// λ_d = [2r] (VeRA: [r]; or A's rows), λ_b one-dimensional, both halves of every pair present.
    fn check_lambdas(&mut self, pairs: &BTreeMap<&str, (bool, bool)>, r: Option<usize>, a: Option<&Tensor>) {
        let m = self.method;
        let two_r = if m.samples() { "2r" } else { "r" };
        let want_d = r.map(|r| (m.latent_rows(r), format!("r={r} in adapter_config.json"))).or_else(|| {
            a.map(|a| (a.dims()[0], format!("{} has {} rows = {two_r}", proj_a_name(m), a.dims()[0])))
        });
        let mut missing = Vec::new();
        for (path, (has_b, has_d)) in pairs {
            let kb = checkpoint::lambda_b_key(m, path);
            let kd = checkpoint::lambda_d_key(m, path);
            if !has_b {
                missing.push(kb.clone());
            }
            if !has_d {
                missing.push(kd.clone());
            }
            if let Some(t) = self.tensors.get(&kb) {
                let dims = t.tensor.dims().to_vec();
                if dims.len() != 1 {
                    self.shape_error(
                        &kb,
                        &dims,
                        "[out_features]".into(),
                        format!(" (λ_b holds one value per out-feature of layer {path})"),
                    );
                }
            }
            if let (Some(t), Some((n, why))) = (self.tensors.get(&kd), &want_d) {
                let dims = t.tensor.dims().to_vec();
                if dims != [*n] {
                    self.shape_error(
                        &kd,
                        &dims,
                        format!("[{n}]"),
                        format!(" (λ_d holds {two_r} values for layer {path}; {why}; the adapter was saved with another r)"),
                    );
                }
            }
        }
        if pairs.is_empty() {
            let file = self.file.clone();
            self.error(Error::MissingTensor {
                file,
                key: format!("{}, {}", checkpoint::lambda_b_key(m, "<module>"), checkpoint::lambda_d_key(m, "<module>")),
                hint: format!(
                    " (the file holds no λ tensors at all, so no layer would be adapted; it is not a saved \
                     {} adapter, or it was written empty: re-save it)",
                    m.name()
                ),
            });
        }
        if !missing.is_empty() {
            let n = missing.len();
            let file = self.file.clone();
            self.error(Error::MissingTensor {
                file,
                key: shown(&missing),
                hint: format!(
                    " ({n} λ tensor(s) missing: every adapted layer needs both {} and \
                     {}, and the file has only one of them for these layers; PEFT would load the \
                     adapter half-initialised with only a warning. Re-save the adapter)",
                    checkpoint::lambda_b_name(m),
                    checkpoint::lambda_d_name(m)
                ),
            });
        }
    }

    /// NaN / Inf in what the loader reads; integer λ's or projections.
    fn check_values(&mut self, pairs: &BTreeMap<&str, (bool, bool)>) {
        let mut integer = Vec::new();
        let mut errors = Vec::new();
        // What the loader reads: not foreign tensors (kept as they are), nor projections that
        // save_projection=false regenerates.
        let regenerated = self.config.is_some_and(|c| !c.save_projection);
        for (key, t) in self.tensors {
            let kind = checkpoint::classify_key(self.method, key);
            let projection = matches!(kind, KeyKind::ProjectionA | KeyKind::ProjectionB);
            if self.is_foreign(key, pairs) || (projection && regenerated) {
                continue;
            }
            if !is_float(&t.tensor) {
                if !matches!(kind, KeyKind::Other | KeyKind::ModuleParam { .. }) {
                    integer.push(format!("{key} ({})", t.file_dtype));
                }
                continue;
            }
            match count_non_finite(&t.tensor) {
                Ok(0) => {}
                Ok(n) => errors.push(non_finite(&self.file, key, n)),
                Err(e) => errors.push(e),
            }
        }
        for e in errors {
            self.error(e);
        }
        if !integer.is_empty() {
            let message = format!(
                "{}: {} tensor(s) stored in an integer dtype: {}; they are cast to float on load, as \
                 torch's load_state_dict does in PEFT (fractions are lost: re-save the adapter if this \
                 was not intended)",
                self.file,
                integer.len(),
                shown(&integer)
            );
            self.problems.push(Problem::Warning(Notice { class: INTEGER_TENSORS, message }));
        }
    }

    /// Keys that belong to no part of the adapter, and λ's that `target_modules` does not select.
    /// A key that is neither a λ, a projection, a `modules_to_save` parameter nor a bias entry of
    /// the config. Without a (valid) config only keys no adapter has are foreign.
    fn is_foreign(&self, key: &str, pairs: &BTreeMap<&str, (bool, bool)>) -> bool {
        let Some(cfg) = self.config else {
            return checkpoint::classify_key(self.method, key) == KeyKind::Other;
        };
        let mts: &[String] = cfg.modules_to_save.as_deref().unwrap_or(&[]);
        let known = match checkpoint::classify_key(self.method, key) {
            KeyKind::Lambda { .. } | KeyKind::ProjectionA | KeyKind::ProjectionB => true,
            KeyKind::TargetedBias { path } => cfg.bias != Bias::None && pairs.contains_key(path),
            KeyKind::ModuleParam { path, param } => {
                mts.iter().any(|m| path.ends_with(m.as_str()))
                    || (param == "bias" && cfg.bias == Bias::All && !pairs.contains_key(path))
            }
            KeyKind::Other => false,
        };
        !known
    }

    fn check_keys(&mut self, pairs: &BTreeMap<&str, (bool, bool)>) {
        let cfg = self.config;
        let foreign: Vec<String> =
            self.tensors.keys().chain(self.unreadable.iter()).filter(|k| self.is_foreign(k, pairs)).cloned().collect();
        if !foreign.is_empty() {
            let message = format!(
                "{}: {} tensor(s) are neither λ's, projections, modules_to_save parameters nor bias \
                 entries of this config: {}; the loader keeps them and saves them back unchanged, PEFT \
                 ignores them (remove them, or list their module in modules_to_save)",
                self.file,
                foreign.len(),
                shown(&foreign)
            );
            self.problems.push(Problem::Warning(Notice { class: FOREIGN_TENSORS, message }));
        }
        // λ's of modules the targets do not select (under the file's names; models with two naming
        // schemes may still match them under the other one, hence a warning).
        let Some(cfg) = cfg else { return };
        if !matches!(cfg.target_modules, Some(TargetModules::List(_)) | Some(TargetModules::Regex(_))) {
            return;
        }
        let Ok(matcher) = TargetMatcher::new(cfg) else { return };
        let untargeted: Vec<String> = pairs
            .keys()
            .filter(|p| !matcher.matches(p))
            .map(|p| checkpoint::lambda_b_key(self.method, p))
            .collect();
        if !untargeted.is_empty() {
            let message = format!(
                "{}: {} module(s) have λ's but target_modules {} does not select them under these names: \
                 {}. Loading fails with UnexpectedTensors unless the model names them so that they match \
                 (check with `pvera inspect --model DIR`); the adapter was probably trained on another \
                 model or module naming scheme",
                self.file,
                untargeted.len(),
                target_list(cfg),
                shown(&untargeted)
            );
            self.problems.push(Problem::Warning(Notice { class: UNTARGETED_LAMBDAS, message }));
        }
    }
}

fn target_list(cfg: &PveraConfig) -> String {
    match &cfg.target_modules {
        Some(TargetModules::List(v)) => format!("{v:?}"),
        Some(TargetModules::Regex(s)) => format!("{s:?}"),
        _ => "null".into(),
    }
}
