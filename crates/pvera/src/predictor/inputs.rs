//! Where the inputs of a prediction come from: image files and folders, texts, text files,
//! labelled data sets, and the out-of-distribution sets of `pvera eval --ood` (image folders, IDX
//! files, `noise:N`, text files). Everything is opened and checked before the first forward, so a
//! bad path fails in a second, not after an hour of in-distribution predictions.

use std::path::{Path, PathBuf};
use std::sync::Arc;


use super::{Modality, Predictor};
pub use crate::data::images::check_image_files;
use crate::data::images::{decode_image_file, RawImage};
use crate::data::text::{read_records, Columns, LabelMap, TextClassification};
use crate::data::{open_image_classification, Dataset};
use crate::error::{Error, Result};
use crate::models::ModelInputs;
use crate::rng::TorchGenerator;

/// File extensions read as images.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Whether a path names a PNG or JPEG file (by extension).
pub fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files under `dir`, recursively, sorted.
pub fn images_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let p = e.map_err(|e| Error::io(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if is_image(&p) {
                out.push(p);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Image inputs given as files and folders (folders searched recursively), checked.
pub fn image_files(specs: &[String]) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for i in specs {
        let p = PathBuf::from(i);
        if p.is_dir() {
            let found = images_under(&p)?;
            if found.is_empty() {
                return Err(Error::Request(format!("{i}: a folder without PNG/JPEG images")));
            }
            files.extend(found);
        } else if p.is_file() {
            files.push(p);
        } else {
            return Err(Error::io(
                &p,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such image file or folder"),
            ));
        }
    }
    check_image_files(&files)?;
    Ok(files)
}

/// Texts of a text file: one per non-empty line (`.txt` and others), the `text` field of each
/// JSON line (`.jsonl`), or the `text` column (`.csv`).
pub fn text_file(path: &Path) -> Result<Vec<String>> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
    if ext == "csv" {
        return Ok(read_records(path, &Columns::default())?.into_iter().map(|r| r.text).collect());
    }
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let raw = String::from_utf8(raw)
        .map_err(|e| Error::Data(format!("{}: not UTF-8 text (byte {}); save it as UTF-8", path.display(), e.utf8_error().valid_up_to())))?;
    if ext == "jsonl" {
        return raw
            .lines()
            .enumerate()
            .filter(|(_, x)| !x.trim().is_empty())
            .map(|(k, x)| {
                let v: serde_json::Value = serde_json::from_str(x)
                    .map_err(|e| Error::Data(format!("{}:{}: not a JSON object: {e}", path.display(), k + 1)))?;
                v.get("text")
                    .and_then(|t| t.as_str())
                    .map(String::from)
                    .ok_or_else(|| Error::Data(format!("{}:{}: no string field \"text\"", path.display(), k + 1)))
            })
            .collect();
    }
    Ok(raw.lines().filter(|x| !x.trim().is_empty()).map(String::from).collect())
}

/// Up to `limit` of `n` indices: a seeded random subset (`torch.randperm` order), or all in
/// order.
pub fn subset(n: usize, limit: Option<usize>, seed: u64) -> Vec<usize> {
    match limit {
        Some(k) if k < n => crate::data::split::randperm(n, seed).into_iter().take(k).collect(),
        _ => (0..n).collect(),
    }
}

/// A set of unlabelled inputs, opened and checked up front, encoded batch by batch.
pub enum InputSet {
    /// Texts.
    Texts(Vec<String>),
    /// Image files.
    Files(Vec<PathBuf>),
    /// Images of an IDX file (grey pixels), the chosen ones.
    Idx {
        /// Every image's pixels, `(count, rows, cols)` row-major.
        data: Vec<u8>,
        /// Image height.
        rows: usize,
        /// Image width.
        cols: usize,
        /// The images used, by index into the file.
        indices: Vec<usize>,
    },
    /// `n` uniform-noise RGB images (224²), reproducible from the seed.
    Noise {
        /// Number of images.
        n: usize,
        /// Seed (image `i` uses its own generator derived from it).
        seed: u64,
    },
}

impl InputSet {
    /// Number of inputs.
    pub fn len(&self) -> usize {
        match self {
            InputSet::Texts(t) => t.len(),
            InputSet::Files(f) => f.len(),
            InputSet::Idx { indices, .. } => indices.len(),
            InputSet::Noise { n, .. } => *n,
        }
    }

    /// True when there are no inputs.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A name per input (texts, file names, `#i`).
    pub fn names(&self) -> Vec<String> {
        match self {
            InputSet::Texts(t) => t.clone(),
            InputSet::Files(f) => f.iter().map(|p| p.display().to_string()).collect(),
            InputSet::Idx { indices, .. } => indices.iter().map(|i| format!("#{i}")).collect(),
            InputSet::Noise { n, .. } => (0..*n).map(|i| format!("noise#{i}")).collect(),
        }
    }

    /// An out-of-distribution set of `pvera eval --ood SPEC`: `noise:N`, an IDX images file, an
    /// image folder, or (text models) a text file; at most `limit` inputs (seeded subset).
    pub fn open_ood(spec: &str, modality: Modality, limit: Option<usize>, seed: u64) -> Result<InputSet> {
        let p = PathBuf::from(spec);
        match modality {
            Modality::Image => {
                if let Some(n) = spec.strip_prefix("noise:") {
                    let n: usize = n
                        .parse()
                        .map_err(|_| Error::Request(format!("--ood {spec}: expected noise:N with N a number of images")))?;
                    if n == 0 {
                        return Err(Error::Request(format!("--ood {spec}: N must be at least 1")));
                    }
                    return Ok(InputSet::Noise { n: limit.map_or(n, |k| k.min(n)), seed });
                }
                if p.is_file() && spec.contains("-images-idx3-ubyte") {
                    let arr = crate::data::idx::read_idx(&p, 3)?;
                    let (count, rows, cols) = (arr.dims[0], arr.dims[1], arr.dims[2]);
                    return Ok(InputSet::Idx { data: arr.data, rows, cols, indices: subset(count, limit, seed) });
                }
                if p.is_dir() {
                    let files = images_under(&p)?;
                    if files.is_empty() {
                        return Err(Error::Request(format!("--ood {spec}: a folder without PNG/JPEG images")));
                    }
                    let idx = subset(files.len(), limit, seed);
                    let files: Vec<PathBuf> = idx.into_iter().map(|i| files[i].clone()).collect();
                    check_image_files(&files)?;
                    return Ok(InputSet::Files(files));
                }
                if !p.exists() {
                    return Err(Error::io(
                        &p,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("--ood {spec}: no such file or folder (expected an image folder, an IDX images file or noise:N)"),
                        ),
                    ));
                }
                Err(Error::Request(format!(
                    "--ood {spec}: expected an image folder, an IDX images file (*-images-idx3-ubyte[.gz]) or noise:N"
                )))
            }
            Modality::Text => {
                if spec.starts_with("noise:") {
                    return Err(Error::Request(format!(
                        "--ood {spec}: noise:N makes random images, for image models; a text model takes a text file \
                         (.txt one text per line, .jsonl / .csv with a `text` field)"
                    )));
                }
                if !p.is_file() {
                    return Err(Error::io(
                        &p,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("--ood {spec}: no such text file (.txt one text per line, .jsonl / .csv `text`)"),
                        ),
                    ));
                }
                let texts = text_file(&p)?;
                if texts.is_empty() {
                    return Err(Error::Request(format!("--ood {spec}: no texts found")));
                }
                let idx = subset(texts.len(), limit, seed);
                Ok(InputSet::Texts(idx.into_iter().map(|i| texts[i].clone()).collect()))
            }
        }
    }

    /// Encodes the inputs at `positions` for `adapter` (texts truncated to its length).
    pub fn encode(&self, p: &Predictor, adapter: &str, positions: &[usize]) -> Result<ModelInputs> {
        match self {
            InputSet::Texts(t) => {
                let batch: Vec<&str> = positions.iter().map(|&i| t[i].as_str()).collect();
                p.encode_texts(adapter, &batch, true)
            }
            InputSet::Files(f) => {
                let imgs: Vec<RawImage> = positions.iter().map(|&i| decode_image_file(&f[i])).collect::<Result<_>>()?;
                p.encode_images(&imgs.iter().collect::<Vec<_>>())
            }
            InputSet::Idx { data, rows, cols, indices } => {
                let sz = rows * cols;
                let imgs: Vec<RawImage> = positions
                    .iter()
                    .map(|&i| RawImage::new(*cols, *rows, 1, data[indices[i] * sz..(indices[i] + 1) * sz].to_vec()))
                    .collect::<Result<_>>()?;
                p.encode_images(&imgs.iter().collect::<Vec<_>>())
            }
            InputSet::Noise { seed, .. } => {
                let imgs: Vec<RawImage> = positions
                    .iter()
                    .map(|&i| {
                        // uniform RGB noise, one generator per image: reproducible from the seed
                        let mut g = TorchGenerator::new(seed.wrapping_add(1_000_003 * i as u64 + 17));
                        let (w, h) = (224, 224);
                        let bytes: Vec<u8> = (0..w * h * 3).map(|_| (g.random() & 0xff) as u8).collect();
                        RawImage::new(w, h, 3, bytes)
                    })
                    .collect::<Result<_>>()?;
                p.encode_images(&imgs.iter().collect::<Vec<_>>())
            }
        }
    }
}

