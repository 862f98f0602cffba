//! Task metadata that travels with an adapter: `pvera_task.json`, `labels.json` and the run's
//! `split.json`, written and read only here.
//!
//! `pvera train` writes `pvera_task.json` and `labels.json` into every adapter directory it
//! creates (`best/`, `last/`) and into the run folder, so an adapter folder shipped alone carries
//! what predicting with it needs: label names, pooling, the maximum text length it was trained
//! with. `split.json` (run folder) records which examples trained, validated or were left unused,
//! with a fingerprint of the data file so `pvera eval --held-out-of` and `--resume` can tell the
//! same data from a reshuffled copy of the same size.
//!
//! Adapters trained elsewhere (PEFT) carry no such files; [`resolve`] then derives what it can from
//! `adapter_config.json` (`task_type`, `auto_mapping.base_model_class`) and the model's
//! `config.json` (`id2label`), and says in a warning what it had to assume.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::write_atomic;
use crate::config::PveraConfig;
use crate::error::{Error, Result};
use crate::models::heads::Pooling;
use crate::models::loader::ModelDir;

/// File name of the task metadata.
pub const TASK_FILE: &str = "pvera_task.json";
/// File name of the label list (a JSON array of names in class-id order).
pub const LABELS_FILE: &str = "labels.json";
/// File name of the split record (run folder).
pub const SPLIT_FILE: &str = "split.json";

/// What an adapter was trained to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TaskKind {
    /// Images -> one class each (ViT, DINOv2).
    ImageClassification,
    /// Texts -> one class each (BERT, RoBERTa).
    TextClassification,
    /// Next-token prediction (LLaMA, GPT-2).
    CausalLm,
}

impl TaskKind {
    /// The name used on the command line and in `pvera_task.json`.
    pub fn name(self) -> &'static str {
        match self {
            TaskKind::ImageClassification => "image-classification",
            TaskKind::TextClassification => "text-classification",
            TaskKind::CausalLm => "causal-lm",
        }
    }
}

/// `pvera_task.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TaskMeta {
    /// The task.
    pub task: TaskKind,
    /// The base model's `model_type` (bert, vit, dinov2, ...).
    pub model_type: String,
    /// Label names in class-id order (classification).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// Pooling of the classification head (`cls`, `pooler`, `mean`, `cls-mean-patch`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<String>,
    /// Maximum tokens per text the adapter was trained with (text tasks; causal LM: block size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
}

impl TaskMeta {
    /// Reads `dir/pvera_task.json`; `Ok(None)` when the file does not exist.
    pub fn read(dir: &Path) -> Result<Option<TaskMeta>> {
        let path = dir.join(TASK_FILE);
        let Some(text) = read_optional(&path)? else { return Ok(None) };
        let meta: TaskMeta = serde_json::from_str(&text).map_err(|e| Error::ConfigParse {
            path: path.display().to_string(),
            reason: format!(
                "{e}; expected {{\"task\": \"text-classification\"|\"image-classification\"|\"causal-lm\", \
                 \"model_type\": ..., \"labels\": [...], \"pooling\": ..., \"max_length\": ...}} as pvera train \
                 writes it (delete the file to fall back on flags)"
            ),
        })?;
        if let Some(p) = &meta.pooling {
            if Pooling::from_name(p).is_none() {
                return Err(Error::ConfigParse {
                    path: path.display().to_string(),
                    reason: format!("`pooling` {p:?}: expected cls, pooler, mean or cls-mean-patch"),
                });
            }
        }
        Ok(Some(meta))
    }

    /// Writes `pvera_task.json` and (for classification) `labels.json` into `dir` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        write_json(&dir.join(TASK_FILE), self)?;
        if !self.labels.is_empty() {
            write_json(&dir.join(LABELS_FILE), &self.labels)?;
        }
        Ok(())
    }

    /// The pooling as a value (`None` when not recorded).
    pub fn pooling(&self) -> Option<Pooling> {
        self.pooling.as_deref().and_then(Pooling::from_name)
    }
}

/// Reads `dir/labels.json` (a JSON list of names); `Ok(None)` when absent.
pub fn read_labels(path: &Path) -> Result<Option<Vec<String>>> {
    let Some(text) = read_optional(path)? else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::ConfigParse { path: path.display().to_string(), reason: e.to_string() })?;
    label_list(&v)
        .map(Some)
        .ok_or_else(|| Error::ConfigParse {
            path: path.display().to_string(),
            reason: "expected a JSON list of label names in class-id order, e.g. [\"ham\", \"spam\"]".into(),
        })
}

