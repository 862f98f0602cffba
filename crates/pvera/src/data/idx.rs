//! IDX files (MNIST, Fashion-MNIST): `*-images-idx3-ubyte` and `*-labels-idx1-ubyte`, raw or
//! gzip-compressed (detected from the content, not the name).
//!
//! The header is validated (magic, element type, dimensions, size against the file length) and
//! both files are read eagerly (60,000 Fashion-MNIST images are 47 MB of bytes). Images are grey
//! and go through the same [`ImagePreprocess`] as image folders in
//! [`Dataset::get_batch`] (e.g. 28x28 upsampled to DINOv2's 256 then cropped to 224).

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::Device;

use super::images::{ImagePreprocess, RawImage};
use super::{check_indices, check_nonempty, class_label_tensor, Batch, Dataset, Task};
use crate::error::{Error, Result};
use crate::models::ModelInputs;

/// torchvision's `FashionMNIST.classes`.
pub const FASHION_MNIST_CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// A parsed IDX file of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// Dimensions from the header.
    pub dims: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<u8>,
}

/// Reads a whole file, gunzipping it when it starts with the gzip magic.
fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    if raw.len() >= 2 && raw[0] == 0x1f && raw[1] == 0x8b {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..]).read_to_end(&mut out).map_err(|e| {
            Error::Data(format!(
                "{}: gzip data is corrupt or truncated ({e}); download the file again",
                path.display()
            ))
        })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an IDX file of unsigned bytes (type code 0x08) with `expected_dims` dimensions.
pub fn read_idx(path: &Path, expected_dims: usize) -> Result<IdxArray> {
    let bytes = read_maybe_gz(path)?;
    parse_idx(&bytes, expected_dims, &path.display().to_string())
}

