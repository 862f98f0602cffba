//! Text data: classification from CSV / JSONL, causal LM from plain text, tokenised with a model's
//! `tokenizer.json` (the `tokenizers` crate, as transformers' fast tokenizers).
//!
//! # Classification files
//! - CSV: a header row naming a `text` and a `label` column (other columns are ignored); RFC 4180
//!   quoting, so fields may hold commas, quotes (`""`) and newlines.
//! - JSONL: one object per line, `{"text": "...", "label": "spam"}` or `"label": 1`; blank lines
//!   are skipped.
//!
//! Labels may be strings or integers. The label map is the sorted set of labels (numerically when
//! every label is an integer, otherwise by string), so the same file gives the same ids on every
//! run; an evaluation file uses the training file's map and refuses labels it does not know.
//!
//! # Tokenisation
//! [`TextTokenizer`] ignores the padding / truncation stored in `tokenizer.json` and applies its
//! own: truncation to `max_length` (special tokens included, as `tokenizer(..., truncation=True,
//! max_length=N)`), padding to the longest sequence of each batch or to `max_length`. Batches hold
//! `input_ids`, `attention_mask` and, for BERT-style tokenizers (a post-processor that gives the
//! second segment type id 1), `token_type_ids`, all i64 `(batch, seq)`.
//!
//! # Causal LM
//! [`CausalLm`] follows transformers' `run_clm.py`: the file is split into lines like the
//! `datasets` text loader (universal newlines, line breaks kept by default), each line is
//! tokenised with special tokens, and every group of 1,000 lines (the `datasets.map` batch) is
//! concatenated and cut into blocks of `block_size` tokens, dropping the remainder (`group_texts`).
//! `labels` equal `input_ids`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::Value;
use tokenizers::{PaddingDirection, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

use super::{check_indices, check_nonempty, class_label_tensor, Batch, Dataset, Task};
use crate::error::{Error, Result};
use crate::models::ModelInputs;

// ---------------------------------------------------------------------------------------------
// Records and labels
// ---------------------------------------------------------------------------------------------

/// One text-classification example as read from a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TextRecord {
    /// The text.
    pub text: String,
    /// The label as written (integers in canonical decimal form).
    pub label: String,
    /// 1-based line where the record starts in its file.
    pub line: usize,
}

/// Column / key names of a classification file.
#[derive(Clone, Debug)]
pub struct Columns {
    /// Text column (default `text`).
    pub text: String,
    /// Label column (default `label`).
    pub label: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns { text: "text".into(), label: "label".into() }
    }
}

fn canonical_label(raw: &str) -> String {
    match raw.trim().parse::<i64>() {
        Ok(n) => n.to_string(),
        Err(_) => raw.to_string(),
    }
}

fn check_record(path: &Path, line: usize, text: &str, label: &str, cols: &Columns) -> Result<()> {
    if text.trim().is_empty() {
        return Err(Error::Data(format!(
            "{}:{line}: empty text in column `{}`; fill it in or remove the record",
            path.display(),
            cols.text
        )));
    }
    if label.trim().is_empty() {
        return Err(Error::Data(format!(
            "{}:{line}: empty label in column `{}`; give every record a label or remove it",
            path.display(),
            cols.label
        )));
    }
    Ok(())
}