/// A JSON array of names (numbers are accepted and written as text).
pub fn label_list(v: &serde_json::Value) -> Option<Vec<String>> {
    v.as_array()?
        .iter()
        .map(|x| match x {
            serde_json::Value::String(s) => Some(s.clone()),
            serde_json::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .collect()
}

/// `split.json`: which examples of the data set trained, validated or were left unused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SplitRecord {
    /// The data path as given to `pvera train`.
    pub data: String,
    /// Number of examples in the data set.
    pub examples: usize,
    /// The split seed.
    pub seed: u64,
    /// Fingerprint of the data's contents ([`data_fingerprint`]); absent in files written before
    /// it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_sha256: Option<String>,
    /// Training examples (indices into the data set).
    pub train: Vec<usize>,
    /// Validation examples.
    pub validation: Vec<usize>,
    /// Examples neither trained nor validated on (a held-out pool).
    pub unused: Vec<usize>,
}

impl SplitRecord {
    /// Reads `run_dir/split.json`.
    pub fn read(run_dir: &Path) -> Result<SplitRecord> {
        let path = run_dir.join(SPLIT_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            let hint = if run_dir.join(crate::checkpoint::CONFIG_NAME).is_file() {
                " (this is an adapter folder; pass the run folder pvera train --output wrote, its parent)"
            } else {
                " (pass the folder pvera train --output wrote)"
            };
            Error::io(&path, std::io::Error::new(e.kind(), format!("cannot read the split record{hint}")))
        })?;
        serde_json::from_str(&text).map_err(|e| Error::ConfigParse { path: path.display().to_string(), reason: e.to_string() })
    }

    /// Writes `run_dir/split.json` atomically.
    pub fn write(&self, run_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let bytes = serde_json::to_string(self).map_err(|e| Error::Model(format!("serialising split.json: {e}")))? + "\n";
        write_atomic(&run_dir.join(SPLIT_FILE), bytes.as_bytes())
    }

    /// Checks that `data` (with `examples` examples and fingerprint `sha256`) is the data set this
    /// split was made of. `flag` names the option that pointed here (for the message).
    pub fn check_same_data(&self, data: &Path, examples: usize, sha256: &str, flag: &str) -> Result<()> {
        if self.examples != examples {
            return Err(Error::Data(format!(
                "{flag}: the split is of {} examples but --data {} has {examples}; pass the data set that run \
                 trained on ({})",
                self.examples,
                data.display(),
                self.data
            )));
        }
        match &self.data_sha256 {
            Some(want) if want != sha256 => Err(Error::Data(format!(
                "{flag}: --data {} is not the data set that run trained on: its contents differ (sha256 {} vs {} \
                 recorded for {}), e.g. a shuffled or edited copy, so \"unused\" indices would name other \
                 examples; pass the very file the run trained on",
                data.display(),
                short_hash(sha256),
                short_hash(want),
                self.data
            ))),
            _ => Ok(()),
        }
    }
}

/// The first 12 hex digits of a fingerprint (for messages).
pub fn short_hash(h: &str) -> &str {
    &h[..h.len().min(12)]
}

/// A SHA-256 fingerprint of a data set's contents: the bytes of a file, or for a folder every
/// file below it (relative path and bytes, in sorted path order). Hidden files are skipped.
pub fn data_fingerprint(path: &Path) -> Result<String> {
    let mut h = Sha256::new();
    if path.is_dir() {
        let mut files = Vec::new();
        collect_files(path, &mut files)?;
        files.sort();
        for f in files {
            let rel = f.strip_prefix(path).unwrap_or(&f).to_string_lossy().replace('\\', "/");
            h.update((rel.len() as u64).to_le_bytes());
            h.update(rel.as_bytes());
            hash_file(&f, &mut h)?;
        }
    } else {
        hash_file(path, &mut h)?;
    }
    Ok(hex(&h.finalize()))
}