/// A labelled data set opened for `adapter`: texts tokenised to its length with its label map,
/// images with the model's preprocessing (class names checked against the adapter's labels).
pub fn labelled_data(p: &Predictor, adapter: &str, data: &Path) -> Result<Arc<dyn Dataset>> {
    let labels = p.adapter(adapter)?.labels().to_vec();
    if !data.exists() {
        return Err(Error::io(data, std::io::Error::new(std::io::ErrorKind::NotFound, "no such data file or folder")));
    }
    match p.modality() {
        Modality::Text => {
            let tok = p.text_tokenizer(adapter)?;
            Ok(Arc::new(TextClassification::from_file(data, &Columns::default(), &tok, Some(LabelMap::new(labels)?), p.device())?))
        }
        Modality::Image => {
            let pre = p.image_preprocess().cloned().ok_or_else(|| Error::Request("not an image model".into()))?;
            let d = open_image_classification(data, pre, p.device())?;
            if let Some(names) = d.label_names() {
                if names.len() > labels.len() || names.iter().zip(&labels).any(|(a, b)| a != b) {
                    return Err(Error::Request(format!(
                        "{}: classes {names:?} differ from the adapter's labels {labels:?}",
                        data.display()
                    )));
                }
            }
            Ok(d)
        }
    }
}