/// Reads a CSV file with a header row (RFC 4180 quoting; a UTF-8 BOM is allowed).
pub fn read_csv(path: &Path, cols: &Columns) -> Result<Vec<TextRecord>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut rdr = csv::ReaderBuilder::new().has_headers(true).flexible(false).from_reader(file);
    let headers = rdr
        .headers()
        .map_err(|e| Error::Data(format!("{}: cannot read the CSV header: {e}", path.display())))?
        .clone();
    let find = |name: &str| -> Result<usize> {
        headers.iter().position(|h| h.trim_start_matches('\u{feff}').trim() == name).ok_or_else(|| {
            Error::Data(format!(
                "{}:1: no `{name}` column in the header (columns: {}); the first row must name a `{}` and a `{}` column",
                path.display(),
                headers.iter().map(|h| format!("`{h}`")).collect::<Vec<_>>().join(", "),
                cols.text,
                cols.label
            ))
        })
    };
    let ti = find(&cols.text)?;
    let li = find(&cols.label)?;
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| {
            let line = e.position().map(|p| p.line().to_string()).unwrap_or_else(|| "?".into());
            Error::Data(format!(
                "{}:{line}: malformed CSV record: {e}; quote fields holding commas, quotes or newlines (\"a, b\")",
                path.display()
            ))
        })?;
        let line = rec.position().map_or(0, |p| p.line() as usize);
        let text = rec.get(ti).unwrap_or("");
        let label = rec.get(li).unwrap_or("");
        check_record(path, line, text, label, cols)?;
        out.push(TextRecord { text: text.to_string(), label: canonical_label(label), line });
    }
    if out.is_empty() {
        return Err(Error::Data(format!("{}: no records after the header; the file has no examples", path.display())));
    }
    Ok(out)
}

/// Reads a JSONL file: one `{"text": ..., "label": ...}` object per line.
pub fn read_jsonl(path: &Path, cols: &Columns) -> Result<Vec<TextRecord>> {
    let content = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, raw) in content.lines().enumerate() {
        let line = i + 1;
        let raw = if i == 0 { raw.trim_start_matches('\u{feff}') } else { raw };
        if raw.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(raw).map_err(|e| {
            Error::Data(format!(
                "{}:{line}: not a JSON object ({e}); each line must be one object like {{\"{}\": \"...\", \"{}\": \"...\"}}",
                path.display(),
                cols.text,
                cols.label
            ))
        })?;
        let obj = v.as_object().ok_or_else(|| {
            Error::Data(format!("{}:{line}: a JSON {} where an object was expected", path.display(), kind(&v)))
        })?;
        let text = match obj.get(&cols.text) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(Error::Data(format!(
                    "{}:{line}: `{}` is a {}, expected a string",
                    path.display(),
                    cols.text,
                    kind(other)
                )))
            }
            None => {
                return Err(Error::Data(format!(
                    "{}:{line}: no `{}` key (keys: {}); add the text under `{}`",
                    path.display(),
                    cols.text,
                    obj.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
                    cols.text
                )))
            }
        };
        let label = match obj.get(&cols.label) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(other) => {
                return Err(Error::Data(format!(
                    "{}:{line}: `{}` is {other}, expected a string or an integer",
                    path.display(),
                    cols.label
                )))
            }
            None => {
                return Err(Error::Data(format!(
                    "{}:{line}: no `{}` key (keys: {}); add the class under `{}`",
                    path.display(),
                    cols.label,
                    obj.keys().map(|k| format!("`{k}`")).collect::<Vec<_>>().join(", "),
                    cols.label
                )))
            }
        };
        check_record(path, line, &text, &label, cols)?;
        out.push(TextRecord { text, label: canonical_label(&label), line });
    }
    if out.is_empty() {
        return Err(Error::Data(format!("{}: no records; the file has no examples", path.display())));
    }
    Ok(out)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Reads a classification file, choosing CSV or JSONL by extension (`.csv`; `.jsonl` / `.json`).
pub fn read_records(path: &Path, cols: &Columns) -> Result<Vec<TextRecord>> {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    match ext.as_str() {
        "csv" => read_csv(path, cols),
        "jsonl" | "json" | "ndjson" => read_jsonl(path, cols),
        _ => Err(Error::Data(format!(
            "{}: unknown text data format {ext:?}; use a .csv file with a header or a .jsonl file",
            path.display()
        ))),
    }
}

/// Class names by id. Built from data it is the sorted set of labels (numeric order when all are
/// integers), so ids are reproducible.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LabelMap {
    names: Vec<String>,
}

