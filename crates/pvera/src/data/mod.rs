//! Training data: image folders, IDX files, CSV / JSONL text, plain text for causal LM, and
//! reproducible train/validation splits.
//!
//! Every data set implements [`Dataset`]: a length and [`Dataset::get_batch`], which turns a list
//! of example indices into a [`Batch`] of model inputs (the [`ModelInputs`] field names, i.e. the
//! transformers names `input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`) plus labels,
//! on the device the data set was opened for.
//!
//! - [`images`]: [`images::ImageFolder`] (torchvision `ImageFolder` layout, decoded lazily) and
//!   [`images::ImagePreprocess`], a PIL-exact port of transformers' ViT / DINOv2 (`BitImageProcessor`)
//!   preprocessing.
//! - [`idx`]: [`idx::IdxDataset`], MNIST / Fashion-MNIST IDX pairs (raw or `.gz`), loaded eagerly.
//! - [`text`]: [`text::TextClassification`] (CSV / JSONL, `tokenizer.json`) and
//!   [`text::CausalLm`] (plain text cut into blocks by transformers' `group_texts` rule).
//! - [`split`]: seeded splits equal to PyTorch's `randperm` / `random_split`, stratified splits,
//!   and the VTAB-1k style `--train-size` subset.
//!
//! Labels: classification labels are a `u32` tensor of shape `(batch,)`; causal-LM labels are an
//! `i64` tensor `(batch, block_size)` equal to `input_ids` (the model shifts them, as transformers
//! does).

use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::models::ModelInputs;

pub mod idx;
pub mod images;
pub mod labelled;
pub mod split;
pub mod text;

/// One batch: model inputs by their transformers names, and the labels.
#[derive(Clone, Debug)]
pub struct Batch {
    /// The model inputs (`pixel_values` for images; `input_ids`, `attention_mask` and, for
    /// BERT-style tokenizers, `token_type_ids` for text).
    pub inputs: ModelInputs,
    /// Class ids `u32 (batch,)` for classification, or `i64 (batch, seq)` token labels for
    /// causal LM.
    pub labels: Tensor,
}

impl Batch {
    /// Number of examples in the batch.
    pub fn len(&self) -> usize {
        self.labels.dims().first().copied().unwrap_or(0)
    }

    /// True for a batch of no examples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What a data set is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Images -> one class per image.
    ImageClassification,
    /// Text -> one class per text.
    TextClassification,
    /// Next-token prediction on fixed-length blocks.
    CausalLm,
}

/// A data set the trainer can iterate in batches.
pub trait Dataset: Send + Sync {
    /// Number of examples.
    fn len(&self) -> usize;

    /// True when there are no examples.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The examples at `indices`, in that order, as one batch on the data set's device.
    /// Indices may repeat; an index `>= len()` is an error.
    fn get_batch(&self, indices: &[usize]) -> Result<Batch>;

    /// What the data set is for.
    fn task(&self) -> Task;

    /// The class id of every example (classification only); used by stratified splits.
    fn class_ids(&self) -> Option<&[u32]> {
        None
    }

    /// Class names by id (`id2label`), for classification data sets.
    fn label_names(&self) -> Option<&[String]> {
        None
    }

    /// The device batches are created on.
    fn device(&self) -> &Device;
}

/// A view of some examples of another data set (a split), in the given order.
#[derive(Clone)]
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
    class_ids: Option<Vec<u32>>,
}

impl std::fmt::Debug for Subset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subset").field("len", &self.indices.len()).field("of", &self.inner.len()).finish()
    }
}

impl Subset {
    /// The examples `indices` of `inner` (checked against its length).
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Result<Self> {
        check_indices(&indices, inner.len(), "Subset::new")?;
        let class_ids = inner.class_ids().map(|all| indices.iter().map(|&i| all[i]).collect());
        Ok(Subset { inner, indices, class_ids })
    }

    /// The indices into the underlying data set.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    /// The underlying data set.
    pub fn inner(&self) -> &Arc<dyn Dataset> {
        &self.inner
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        check_indices(indices, self.indices.len(), "Subset::get_batch")?;
        let mapped: Vec<usize> = indices.iter().map(|&i| self.indices[i]).collect();
        self.inner.get_batch(&mapped)
    }

    fn task(&self) -> Task {
        self.inner.task()
    }

    fn class_ids(&self) -> Option<&[u32]> {
        self.class_ids.as_deref()
    }

    fn label_names(&self) -> Option<&[String]> {
        self.inner.label_names()
    }

    fn device(&self) -> &Device {
        self.inner.device()
    }
}

/// Opens image-classification data at `path`, whichever layout it has:
/// - an IDX images file (`*-images-idx3-ubyte[.gz]`), paired with the `*-labels-idx1-ubyte[.gz]`
///   beside it;
/// - a folder holding `train-images-idx3-ubyte[.gz]` (+ labels): its `train` split;
/// - otherwise a folder of class sub-folders ([`images::ImageFolder`]).
pub fn open_image_classification(
    path: &Path,
    preprocess: images::ImagePreprocess,
    device: &Device,
) -> Result<Arc<dyn Dataset>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if path.is_file() && name.contains("-images-idx3-ubyte") {
        let labels_name = name.replace("-images-idx3-ubyte", "-labels-idx1-ubyte");
        let dir = path.parent().unwrap_or(Path::new("."));
        let candidates = [dir.join(&labels_name), dir.join(labels_name.trim_end_matches(".gz")), dir.join(format!("{labels_name}.gz"))];
        let labels = candidates.iter().find(|p| p.is_file()).ok_or_else(|| {
            Error::Data(format!(
                "{}: no labels file beside it (looked for {}); put the matching *-labels-idx1-ubyte file next to it",
                path.display(),
                candidates[0].display()
            ))
        })?;
        return Ok(Arc::new(idx::IdxDataset::open(path, labels, preprocess, device)?));
    }
    if ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"].iter().any(|f| path.join(f).is_file()) {
        return Ok(Arc::new(idx::IdxDataset::open_dir(path, "train", preprocess, device)?));
    }
    Ok(Arc::new(images::ImageFolder::open(path, preprocess, device)?))
}

/// Errors for an index past the end (names the caller, the index and the length).
pub(crate) fn check_indices(indices: &[usize], len: usize, what: &str) -> Result<()> {
    if let Some(&bad) = indices.iter().find(|&&i| i >= len) {
        return Err(Error::Data(format!(
            "{what}: example index {bad} is out of range for a data set of {len} example(s); \
             indices must come from 0..{len} (use the split's indices for this data set)"
        )));
    }
    Ok(())
}

/// Errors for an empty batch request.
pub(crate) fn check_nonempty(indices: &[usize], what: &str) -> Result<()> {
    if indices.is_empty() {
        return Err(Error::Data(format!("{what}: get_batch called with no indices; a batch needs at least one example")));
    }
    Ok(())
}

/// Class-id labels `(batch,)` as u32 on `device`.
pub(crate) fn class_label_tensor(ids: Vec<u32>, device: &Device) -> Result<Tensor> {
    let n = ids.len();
    Ok(Tensor::from_vec(ids, n, device)?)
}
