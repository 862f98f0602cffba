//! A labelled classification data set opened as a whole: the examples, the label names, and a
//! short description of each example for printouts; plus the split a training run makes of it
//! and the tokenizer a text model reads it with.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;

use super::images::{ImageFolder, ImagePreprocess};
use super::split::{train_size_subset, train_val_split, Split, ValSize};
use super::text::{Columns, LabelMap, TextClassification, TextTokenizer, TokenizeOptions};
use super::{open_image_classification, Dataset};
use crate::error::{Error, Result};
use crate::models::loader::ModelDir;

/// How examples are turned into model inputs.
#[derive(Clone, Copy, Debug)]
pub enum Encoder<'a> {
    /// Texts, tokenised.
    Text(&'a TextTokenizer),
    /// Images, preprocessed.
    Image(&'a ImagePreprocess),
}

/// A labelled data set with its label names and a description of each example.
pub struct LabelledSet {
    /// The examples.
    pub data: Arc<dyn Dataset>,
    /// Label names in class-id order.
    pub labels: Vec<String>,
    describe: Box<dyn Fn(usize) -> String + Send + Sync>,
}

impl std::fmt::Debug for LabelledSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LabelledSet").field("examples", &self.data.len()).field("labels", &self.labels).finish()
    }
}

impl LabelledSet {
    /// A short description of example `i` (a text's first words, an image's file, `#i`).
    pub fn describe(&self, i: usize) -> String {
        (self.describe)(i)
    }

    /// Opens `path`: CSV / JSONL (`text`, `label`) with a text encoder (labels from `map`, else
    /// from the data), or with an image encoder an IDX file or folder or a folder of class
    /// sub-folders (every image's header checked now, so a broken file fails before training).
    pub fn open(path: &Path, encoder: Encoder<'_>, map: Option<LabelMap>, device: &Device) -> Result<LabelledSet> {
        if !path.exists() {
            return Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such data file or folder")));
        }
        match encoder {
            Encoder::Text(tok) => {
                let ds = Arc::new(TextClassification::from_file(path, &Columns::default(), tok, map, device)?);
                let labels = ds.label_map().names().to_vec();
                let d2 = ds.clone();
                Ok(LabelledSet { data: ds, labels, describe: Box::new(move |i| snippet(d2.text(i).unwrap_or(""), 60)) })
            }
            Encoder::Image(pre) => {
                let is_idx = path.is_file()
                    || ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"].iter().any(|f| path.join(f).is_file());
                if is_idx {
                    let ds = open_image_classification(path, pre.clone(), device)?;
                    let labels = ds.label_names().map(<[String]>::to_vec).unwrap_or_default();
                    return Ok(LabelledSet { data: ds, labels, describe: Box::new(|i| format!("#{i}")) });
                }
                let ds = Arc::new(ImageFolder::open(path, pre.clone(), device)?);
                super::images::check_image_files(ds.paths())?;
                let labels = ds.classes().to_vec();
                let d2 = ds.clone();
                let root: PathBuf = path.to_path_buf();
                Ok(LabelledSet {
                    data: ds,
                    labels,
                    describe: Box::new(move |i| {
                        d2.paths().get(i).map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string()).unwrap_or_default()
                    }),
                })
            }
        }
    }
}

/// `s` on one line, cut to `n` characters with an ellipsis.
pub fn snippet(s: &str, n: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > n {
        format!("{}…", flat.chars().take(n).collect::<String>())
    } else {
        flat
    }
}

/// The split of a training run over `n` examples: with `train_size`, VTAB-1k style (that many
/// examples, 80 % train, 20 % validation, the rest unused); else `val_fraction` of all for
/// validation (0: none). Stratified by class when `stratify` gives the class ids.
pub fn training_split(
    n: usize,
    train_size: Option<usize>,
    val_fraction: f64,
    seed: u64,
    stratify: Option<&[u32]>,
) -> Result<Split> {
    if let Some(k) = train_size {
        if k < 2 {
            return Err(Error::Request(format!("train size {k}: needs at least 2 examples (80 % train, 20 % validation)")));
        }
        if k > n {
            return Err(Error::Request(format!("train size {k}: the data has only {n} example(s)")));
        }
        return train_size_subset(n, k, seed, stratify);
    }
    if val_fraction == 0.0 {
        return Ok(Split { train: (0..n).collect(), val: Vec::new(), rest: Vec::new() });
    }
    if !(val_fraction > 0.0 && val_fraction < 1.0) {
        return Err(Error::Request(format!("validation fraction {val_fraction}: must be in [0, 1)")));
    }
    train_val_split(n, ValSize::Fraction(val_fraction), seed, stratify)
        .map_err(|e| Error::Request(format!("{e} ({n} example(s))")))
}

/// The longest token sequence a model's position embeddings allow (BERT-style encoders: RoBERTa's
/// start after the padding index; GPT-2's `n_positions`).
pub fn max_positions(dir: &ModelDir) -> Option<usize> {
    let max = dir.config.get("max_position_embeddings").or_else(|| dir.config.get("n_positions"))?.as_u64()? as usize;
    Some(if dir.model_type == "roberta" {
        let pad = dir.config.get("pad_token_id").and_then(|p| p.as_u64()).unwrap_or(1) as usize;
        max.saturating_sub(pad + 1)
    } else {
        max
    })
}

/// The tokenizer of a model (`tokenizer` or `<model>/tokenizer.json`) truncating to `max_length`,
/// else to its own length capped at the model's positions (a tokenizer saved with 512 on a smaller
/// model would otherwise feed texts the model cannot read).
pub fn model_tokenizer(
    dir: &ModelDir,
    tokenizer: Option<&Path>,
    max_length: Option<usize>,
    pad_token: Option<String>,
) -> Result<TextTokenizer> {
    let path = tokenizer.map(Path::to_path_buf).unwrap_or_else(|| dir.path.join("tokenizer.json"));
    if !path.is_file() {
        return Err(Error::io(
            &path,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no tokenizer.json; put the model's tokenizer.json there or pass --tokenizer PATH",
            ),
        ));
    }
    let mut opts = TokenizeOptions { max_length, pad_token, ..TokenizeOptions::default() };
    let tok = TextTokenizer::from_file(&path, &opts)?;
    match max_positions(dir) {
        Some(max) if max_length.is_none() && tok.max_length() > max => {
            opts.max_length = Some(max);
            TextTokenizer::from_file(&path, &opts)
        }
        _ => Ok(tok),
    }
}