impl LabelMap {
    /// The sorted distinct labels.
    pub fn from_labels<'a>(labels: impl IntoIterator<Item = &'a str>) -> Self {
        let set: BTreeSet<String> = labels.into_iter().map(canonical_label).collect();
        let mut names: Vec<String> = set.into_iter().collect();
        let ints: Option<Vec<i64>> = names.iter().map(|s| s.parse::<i64>().ok()).collect();
        if let Some(mut ints) = ints {
            ints.sort_unstable();
            names = ints.into_iter().map(|n| n.to_string()).collect();
        }
        LabelMap { names }
    }

    /// A given order of names (e.g. a model's `id2label`); names must be distinct.
    pub fn new(names: Vec<String>) -> Result<Self> {
        let names: Vec<String> = names.iter().map(|n| canonical_label(n)).collect();
        let set: BTreeSet<&String> = names.iter().collect();
        if set.len() != names.len() || names.is_empty() {
            return Err(Error::Data(format!("label map {names:?} is empty or has repeated names")));
        }
        Ok(LabelMap { names })
    }

    /// Names by id.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Number of classes.
    pub fn len(&self) -> usize {
        self.names.len()
    }

    /// True when there are no classes.
    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// The id of a label (integers compared numerically).
    pub fn id(&self, label: &str) -> Option<u32> {
        let c = canonical_label(label);
        self.names.iter().position(|n| *n == c).map(|i| i as u32)
    }
}

// ---------------------------------------------------------------------------------------------
// Tokenizer
// ---------------------------------------------------------------------------------------------

/// How to pad a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Padding {
    /// To the longest sequence of the batch (`padding=True`).
    #[default]
    Longest,
    /// Always to `max_length` (`padding="max_length"`).
    MaxLength,
}

/// Tokenisation options.
#[derive(Clone, Debug, Default)]
pub struct TokenizeOptions {
    /// Truncation length, special tokens included. Default: `tokenizer.json`'s truncation length
    /// when it has one, otherwise 512.
    pub max_length: Option<usize>,
    /// Padding rule.
    pub padding: Padding,
    /// The padding token. Default: `tokenizer.json`'s padding token, else `[PAD]` or `<pad>` when
    /// in the vocabulary. GPT-2 / LLaMA tokenizers have none: give e.g. their EOS token.
    pub pad_token: Option<String>,
    /// Whether batches carry `token_type_ids`. Default: when the post-processor gives the second
    /// segment type id 1 (BERT).
    pub token_type_ids: Option<bool>,
}

/// A `tokenizer.json` with this crate's truncation and padding.
#[derive(Clone)]
pub struct TextTokenizer {
    plain: Tokenizer,
    truncating: Tokenizer,
    path: PathBuf,
    max_length: usize,
    padding: Padding,
    pad: Option<(u32, u32, String)>,
    left_pad: bool,
    type_ids: bool,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("path", &self.path)
            .field("max_length", &self.max_length)
            .field("padding", &self.padding)
            .field("pad", &self.pad)
            .field("token_type_ids", &self.type_ids)
            .finish()
    }
}