/// Parses IDX bytes; `name` is used in errors.
pub fn parse_idx(bytes: &[u8], expected_dims: usize, name: &str) -> Result<IdxArray> {
    let fix = "it is not an IDX file such as train-images-idx3-ubyte(.gz) / train-labels-idx1-ubyte(.gz); \
               check the path or download the file again";
    if bytes.len() < 4 {
        return Err(Error::Data(format!("{name}: {} byte(s), too short for an IDX header; {fix}", bytes.len())));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(Error::Data(format!(
            "{name}: bad IDX magic {:02x} {:02x} {:02x} {:02x} (must start with 00 00); {fix}",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    if bytes[2] != 0x08 {
        return Err(Error::Data(format!(
            "{name}: IDX element type 0x{:02x}, only unsigned bytes (0x08) are supported; {fix}",
            bytes[2]
        )));
    }
    let ndims = bytes[3] as usize;
    if ndims != expected_dims {
        return Err(Error::Data(format!(
            "{name}: IDX file has {ndims} dimension(s), expected {expected_dims} ({}); images and labels swapped?",
            if expected_dims == 3 { "images: count, rows, columns" } else { "labels: count" }
        )));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(Error::Data(format!("{name}: truncated IDX header ({} bytes, need {header}); {fix}", bytes.len())));
    }
    let dims: Vec<usize> = (0..ndims)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Data(format!("{name}: IDX dimensions {dims:?} overflow; {fix}")))?;
    let have = bytes.len() - header;
    if have != count {
        return Err(Error::Data(format!(
            "{name}: header says dimensions {dims:?} = {count} bytes of data but the file holds {have}; \
             the file is {} (download it again)",
            if have < count { "truncated" } else { "longer than its header says" }
        )));
    }
    Ok(IdxArray { dims, data: bytes[header..].to_vec() })
}

/// An IDX image/label pair held in memory.
#[derive(Clone, Debug)]
pub struct IdxDataset {
    images: Vec<u8>,
    rows: usize,
    cols: usize,
    labels: Vec<u32>,
    class_names: Vec<String>,
    preprocess: ImagePreprocess,
    device: Device,
    threads: usize,
    images_path: PathBuf,
}

impl IdxDataset {
    /// Reads an images file (3 dims) and a labels file (1 dim) of the same count.
    ///
    /// Class names are Fashion-MNIST's when either path mentions "fashion" and all labels are
    /// below 10; otherwise the label values as strings ("0".."K-1").
    pub fn open(images: &Path, labels: &Path, preprocess: ImagePreprocess, device: &Device) -> Result<Self> {
        let img = read_idx(images, 3)?;
        let lab = read_idx(labels, 1)?;
        let (n, rows, cols) = (img.dims[0], img.dims[1], img.dims[2]);
        if rows == 0 || cols == 0 || n == 0 {
            return Err(Error::Data(format!(
                "{}: empty IDX images ({n} images of {rows}x{cols})",
                images.display()
            )));
        }
        if lab.dims[0] != n {
            return Err(Error::Data(format!(
                "{} holds {n} images but {} holds {} labels; pair the images file with its own labels file \
                 (train with train, t10k with t10k)",
                images.display(),
                labels.display(),
                lab.dims[0]
            )));
        }
        let labels_u32: Vec<u32> = lab.data.iter().map(|&b| u32::from(b)).collect();
        let num_classes = labels_u32.iter().copied().max().map_or(0, |m| m as usize + 1);
        let fashion = [images, labels]
            .iter()
            .any(|p| p.to_string_lossy().to_ascii_lowercase().contains("fashion"));
        let class_names = if fashion && num_classes <= 10 {
            FASHION_MNIST_CLASSES.iter().map(|s| s.to_string()).collect()
        } else {
            (0..num_classes).map(|i| i.to_string()).collect()
        };
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(IdxDataset {
            images: img.data,
            rows,
            cols,
            labels: labels_u32,
            class_names,
            preprocess,
            device: device.clone(),
            threads,
            images_path: images.to_path_buf(),
        })
    }

    /// Opens `{split}-images-idx3-ubyte[.gz]` and `{split}-labels-idx1-ubyte[.gz]` in `dir`
    /// (`split` = "train" or "t10k").
    pub fn open_dir(dir: &Path, split: &str, preprocess: ImagePreprocess, device: &Device) -> Result<Self> {
        let find = |stem: String| -> Result<PathBuf> {
            for cand in [format!("{stem}.gz"), stem.clone()] {
                let p = dir.join(&cand);
                if p.is_file() {
                    return Ok(p);
                }
            }
            Err(Error::io(
                dir.join(&stem),
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("neither {stem} nor {stem}.gz in {}; expected the MNIST-style file names", dir.display()),
                ),
            ))
        };
        let images = find(format!("{split}-images-idx3-ubyte"))?;
        let labels = find(format!("{split}-labels-idx1-ubyte"))?;
        Self::open(&images, &labels, preprocess, device)
    }

    /// Decoding threads per batch (default: the available parallelism).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// Replaces the class names (e.g. for another IDX data set); must cover every label.
    pub fn with_class_names(mut self, names: Vec<String>) -> Result<Self> {
        let needed = self.labels.iter().copied().max().map_or(0, |m| m as usize + 1);
        if names.len() < needed {
            return Err(Error::Data(format!(
                "{}: {} class name(s) given but labels go up to {}; give one name per class id",
                self.images_path.display(),
                names.len(),
                needed - 1
            )));
        }
        self.class_names = names;
        Ok(self)
    }

    /// Image size as (rows, cols).
    pub fn image_size(&self) -> (usize, usize) {
        (self.rows, self.cols)
    }

    /// The raw grey image `i`.
    pub fn raw_image(&self, i: usize) -> Result<RawImage> {
        check_indices(&[i], self.labels.len(), "IdxDataset::raw_image")?;
        let sz = self.rows * self.cols;
        RawImage::new(self.cols, self.rows, 1, self.images[i * sz..(i + 1) * sz].to_vec())
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.labels.len()
    }

    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        check_nonempty(indices, "IdxDataset::get_batch")?;
        check_indices(indices, self.labels.len(), "IdxDataset::get_batch")?;
        let pixel_values = self.preprocess.batch(indices.len(), self.threads, &self.device, |i| {
            let idx = indices[i];
            Ok((self.raw_image(idx)?, format!("{} image {idx}", self.images_path.display())))
        })?;
        let labels = class_label_tensor(indices.iter().map(|&i| self.labels[i]).collect(), &self.device)?;
        Ok(Batch { inputs: ModelInputs { pixel_values: Some(pixel_values), ..Default::default() }, labels })
    }

    fn task(&self) -> Task {
        Task::ImageClassification
    }

    fn class_ids(&self) -> Option<&[u32]> {
        Some(&self.labels)
    }

    fn label_names(&self) -> Option<&[String]> {
        Some(&self.class_names)
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