/// SHA-256 of a byte string, as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hash_file(path: &Path, h: &mut Sha256) -> Result<()> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = vec![0u8; 1 << 16];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
    h.update(len.to_le_bytes());
    Ok(())
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        let p = e.path();
        if e.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        if p.is_dir() {
            collect_files(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(Some(t)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn write_json<T: Serialize + ?Sized>(path: &Path, v: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(v).map_err(|e| Error::Model(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, (text + "\n").as_bytes())
}

/// Where a piece of task metadata came from (for messages and `pvera predict --json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A command-line flag or API option.
    Given,
    /// `pvera_task.json` / `labels.json` in the adapter directory.
    AdapterDir,
    /// `pvera_task.json` / `labels.json` in the adapter directory's parent (runs of older pvera
    /// versions kept them in the run folder only).
    ParentDir,
    /// Derived from `adapter_config.json` (`task_type`, `auto_mapping`).
    AdapterConfig,
    /// The model's `config.json` (`id2label`) or the tokenizer.
    Model,
    /// Nothing said it: a default was assumed (a warning says which).
    Assumed,
}

/// The task metadata an adapter is predicted with, each piece with where it came from.
#[derive(Clone, Debug)]
pub struct ResolvedTask {
    /// Label names in class-id order.
    pub labels: Vec<String>,
    /// Where the labels came from.
    pub labels_source: Source,
    /// Pooling.
    pub pooling: Pooling,
    /// Where the pooling came from.
    pub pooling_source: Source,
    /// Maximum text length (`None`: the tokenizer's own).
    pub max_length: Option<usize>,
    /// Where the maximum length came from.
    pub max_length_source: Source,
    /// What had to be assumed, as sentences for the user.
    pub warnings: Vec<String>,
}

/// Overrides for [`resolve`] (command-line flags).
#[derive(Clone, Debug, Default)]
pub struct TaskOverrides {
    /// Label names.
    pub labels: Option<Vec<String>>,
    /// Pooling.
    pub pooling: Option<Pooling>,
    /// Maximum tokens per text.
    pub max_length: Option<usize>,
}

/// The transformers class an adapter was trained on, from `auto_mapping.base_model_class` or
/// PEFT's `task_type` and the model type.
pub fn trained_class(config: &PveraConfig, model_type: &str) -> Option<String> {
    if let Some(c) = config
        .auto_mapping
        .as_ref()
        .and_then(|m| m.get("base_model_class"))
        .and_then(|v| v.as_str())
    {
        return Some(c.to_string());
    }
    let family = match model_type {
        "bert" => "Bert",
        "roberta" => "Roberta",
        "vit" => "ViT",
        "dinov2" => "Dinov2",
        "llama" => "Llama",
        "gpt2" => "GPT2",
        _ => return None,
    };
    match config.task_type.as_deref() {
        Some("SEQ_CLS") => Some(format!("{family}ForSequenceClassification")),
        Some("CAUSAL_LM") => Some(if family == "GPT2" { "GPT2LMHeadModel".into() } else { format!("{family}ForCausalLM") }),
        _ => None,
    }
}

/// The pooling a transformers classification class applies before its `classifier`, or an error
/// for classes whose head pvera does not implement.
fn pooling_of_class(class: &str) -> Option<Result<Pooling>> {
    Some(match class {
        "BertForSequenceClassification" => Ok(Pooling::Pooler),
        "ViTForImageClassification" => Ok(Pooling::Cls),
        "Dinov2ForImageClassification" => Ok(Pooling::ClsMeanPatch),
        "RobertaForSequenceClassification" | "XLMRobertaForSequenceClassification" => Err(Error::UnsupportedModel {
            path: "adapter_config.json".into(),
            reason: format!(
                "the adapter was trained on {class}, whose head (dense + tanh + out_proj on the first token) \
                 pvera does not implement; pvera predicts with a single `classifier` linear layer on a pooled \
                 output"
            ),
        }),
        _ => return None,
    })
}

/// Resolves labels, pooling and maximum length for the adapter in `adapter_dir` on the model in
/// `model`: flags first, then `pvera_task.json` / `labels.json` in the adapter directory, then in
/// its parent (with a warning), then what `adapter_config.json` says it was trained on, then the
/// model's `id2label`; anything still unknown is a default named in a warning. `head_outputs`
/// (the trained head's output count, when known) names labels `LABEL_i` when nothing else does.
pub fn resolve(
    adapter_dir: &Path,
    config: &PveraConfig,
    model: &ModelDir,
    overrides: &TaskOverrides,
    head_outputs: Option<usize>,
) -> Result<ResolvedTask> {
    let mut warnings = Vec::new();
    let mt = model.model_type.as_str();
    // Task files: the adapter directory, else its parent (older runs).
    let mut meta = None;
    let mut file_labels = None;
    let mut file_source = Source::AdapterDir;
    let parent = adapter_dir.parent().filter(|p| !p.as_os_str().is_empty());
    for (dir, source) in [(Some(adapter_dir), Source::AdapterDir), (parent, Source::ParentDir)] {
        let Some(dir) = dir else { continue };
        let m = TaskMeta::read(dir)?;
        let l = read_labels(&dir.join(LABELS_FILE))?;
        if m.is_some() || l.is_some() {
            if source == Source::ParentDir {
                warnings.push(format!(
                    "{} has no {TASK_FILE}; using the one in its parent {} (copy {TASK_FILE} and {LABELS_FILE} \
                     into the adapter folder before shipping it alone)",
                    adapter_dir.display(),
                    dir.display()
                ));
            }
            meta = m;
            file_labels = l;
            file_source = source;
            break;
        }
    }
    if let Some(m) = &meta {
        if m.model_type != mt && !(matches!((m.model_type.as_str(), mt), ("bert", "roberta") | ("roberta", "bert"))) {
            warnings.push(format!(
                "{TASK_FILE} says the adapter was trained on a {:?} model but --model is a {mt:?} model",
                m.model_type
            ));
        }
    }
    let class = trained_class(config, mt);

    // Labels.
    let (labels, labels_source) = if let Some(l) = &overrides.labels {
        (l.clone(), Source::Given)
    } else if let Some(l) = meta.as_ref().map(|m| m.labels.clone()).filter(|l| !l.is_empty()) {
        (l, file_source.clone())
    } else if let Some(l) = file_labels {
        (l, file_source.clone())
    } else if let Some(l) = id2label(model) {
        (l, Source::Model)
    } else if let Some(n) = head_outputs {
        let l: Vec<String> = (0..n).map(|i| format!("LABEL_{i}")).collect();
        warnings.push(format!(
            "no label names: no {TASK_FILE} / {LABELS_FILE} in {} and no id2label in the model's config.json; \
             naming the head's {n} outputs LABEL_0..LABEL_{} (pass --labels a,b,... to name them)",
            adapter_dir.display(),
            n.saturating_sub(1)
        ));
        (l, Source::Assumed)
    } else {
        return Err(Error::Data(format!(
            "no label names: none of {TASK_FILE} / {LABELS_FILE} in {} or its parent, and no id2label in the \
             model's config.json; pass --labels a,b,c (in class-id order) or --labels labels.json",
            adapter_dir.display()
        )));
    };

    // Pooling.
    let (pooling, pooling_source) = if let Some(p) = overrides.pooling {
        (p, Source::Given)
    } else if let Some(p) = meta.as_ref().and_then(TaskMeta::pooling) {
        (p, file_source.clone())
    } else if let Some(p) = class.as_deref().and_then(pooling_of_class) {
        (p?, Source::AdapterConfig)
    } else {
        let p = Pooling::default_for(mt);
        warnings.push(format!(
            "{} does not say how its head pools the model's outputs (no {TASK_FILE}, and adapter_config.json names \
             no task class); assuming {} pooling (pvera train's default for {mt}); pass --pooling to choose",
            adapter_dir.display(),
            p.name()
        ));
        (p, Source::Assumed)
    };

    // Maximum text length.
    let text = matches!(mt, "bert" | "roberta");
    let (max_length, max_length_source) = if let Some(n) = overrides.max_length {
        (Some(n), Source::Given)
    } else if let Some(n) = meta.as_ref().and_then(|m| m.max_length) {
        (Some(n), file_source.clone())
    } else {
        if text {
            warnings.push(format!(
                "{} does not record the maximum text length it was trained with (no {TASK_FILE}); using the \
                 tokenizer's own; pass --max-length to choose",
                adapter_dir.display()
            ));
        }
        (None, if text { Source::Assumed } else { Source::Model })
    };
    Ok(ResolvedTask { labels, labels_source, pooling, pooling_source, max_length, max_length_source, warnings })
}

/// The model's `id2label` as a list in id order (when it is complete: ids 0..n).
pub fn id2label(dir: &ModelDir) -> Option<Vec<String>> {
    let m = dir.config.get("id2label")?.as_object()?;
    let mut v: Vec<(usize, String)> =
        m.iter().filter_map(|(k, x)| Some((k.parse().ok()?, x.as_str()?.to_string()))).collect();
    v.sort();
    (v.iter().enumerate().all(|(i, (k, _))| i == *k) && !v.is_empty()).then(|| v.into_iter().map(|x| x.1).collect())
}