fn has_type_ids(post: &Value) -> bool {
    match post {
        Value::Object(m) => {
            match m.get("type").and_then(Value::as_str) {
                Some("BertProcessing") => return true,
                Some("TemplateProcessing") => {
                    let nonzero = |piece: &Value| {
                        piece.as_object().is_some_and(|p| {
                            p.values().any(|inner| inner.get("type_id").and_then(Value::as_u64).is_some_and(|t| t != 0))
                        })
                    };
                    return m.get("pair").and_then(Value::as_array).is_some_and(|a| a.iter().any(nonzero));
                }
                _ => {}
            }
            m.values().any(has_type_ids)
        }
        Value::Array(a) => a.iter().any(has_type_ids),
        _ => false,
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` (a file, or a model directory holding one).
    pub fn from_file(path: &Path, opts: &TokenizeOptions) -> Result<Self> {
        let path = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::io(&path, std::io::Error::new(e.kind(), format!("{e}: the model's tokenizer.json is needed to tokenise text")))
        })?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| Error::ConfigParse { path: path.display().to_string(), reason: e.to_string() })?;
        let mut tok: Tokenizer = text.parse().map_err(|e| {
            Error::Data(format!(
                "{}: not a tokenizers tokenizer.json ({e}); use the tokenizer.json that transformers' fast tokenizer saves",
                path.display()
            ))
        })?;
        let stored_pad = tok.get_padding().cloned();
        let stored_max = tok.get_truncation().map(|t| t.max_length);
        tok.with_padding(None);
        let _ = tok.with_truncation(None);
        let max_length = opts.max_length.or(stored_max).unwrap_or(512);
        if max_length == 0 {
            return Err(Error::Data(format!("{}: max_length must be at least 1", path.display())));
        }
        let mut truncating = tok.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| Error::Data(format!("{}: cannot truncate to {max_length}: {e}", path.display())))?;
        let pad = if let Some(name) = &opts.pad_token {
            let id = tok.token_to_id(name).ok_or_else(|| {
                Error::Data(format!("{}: pad token {name:?} is not in the vocabulary; give a token the tokenizer knows", path.display()))
            })?;
            Some((id, 0, name.clone()))
        } else if let Some(p) = &stored_pad {
            Some((p.pad_id, p.pad_type_id, p.pad_token.clone()))
        } else {
            ["[PAD]", "<pad>"].iter().find_map(|t| tok.token_to_id(t).map(|id| (id, 0, t.to_string())))
        };
        let left_pad = stored_pad.as_ref().is_some_and(|p| matches!(p.direction, PaddingDirection::Left));
        let type_ids = opts
            .token_type_ids
            .unwrap_or_else(|| raw.get("post_processor").is_some_and(has_type_ids));
        Ok(TextTokenizer { plain: tok, truncating, path, max_length, padding: opts.padding, pad, left_pad, type_ids })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Truncation length.
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Whether batches carry `token_type_ids`.
    pub fn returns_token_type_ids(&self) -> bool {
        self.type_ids
    }

    /// The padding token id, if any.
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().map(|p| p.0)
    }

    /// The underlying `tokenizers` tokenizer (no padding or truncation configured).
    pub fn inner(&self) -> &Tokenizer {
        &self.plain
    }

    /// Token ids and type ids of each text, with special tokens, truncated to `max_length` when
    /// `truncate`.
    pub fn encode(&self, texts: &[&str], truncate: bool) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let tok = if truncate { &self.truncating } else { &self.plain };
        let enc = tok
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| Error::Data(format!("{}: tokenisation failed: {e}", self.path.display())))?;
        Ok(enc.into_iter().map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec())).collect())
    }

    /// Pads encoded sequences into `input_ids`, `attention_mask` and (when enabled)
    /// `token_type_ids`, i64 `(batch, seq)` on `device`.
    pub fn pad_batch(&self, seqs: &[(&[u32], &[u32])], device: &Device) -> Result<ModelInputs> {
        let longest = seqs.iter().map(|s| s.0.len()).max().unwrap_or(0);
        let width = match self.padding {
            Padding::Longest => longest,
            Padding::MaxLength => self.max_length.max(longest),
        };
        let needs_pad = seqs.iter().any(|s| s.0.len() < width);
        let (pad_id, pad_type) = match (&self.pad, needs_pad) {
            (Some((id, t, _)), _) => (*id, *t),
            (None, false) => (0, 0),
            (None, true) => {
                return Err(Error::Data(format!(
                    "{}: the tokenizer has no padding token ([PAD] / <pad>) and this batch needs padding; \
                     set pad_token (GPT-2 and LLaMA users usually pad with the EOS token, e.g. \"<|endoftext|>\" or \"</s>\")",
                    self.path.display()
                )))
            }
        };
        let b = seqs.len();
        let mut ids = Vec::with_capacity(b * width);
        let mut mask = Vec::with_capacity(b * width);
        let mut types = Vec::with_capacity(b * width);
        for (s, t) in seqs {
            let pad = width - s.len();
            let push_pad = |ids: &mut Vec<i64>, mask: &mut Vec<i64>, types: &mut Vec<i64>| {
                for _ in 0..pad {
                    ids.push(i64::from(pad_id));
                    mask.push(0);
                    types.push(i64::from(pad_type));
                }
            };
            if self.left_pad {
                push_pad(&mut ids, &mut mask, &mut types);
            }
            ids.extend(s.iter().map(|&x| i64::from(x)));
            mask.extend(std::iter::repeat_n(1i64, s.len()));
            types.extend(t.iter().map(|&x| i64::from(x)));
            if !self.left_pad {
                push_pad(&mut ids, &mut mask, &mut types);
            }
        }
        let input_ids = Tensor::from_vec(ids, (b, width), device)?;
        let attention_mask = Tensor::from_vec(mask, (b, width), device)?;
        let token_type_ids = if self.type_ids { Some(Tensor::from_vec(types, (b, width), device)?) } else { None };
        Ok(ModelInputs { input_ids: Some(input_ids), attention_mask: Some(attention_mask), token_type_ids, pixel_values: None })
    }
}

// ---------------------------------------------------------------------------------------------
// Text classification
// ---------------------------------------------------------------------------------------------

/// A tokenised text-classification set, held in memory.
#[derive(Clone, Debug)]
pub struct TextClassification {
    source: PathBuf,
    texts: Vec<String>,
    lines: Vec<usize>,
    ids: Vec<Vec<u32>>,
    type_ids: Vec<Vec<u32>>,
    labels: Vec<u32>,
    label_map: LabelMap,
    tokenizer: TextTokenizer,
    device: Device,
}

impl TextClassification {
    /// Reads `path` (CSV or JSONL, see [`read_records`]) and tokenises every text. With
    /// `label_map = None` the map is built from this file's labels; otherwise every label must be
    /// in the given map (use the training set's map for evaluation files).
    pub fn from_file(
        path: &Path,
        cols: &Columns,
        tokenizer: &TextTokenizer,
        label_map: Option<LabelMap>,
        device: &Device,
    ) -> Result<Self> {
        let records = read_records(path, cols)?;
        Self::from_records(records, path, tokenizer, label_map, device)
    }

    /// From records already read (`source` names them in errors).
    pub fn from_records(
        records: Vec<TextRecord>,
        source: &Path,
        tokenizer: &TextTokenizer,
        label_map: Option<LabelMap>,
        device: &Device,
    ) -> Result<Self> {
        if records.is_empty() {
            return Err(Error::Data(format!("{}: no records; the data set has no examples", source.display())));
        }
        for r in &records {
            if r.text.trim().is_empty() {
                return Err(Error::Data(format!(
                    "{}:{}: empty text; fill it in or remove the record",
                    source.display(),
                    r.line
                )));
            }
        }
        let label_map = label_map.unwrap_or_else(|| LabelMap::from_labels(records.iter().map(|r| r.label.as_str())));
        let mut labels = Vec::with_capacity(records.len());
        for r in &records {
            let id = label_map.id(&r.label).ok_or_else(|| {
                Error::Data(format!(
                    "{}:{}: unknown label {:?}; known labels: {}; fix the label or build the label map from data that has it",
                    source.display(),
                    r.line,
                    r.label,
                    label_map.names().iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
                ))
            })?;
            labels.push(id);
        }
        if tokenizer.pad.is_none() && records.len() > 1 {
            // Checked up front so a long run does not fail at its first uneven batch.
            return Err(Error::Data(format!(
                "{}: the tokenizer has no padding token ([PAD] / <pad>); set pad_token (GPT-2 and LLaMA users \
                 usually pad with the EOS token)",
                tokenizer.path.display()
            )));
        }
        let texts: Vec<&str> = records.iter().map(|r| r.text.as_str()).collect();
        let encoded = tokenizer.encode(&texts, true)?;
        let (ids, type_ids): (Vec<_>, Vec<_>) = encoded.into_iter().unzip();
        let lines = records.iter().map(|r| r.line).collect();
        let texts = records.into_iter().map(|r| r.text).collect();
        Ok(TextClassification {
            source: source.to_path_buf(),
            texts,
            lines,
            ids,
            type_ids,
            labels,
            label_map,
            tokenizer: tokenizer.clone(),
            device: device.clone(),
        })
    }

    /// The label map (`id2label`).
    pub fn label_map(&self) -> &LabelMap {
        &self.label_map
    }

    /// The text of example `i`.
    pub fn text(&self, i: usize) -> Option<&str> {
        self.texts.get(i).map(String::as_str)
    }

    /// The 1-based line of example `i` in its file.
    pub fn line(&self, i: usize) -> Option<usize> {
        self.lines.get(i).copied()
    }

    /// Token ids of example `i` (with special tokens, truncated).
    pub fn token_ids(&self, i: usize) -> Option<&[u32]> {
        self.ids.get(i).map(Vec::as_slice)
    }

    /// The file the examples came from.
    pub fn source(&self) -> &Path {
        &self.source
    }
}

impl Dataset for TextClassification {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        check_nonempty(indices, "TextClassification::get_batch")?;
        check_indices(indices, self.labels.len(), "TextClassification::get_batch")?;
        let seqs: Vec<(&[u32], &[u32])> =
            indices.iter().map(|&i| (self.ids[i].as_slice(), self.type_ids[i].as_slice())).collect();
        let inputs = self.tokenizer.pad_batch(&seqs, &self.device)?;
        let labels = class_label_tensor(indices.iter().map(|&i| self.labels[i]).collect(), &self.device)?;
        Ok(Batch { inputs, labels })
    }

    fn task(&self) -> Task {
        Task::TextClassification
    }

    fn class_ids(&self) -> Option<&[u32]> {
        Some(&self.labels)
    }

    fn label_names(&self) -> Option<&[String]> {
        Some(self.label_map.names())
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

// ---------------------------------------------------------------------------------------------
// Causal LM
// ---------------------------------------------------------------------------------------------

/// The lines of a text file as `datasets`' text loader yields them: the file is read with
/// Python's universal newlines (`\r\n` and `\r` become `\n`), split after each `\n`, and the
/// `\n` is kept when `keep_linebreaks` (otherwise stripped). Empty lines are kept.
pub fn text_file_lines(text: &str, keep_linebreaks: bool) -> Vec<String> {
    let normalised = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut out: Vec<String> = normalised
        .split_inclusive('\n')
        .map(|l| if keep_linebreaks { l.to_string() } else { l.trim_end_matches('\n').to_string() })
        .collect();
    if out.last().is_some_and(|l| l.is_empty()) {
        out.pop();
    }
    out
}

/// Options of [`CausalLm`].
#[derive(Clone, Debug)]
pub struct CausalLmOptions {
    /// Tokens per block.
    pub block_size: usize,
    /// Keep the line break at the end of each line (run_clm's `keep_linebreaks`, default true).
    pub keep_linebreaks: bool,
    /// Lines concatenated per group before cutting into blocks (datasets' `map` batch, 1000).
    pub group_lines: usize,
}

impl CausalLmOptions {
    /// run_clm's defaults with this block size.
    pub fn new(block_size: usize) -> Self {
        CausalLmOptions { block_size, keep_linebreaks: true, group_lines: 1000 }
    }
}

/// Fixed-length token blocks from a plain text file, held in memory.
#[derive(Clone, Debug)]
pub struct CausalLm {
    tokens: Vec<u32>,
    block_size: usize,
    device: Device,
}

impl CausalLm {
    /// Reads and tokenises a UTF-8 text file.
    pub fn from_text_file(path: &Path, tokenizer: &TextTokenizer, opts: &CausalLmOptions, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| {
            let at = e.utf8_error().valid_up_to();
            let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
            Error::Data(format!("{}:{line}: not valid UTF-8 (byte {at}); re-save the file as UTF-8", path.display()))
        })?;
        Self::from_text(&text, path, tokenizer, opts, device)
    }

    /// Tokenises `text` (`source` names it in errors).
    pub fn from_text(
        text: &str,
        source: &Path,
        tokenizer: &TextTokenizer,
        opts: &CausalLmOptions,
        device: &Device,
    ) -> Result<Self> {
        if opts.block_size == 0 || opts.group_lines == 0 {
            return Err(Error::Data("causal LM: block_size and group_lines must be at least 1".into()));
        }
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let lines = text_file_lines(text, opts.keep_linebreaks);
        let mut tokens = Vec::new();
        let mut total = 0usize;
        for group in lines.chunks(opts.group_lines) {
            let group: Vec<&str> = group.iter().map(String::as_str).collect();
            let enc = tokenizer.encode(&group, false)?;
            let mut concat: Vec<u32> = enc.into_iter().flat_map(|(ids, _)| ids).collect();
            total += concat.len();
            let keep = concat.len() / opts.block_size * opts.block_size;
            concat.truncate(keep);
            tokens.extend(concat);
        }
        if tokens.is_empty() {
            return Err(Error::Data(format!(
                "{}: {total} token(s) in {} line(s), fewer than one block of {} per group of {} lines; \
                 use a smaller block_size or more text",
                source.display(),
                lines.len(),
                opts.block_size,
                opts.group_lines
            )));
        }
        Ok(CausalLm { tokens, block_size: opts.block_size, device: device.clone() })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Block `i`'s tokens.
    pub fn block(&self, i: usize) -> Option<&[u32]> {
        let b = self.block_size;
        (i < self.len()).then(|| &self.tokens[i * b..(i + 1) * b])
    }
}

impl Dataset for CausalLm {
    fn len(&self) -> usize {
        self.tokens.len() / self.block_size
    }

    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        check_nonempty(indices, "CausalLm::get_batch")?;
        check_indices(indices, self.len(), "CausalLm::get_batch")?;
        let b = self.block_size;
        let mut ids = Vec::with_capacity(indices.len() * b);
        for &i in indices {
            ids.extend(self.tokens[i * b..(i + 1) * b].iter().map(|&t| i64::from(t)));
        }
        let shape = (indices.len(), b);
        let input_ids = Tensor::from_vec(ids, shape, &self.device)?;
        let attention_mask = Tensor::ones(shape, candle_core::DType::I64, &self.device)?;
        let labels = input_ids.clone();
        Ok(Batch {
            inputs: ModelInputs { input_ids: Some(input_ids), attention_mask: Some(attention_mask), ..Default::default() },
            labels,
        })
    }

    fn task(&self) -> Task {
        Task::CausalLm
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_the_datasets_text_loader() {
        assert_eq!(text_file_lines("a\nb\r\nc\rd", true), vec!["a\n", "b\n", "c\n", "d"]);
        assert_eq!(text_file_lines("a\n\nb\n", false), vec!["a", "", "b"]);
        assert_eq!(text_file_lines("", true), Vec::<String>::new());
        assert_eq!(text_file_lines("x\u{2028}y", false), vec!["x\u{2028}y"]);
    }

    #[test]
    fn label_maps_sort_numbers_numerically() {
        let m = LabelMap::from_labels(["10", "9", "2"]);
        assert_eq!(m.names(), ["2", "9", "10"]);
        let m = LabelMap::from_labels(["spam", "ham", "spam"]);
        assert_eq!(m.names(), ["ham", "spam"]);
        assert_eq!(m.id("spam"), Some(1));
        assert_eq!(LabelMap::from_labels(["01", "1"]).len(), 1);
    }
}
