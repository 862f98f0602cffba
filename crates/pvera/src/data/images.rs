//! Image classification data: a folder of class sub-folders, and the preprocessing transformers'
//! image processors apply for ViT and DINOv2.
//!
//! # Preprocessing
//! [`ImagePreprocess`] follows transformers' PIL image-processor backend step for step
//! (`BitImageProcessor`, which DINOv2 uses, and `ViTImageProcessor`):
//!
//! 1. convert to RGB: grey images are repeated over three channels, and images with transparency
//!    are composited onto white, exactly as transformers' `convert_to_rgb` does with
//!    `Image.alpha_composite` (PNG `tRNS` transparency included);
//! 2. resize, either the shortest edge to N (the long edge to `int(N * long / short)`) or to an
//!    exact height x width, with Pillow 13's resampling ported exactly (`ImagingResample`:
//!    separable passes, horizontal first unless the height shrinks by more than twice as many
//!    pixels as the width, 22-bit fixed-point coefficients, 8-bit intermediate image), so resized
//!    pixels are identical to `PIL.Image.resize`;
//! 3. centre crop (`top = (h - crop_h) // 2`, zero padding when the image is smaller);
//! 4. rescale (`u8 as f64 * factor`, cast to f32) and normalise (`(x - mean) / std` in f32).
//!
//! Given the same decoded pixels, the output equals transformers' PIL backend bit for bit (the
//! integration tests check hashes written by `tools/make_data_fixtures.py`). PNG decoding is
//! lossless and therefore identical; JPEG decoding uses `zune-jpeg`, which differs from PIL's
//! libjpeg-turbo on about 1 % of pixels by at most 3 grey levels (measured on real photos).
//! transformers 5's default *torchvision* backend resizes differently (its own antialiased
//! kernels), by up to one grey level on PNG input; `tools/measure_preprocess.py` measures both.
//!
//! # Folder layout
//! [`ImageFolder`] reads torchvision's `ImageFolder` layout: `root/<class>/**/<image>`, classes are
//! the sorted sub-folder names, files are taken in sorted walk order, and images are decoded on
//! demand in [`Dataset::get_batch`].

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::DynamicImage;
use serde_json::Value;

use super::{check_indices, check_nonempty, class_label_tensor, Batch, Dataset, Task};
use crate::error::{Error, Result};
use crate::models::ModelInputs;

/// ImageNet channel means (`IMAGENET_DEFAULT_MEAN` in transformers).
pub const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (`IMAGENET_DEFAULT_STD`).
pub const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];
/// `IMAGENET_STANDARD_MEAN` (ViT's default).
pub const IMAGENET_STANDARD_MEAN: [f64; 3] = [0.5, 0.5, 0.5];
/// `IMAGENET_STANDARD_STD` (ViT's default).
pub const IMAGENET_STANDARD_STD: [f64; 3] = [0.5, 0.5, 0.5];
/// `OPENAI_CLIP_MEAN` (`BitImageProcessor`'s class default).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
/// `OPENAI_CLIP_STD`.
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

/// File extensions read as images (case-insensitive).
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg"];

/// Extensions torchvision's `ImageFolder` would read but this crate cannot decode: a folder with
/// such files is refused rather than silently giving a different data set.
const UNSUPPORTED_IMAGE_EXTENSIONS: &[&str] = &["ppm", "bmp", "pgm", "tif", "tiff", "webp", "gif"];

// ---------------------------------------------------------------------------------------------
// Resampling filters (Pillow's libImaging/Resample.c)
// ---------------------------------------------------------------------------------------------

/// A Pillow resampling filter (`PIL.Image.Resampling`). Nearest is not supported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// `BOX` (4).
    Box,
    /// `BILINEAR` (2): ViT's default.
    Bilinear,
    /// `HAMMING` (5).
    Hamming,
    /// `BICUBIC` (3): DINOv2's.
    Bicubic,
    /// `LANCZOS` (1).
    Lanczos,
}

impl Resample {
    /// From Pillow's integer code (what `preprocessor_config.json` stores as `resample`).
    pub fn from_pil(code: i64) -> Result<Self> {
        Ok(match code {
            1 => Resample::Lanczos,
            2 => Resample::Bilinear,
            3 => Resample::Bicubic,
            4 => Resample::Box,
            5 => Resample::Hamming,
            0 => {
                return Err(Error::Data(
                    "resample 0 (NEAREST) is not supported; use 2 (BILINEAR) or 3 (BICUBIC)".into(),
                ))
            }
            other => {
                return Err(Error::Data(format!(
                    "unknown resample code {other}; Pillow's codes are 1 LANCZOS, 2 BILINEAR, 3 BICUBIC, 4 BOX, 5 HAMMING"
                )))
            }
        })
    }

    /// Pillow's integer code.
    pub fn pil_code(self) -> i64 {
        match self {
            Resample::Lanczos => 1,
            Resample::Bilinear => 2,
            Resample::Bicubic => 3,
            Resample::Box => 4,
            Resample::Hamming => 5,
        }
    }

    fn support(self) -> f64 {
        match self {
            Resample::Box => 0.5,
            Resample::Bilinear | Resample::Hamming => 1.0,
            Resample::Bicubic => 2.0,
            Resample::Lanczos => 3.0,
        }
    }

    fn filter(self, x: f64) -> f64 {
        match self {
            Resample::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Resample::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Resample::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let x = x * std::f64::consts::PI;
                    // Pillow writes these constants as C floats (0.54f, 0.46f).
                    x.sin() / x * (f64::from(0.54f32) + f64::from(0.46f32) * x.cos())
                }
            }
            Resample::Bicubic => {
                const A: f64 = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * A
                } else {
                    0.0
                }
            }
            Resample::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Fixed-point coefficients of one resampling direction (Pillow's `precompute_coeffs` followed by
/// `normalize_coeffs_8bpc`).
struct Coeffs {
    ksize: usize,
    /// (first input index, number of taps) per output index.
    bounds: Vec<(usize, usize)>,
    /// `ksize` coefficients per output index.
    k: Vec<i32>,
}

fn precompute_coeffs(in_size: usize, out_size: usize, filter: Resample) -> Coeffs {
    // Pillow passes the box as floats: in1 - in0 is computed in f32, then widened.
    let in0 = 0.0f32;
    let in1 = in_size as f32;
    let scale = f64::from(in1 - in0) / out_size as f64;
    let filterscale = if scale < 1.0 { 1.0 } else { scale };
    let support = filter.support() * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut k = vec![0i32; out_size * ksize];
    let mut w = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = f64::from(in0) + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's (int) cast truncates toward zero, as Rust's `as` does.
        let xmin = ((center - support + 0.5) as i64).max(0);
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64);
        let count = (xmax - xmin).max(0) as usize;
        let mut ww = 0.0;
        for (x, wx) in w.iter_mut().enumerate().take(count) {
            let v = filter.filter(((x as i64 + xmin) as f64 - center + 0.5) * ss);
            *wx = v;
            ww += v;
        }
        let row = &mut k[xx * ksize..(xx + 1) * ksize];
        for x in 0..count {
            let mut v = w[x];
            if ww != 0.0 {
                v /= ww;
            }
            let scaled = v * f64::from(1u32 << PRECISION_BITS);
            row[x] = if v < 0.0 { (-0.5 + scaled) as i32 } else { (0.5 + scaled) as i32 };
        }
        bounds.push((xmin as usize, count));
    }
    Coeffs { ksize, bounds, k }
}

#[inline]
fn clip8(v: i64) -> u8 {
    let s = v >> PRECISION_BITS;
    s.clamp(0, 255) as u8
}

/// An 8-bit image in memory, height x width x channels (1 = grey, 3 = RGB), row-major.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// 1 (grey) or 3 (RGB).
    pub channels: usize,
    /// `height * width * channels` bytes, channels interleaved.
    pub data: Vec<u8>,
}

impl RawImage {
    /// Wraps pixels, checking the length.
    pub fn new(width: usize, height: usize, channels: usize, data: Vec<u8>) -> Result<Self> {
        if channels != 1 && channels != 3 {
            return Err(Error::Data(format!("RawImage: {channels} channels; only 1 (grey) or 3 (RGB) are supported")));
        }
        if width == 0 || height == 0 {
            return Err(Error::Data(format!("RawImage: empty image ({width}x{height})")));
        }
        if data.len() != width * height * channels {
            return Err(Error::Data(format!(
                "RawImage: {} bytes for a {width}x{height}x{channels} image, expected {}",
                data.len(),
                width * height * channels
            )));
        }
        Ok(RawImage { width, height, channels, data })
    }

    /// Resizes with a Pillow filter, bit-identical to `PIL.Image.resize((width, height), filter)`
    /// on an `L` or `RGB` image with Pillow 13 (which runs the vertical pass first when the height
    /// shrinks by more than twice as many pixels as the width; Pillow 12 and older always ran the
    /// horizontal pass first, which can differ by one grey level in those cases).
    pub fn resize(&self, width: usize, height: usize, filter: Resample) -> Result<RawImage> {
        if width == 0 || height == 0 {
            return Err(Error::Data(format!(
                "cannot resize a {}x{} image to {width}x{height}: sizes must be at least 1",
                self.width, self.height
            )));
        }
        Ok(self.resize_unchecked(width, height, filter))
    }

    fn resize_unchecked(&self, width: usize, height: usize, filter: Resample) -> RawImage {
        let c = self.channels;
        let need_h = width != self.width;
        let need_v = height != self.height;
        if !need_h && !need_v {
            return self.clone();
        }
        let (dh, dw) = (self.height as i64 - height as i64, self.width as i64 - width as i64);
        let vertical_first = dh > 0 && dh > dw * 2;
        if vertical_first {
            let vert = precompute_coeffs(self.height, height, filter);
            let tmp = resample_vertical(&self.data, self.width * c, &vert, height);
            if !need_h {
                return RawImage { width: self.width, height, channels: c, data: tmp };
            }
            let horiz = precompute_coeffs(self.width, width, filter);
            let data = resample_horizontal(&tmp, self.width, 0, height, c, &horiz, width);
            return RawImage { width, height, channels: c, data };
        }
        // Horizontal pass over only the rows the vertical pass reads (Pillow's ybox).
        let mut vert = precompute_coeffs(self.height, height, filter);
        let (tmp, rows) = if need_h {
            let first = vert.bounds[0].0;
            let (b, n) = vert.bounds[height - 1];
            let last = b + n;
            for bd in &mut vert.bounds {
                bd.0 -= first;
            }
            let horiz = precompute_coeffs(self.width, width, filter);
            (resample_horizontal(&self.data, self.width, first, last - first, c, &horiz, width), last - first)
        } else {
            (self.data.clone(), self.height)
        };
        let w = if need_h { width } else { self.width };
        if !need_v {
            return RawImage { width: w, height: rows, channels: c, data: tmp };
        }
        let data = resample_vertical(&tmp, w * c, &vert, height);
        RawImage { width: w, height, channels: c, data }
    }
}

/// Pillow's `ImagingResampleHorizontal_8bpc`: rows `first..first + rows` of `src` (`src_w` pixels
/// of `c` channels each) to `out_w` pixels.
fn resample_horizontal(src: &[u8], src_w: usize, first: usize, rows: usize, c: usize, k: &Coeffs, out_w: usize) -> Vec<u8> {
    let mut out = vec![0u8; rows * out_w * c];
    for y in 0..rows {
        let row = &src[(y + first) * src_w * c..(y + first + 1) * src_w * c];
        let dst = &mut out[y * out_w * c..(y + 1) * out_w * c];
        for xx in 0..out_w {
            let (xmin, n) = k.bounds[xx];
            let kx = &k.k[xx * k.ksize..xx * k.ksize + n];
            for ch in 0..c {
                let mut ss: i64 = 1 << (PRECISION_BITS - 1);
                for (x, &w) in kx.iter().enumerate() {
                    ss += i64::from(row[(x + xmin) * c + ch]) * i64::from(w);
                }
                dst[xx * c + ch] = clip8(ss);
            }
        }
    }
    out
}

/// Pillow's `ImagingResampleVertical_8bpc`: rows of `row_len` bytes to `out_h` rows.
fn resample_vertical(src: &[u8], row_len: usize, k: &Coeffs, out_h: usize) -> Vec<u8> {
    let mut out = vec![0u8; out_h * row_len];
    for yy in 0..out_h {
        let (ymin, n) = k.bounds[yy];
        let ky = &k.k[yy * k.ksize..yy * k.ksize + n];
        let dst = &mut out[yy * row_len..(yy + 1) * row_len];
        for (i, d) in dst.iter_mut().enumerate() {
            let mut ss: i64 = 1 << (PRECISION_BITS - 1);
            for (y, &w) in ky.iter().enumerate() {
                ss += i64::from(src[(y + ymin) * row_len + i]) * i64::from(w);
            }
            *d = clip8(ss);
        }
    }
    out
}

/// Checks that every image file is a readable PNG / JPEG (its header decodes: a zero-byte or
/// truncated file is named here, before any training or prediction).
pub fn check_image_files(files: &[PathBuf]) -> Result<()> {
    for f in files {
        let meta = std::fs::metadata(f).map_err(|e| Error::io(f, e))?;
        if meta.len() == 0 {
            return Err(Error::Data(format!("{}: an empty (zero-byte) file, not an image; replace or remove it", f.display())));
        }
        let reader = image::ImageReader::open(f)
            .map_err(|e| Error::io(f, e))?
            .with_guessed_format()
            .map_err(|e| Error::io(f, e))?;
        if reader.format().is_none() {
            return Err(Error::Data(format!(
                "{}: not a PNG or JPEG image (unrecognised content); convert it or remove it",
                f.display()
            )));
        }
        reader.into_dimensions().map_err(|e| {
            Error::Data(format!("{}: cannot read the image header: {e}; the file is corrupt or truncated: replace or remove it", f.display()))
        })?;
    }
    Ok(())
}

/// Decodes a PNG or JPEG file (format sniffed from the content) to grey or RGB 8-bit pixels.
/// Errors name the file and carry the decoder's message.
pub fn decode_image_file(path: &Path) -> Result<RawImage> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    decode_image_bytes(&bytes, &path.display().to_string())
}

/// Decodes PNG or JPEG bytes; `name` is used in error messages.
pub fn decode_image_bytes(bytes: &[u8], name: &str) -> Result<RawImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Error::Data(format!("{name}: cannot read image: {e}")))?;
    if reader.format().is_none() {
        return Err(Error::Data(format!(
            "{name}: not a PNG or JPEG image (unrecognised content); convert it to PNG or JPEG or remove it"
        )));
    }
    let img = reader.decode().map_err(|e| {
        Error::Data(format!("{name}: cannot decode image: {e}; the file is corrupt or truncated: replace or remove it"))
    })?;
    from_dynamic(img, name)
}

/// transformers' `convert_to_rgb` for an image with transparency: `Image.alpha_composite` onto
/// opaque white (Pillow's fixed-point formula, exact for every value / alpha pair).
#[inline]
fn over_white(v: u8, a: u8) -> u8 {
    if a == 0 {
        return 255;
    }
    let (v, a) = (u32::from(v), u32::from(a));
    // With an opaque background Pillow's coef1 = a * 255 * 255 * 128 / (255 * 255) = a * 128.
    let coef1 = a << 7;
    let coef2 = (255 << 7) - coef1;
    let t = v * coef1 + 255 * coef2 + (0x80 << 7);
    ((((t >> 8) + t) >> 8) >> 7) as u8
}

fn from_dynamic(img: DynamicImage, name: &str) -> Result<RawImage> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let has_alpha = img.color().has_alpha();
    let grey = matches!(
        img,
        DynamicImage::ImageLuma8(_) | DynamicImage::ImageLumaA8(_) | DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA16(_)
    );
    let (channels, data) = match (grey, has_alpha) {
        (true, false) => (1, img.into_luma8().into_raw()),
        (true, true) => (1, img.into_luma_alpha8().pixels().map(|p| over_white(p.0[0], p.0[1])).collect()),
        (false, false) => (3, img.into_rgb8().into_raw()),
        (false, true) => {
            let rgba = img.into_rgba8();
            let mut out = Vec::with_capacity(w * h * 3);
            for p in rgba.pixels() {
                let [r, g, b, a] = p.0;
                out.extend_from_slice(&[over_white(r, a), over_white(g, a), over_white(b, a)]);
            }
            (3, out)
        }
    };
    RawImage::new(w, h, channels, data).map_err(|e| Error::Data(format!("{name}: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Preprocessing
// ---------------------------------------------------------------------------------------------

/// How to resize before cropping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resize {
    /// Shortest edge to this many pixels, aspect kept (`size: {"shortest_edge": N}`).
    ShortestEdge(usize),
    /// Exactly this size (`size: {"height": H, "width": W}`).
    Exact {
        /// Output height.
        height: usize,
        /// Output width.
        width: usize,
    },
}

/// transformers' image-processor steps (PIL backend), for ViT and DINOv2.
#[derive(Clone, Debug, PartialEq)]
pub struct ImagePreprocess {
    /// `do_resize` + `size`; `None` = no resize.
    pub resize: Option<Resize>,
    /// `resample`.
    pub resample: Resample,
    /// `do_center_crop` + `crop_size` as (height, width); `None` = no crop.
    pub center_crop: Option<(usize, usize)>,
    /// `do_rescale` + `rescale_factor`; `None` = pixels stay in 0..=255.
    pub rescale_factor: Option<f64>,
    /// `do_normalize` + (`image_mean`, `image_std`); `None` = no normalisation.
    pub normalize: Option<([f64; 3], [f64; 3])>,
}

impl ImagePreprocess {
    /// `facebook/dinov2-*`'s `preprocessor_config.json`: shortest edge 256 bicubic, centre crop
    /// 224, rescale 1/255, ImageNet mean/std.
    pub fn dinov2() -> Self {
        ImagePreprocess {
            resize: Some(Resize::ShortestEdge(256)),
            resample: Resample::Bicubic,
            center_crop: Some((224, 224)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((IMAGENET_MEAN, IMAGENET_STD)),
        }
    }

    /// `ViTImageProcessor`'s defaults (`google/vit-base-patch16-224`): 224x224 bilinear, no crop,
    /// rescale 1/255, mean = std = 0.5.
    pub fn vit() -> Self {
        ImagePreprocess {
            resize: Some(Resize::Exact { height: 224, width: 224 }),
            resample: Resample::Bilinear,
            center_crop: None,
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD)),
        }
    }

    /// `BitImageProcessor`'s class defaults (used when its config omits a key).
    fn bit_defaults() -> Self {
        ImagePreprocess {
            resize: Some(Resize::ShortestEdge(224)),
            resample: Resample::Bicubic,
            center_crop: Some((224, 224)),
            rescale_factor: Some(1.0 / 255.0),
            normalize: Some((OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)),
        }
    }

    /// Preprocessing for a model directory: its `preprocessor_config.json` when present, otherwise
    /// the defaults of its `config.json` `model_type` (`dinov2` -> [`Self::dinov2`], `vit` ->
    /// [`Self::vit`]).
    pub fn for_model_dir(dir: &Path) -> Result<Self> {
        let pre = dir.join("preprocessor_config.json");
        let cfg = dir.join("config.json");
        let model_type = if cfg.is_file() {
            let v = read_json(&cfg)?;
            v.get("model_type").and_then(Value::as_str).map(String::from)
        } else {
            None
        };
        if pre.is_file() {
            return Self::from_json(&read_json(&pre)?, &pre, model_type.as_deref());
        }
        match model_type.as_deref() {
            Some("dinov2") => Ok(Self::dinov2()),
            Some("vit") => Ok(Self::vit()),
            Some(other) => Err(Error::Data(format!(
                "{}: no preprocessor_config.json and model_type {other:?} has no built-in image preprocessing; \
                 add the model's preprocessor_config.json (transformers' image processor file) or use a vit / dinov2 model",
                dir.display()
            ))),
            None => Err(Error::Data(format!(
                "{}: neither preprocessor_config.json nor a config.json with model_type; \
                 image preprocessing cannot be chosen: add the model's preprocessor_config.json",
                dir.display()
            ))),
        }
    }

    /// Reads a `preprocessor_config.json` (as transformers' `save_pretrained` writes it).
    pub fn from_preprocessor_config(path: &Path) -> Result<Self> {
        Self::from_json(&read_json(path)?, path, None)
    }

    /// Parses a preprocessor config. Keys it does not state take the processor class's defaults
    /// (`ViTImageProcessor` or `BitImageProcessor`, chosen by `image_processor_type`, or by
    /// `model_type` when the type is absent).
    pub fn from_json(v: &Value, path: &Path, model_type: Option<&str>) -> Result<Self> {
        let file = path.display();
        let ptype = v
            .get("image_processor_type")
            .or_else(|| v.get("feature_extractor_type"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let base = ptype.trim_end_matches("Fast").trim_end_matches("Pil");
        let (mut out, default_to_square) = match (base, model_type) {
            ("ViTImageProcessor" | "ViTFeatureExtractor", _) => (Self::vit(), true),
            ("BitImageProcessor", _) => (Self::bit_defaults(), false),
            ("", Some("vit")) => (Self::vit(), true),
            ("", Some("dinov2")) => (Self::bit_defaults(), false),
            _ => {
                return Err(Error::Data(format!(
                    "{file}: image_processor_type {ptype:?} is not supported; supported: ViTImageProcessor (ViT) and \
                     BitImageProcessor (DINOv2); build an ImagePreprocess by hand for other processors"
                )))
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(default),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(Error::Data(format!("{file}: `{key}` is {other}, expected true or false"))),
            }
        };
        if let Some(r) = v.get("resample").filter(|x| !x.is_null()) {
            let code = r.as_i64().ok_or_else(|| {
                Error::Data(format!("{file}: `resample` is {r}, expected Pillow's integer code (2 bilinear, 3 bicubic)"))
            })?;
            out.resample = Resample::from_pil(code).map_err(|e| Error::Data(format!("{file}: `resample`: {e}")))?;
        }
        if let Some(s) = v.get("size").filter(|x| !x.is_null()) {
            out.resize = Some(parse_size(s, default_to_square, &format!("{file}: `size`"))?);
        }
        if !flag("do_resize", out.resize.is_some())? {
            out.resize = None;
        } else if out.resize.is_none() {
            return Err(Error::Data(format!("{file}: `do_resize` is true but there is no `size`; add e.g. \"size\": {{\"height\": 224, \"width\": 224}}")));
        }
        if let Some(s) = v.get("crop_size").filter(|x| !x.is_null()) {
            match parse_size(s, true, &format!("{file}: `crop_size`"))? {
                Resize::Exact { height, width } => out.center_crop = Some((height, width)),
                Resize::ShortestEdge(_) => {
                    return Err(Error::Data(format!(
                        "{file}: `crop_size` must be {{\"height\": H, \"width\": W}} or an integer, not a shortest_edge"
                    )))
                }
            }
        }
        let crop_default = out.center_crop.is_some();
        if !flag("do_center_crop", crop_default)? {
            out.center_crop = None;
        } else if out.center_crop.is_none() {
            return Err(Error::Data(format!("{file}: `do_center_crop` is true but there is no `crop_size`; add e.g. \"crop_size\": {{\"height\": 224, \"width\": 224}}")));
        }
        if let Some(f) = v.get("rescale_factor").filter(|x| !x.is_null()) {
            let f = f.as_f64().ok_or_else(|| Error::Data(format!("{file}: `rescale_factor` is {f}, expected a number such as 0.00392156862745098")))?;
            out.rescale_factor = Some(f);
        }
        if !flag("do_rescale", true)? {
            out.rescale_factor = None;
        }
        let (mut mean, mut std) = out.normalize.unwrap_or((IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD));
        if let Some(m) = v.get("image_mean").filter(|x| !x.is_null()) {
            mean = parse_triple(m, &format!("{file}: `image_mean`"))?;
        }
        if let Some(s) = v.get("image_std").filter(|x| !x.is_null()) {
            std = parse_triple(s, &format!("{file}: `image_std`"))?;
        }
        if std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            return Err(Error::Data(format!("{file}: `image_std` {std:?} has a zero or non-finite entry")));
        }
        out.normalize = if flag("do_normalize", true)? { Some((mean, std)) } else { None };
        Ok(out)
    }

    /// (height, width) after the resize step, for an input of (height, width).
    pub fn resized_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.resize {
            None => (height, width),
            Some(Resize::Exact { height, width }) => (height, width),
            Some(Resize::ShortestEdge(s)) => {
                // transformers' get_resize_output_image_size(default_to_square=False).
                let (short, long) = if width <= height { (width, height) } else { (height, width) };
                let new_long = ((s as f64 * long as f64) / short as f64) as usize;
                if width <= height {
                    (new_long, s)
                } else {
                    (s, new_long)
                }
            }
        }
    }

    /// (height, width) of the output for an input of (height, width).
    pub fn output_size(&self, height: usize, width: usize) -> (usize, usize) {
        match self.center_crop {
            Some(hw) => hw,
            None => self.resized_size(height, width),
        }
    }

    /// Per channel, the f32 value of each byte after rescale and normalise (exactly transformers'
    /// arithmetic: `f32(u8 * factor in f64)`, then `(x - f32(mean)) / f32(std)` in f32).
    fn lut(&self) -> [[f32; 256]; 3] {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                let mut x = match self.rescale_factor {
                    Some(f) => (v as f64 * f) as f32,
                    None => v as f32,
                };
                if let Some((mean, std)) = self.normalize {
                    x = (x - mean[c] as f32) / std[c] as f32;
                }
                *out = x;
            }
        }
        lut
    }

    /// The resized and cropped 8-bit image (before rescale / normalise), as PIL would hold it;
    /// crop padding is 0.
    pub fn resize_and_crop(&self, img: &RawImage) -> Result<RawImage> {
        let resized = match self.resize {
            None => img.clone(),
            Some(_) => {
                let (h, w) = self.resized_size(img.height, img.width);
                if h == 0 || w == 0 {
                    return Err(Error::Data(format!(
                        "a {}x{} image resizes to {w}x{h}; its aspect ratio is too extreme for {:?}",
                        img.width, img.height, self.resize
                    )));
                }
                img.resize(w, h, self.resample)?
            }
        };
        let Some((ch, cw)) = self.center_crop else { return Ok(resized) };
        if ch == 0 || cw == 0 {
            return Err(Error::Data(format!("crop size {ch}x{cw} is empty")));
        }
        let (h, w, c) = (resized.height as i64, resized.width as i64, resized.channels);
        // Python's floor division; negative when the image is smaller (then zero padding).
        let top = (h - ch as i64).div_euclid(2);
        let left = (w - cw as i64).div_euclid(2);
        let mut data = vec![0u8; ch * cw * c];
        for i in 0..ch as i64 {
            let sy = top + i;
            if sy < 0 || sy >= h {
                continue;
            }
            for j in 0..cw as i64 {
                let sx = left + j;
                if sx < 0 || sx >= w {
                    continue;
                }
                let s = ((sy * w + sx) as usize) * c;
                let d = ((i * cw as i64 + j) as usize) * c;
                data[d..d + c].copy_from_slice(&resized.data[s..s + c]);
            }
        }
        RawImage::new(cw, ch, c, data)
    }

    /// Full preprocessing into `(3, H, W)` f32 values, channel-major; grey is repeated over the
    /// three channels. Returns the values and (H, W).
    pub fn apply(&self, img: &RawImage) -> Result<(Vec<f32>, (usize, usize))> {
        let out = self.resize_and_crop(img)?;
        let lut = self.lut();
        let (h, w) = (out.height, out.width);
        let mut v = vec![0f32; 3 * h * w];
        self.fill(&out, &lut, &mut v);
        Ok((v, (h, w)))
    }

    fn fill(&self, img: &RawImage, lut: &[[f32; 256]; 3], dst: &mut [f32]) {
        let hw = img.height * img.width;
        for (c, plane) in dst.chunks_exact_mut(hw).enumerate().take(3) {
            let src_c = if img.channels == 1 { 0 } else { c };
            for (p, d) in plane.iter_mut().enumerate() {
                *d = lut[c][img.data[p * img.channels + src_c] as usize];
            }
        }
    }

    /// Preprocesses one image to a `(3, H, W)` f32 tensor on `device`.
    pub fn to_tensor(&self, img: &RawImage, device: &Device) -> Result<Tensor> {
        let (v, (h, w)) = self.apply(img)?;
        Ok(Tensor::from_vec(v, (3, h, w), device)?)
    }

    /// Preprocesses images (decoded by `load(i)` for i in 0..n, in parallel on up to `threads`
    /// threads) into one `(n, 3, H, W)` f32 tensor on `device`. All outputs must have one size
    /// (use a centre crop or an exact resize).
    pub fn batch<F>(&self, n: usize, threads: usize, device: &Device, load: F) -> Result<Tensor>
    where
        F: Fn(usize) -> Result<(RawImage, String)> + Sync,
    {
        if n == 0 {
            return Err(Error::Data("an image batch needs at least one image".into()));
        }
        let lut = self.lut();
        let threads = threads.clamp(1, n);
        let chunk = n.div_ceil(threads);
        // Each worker preprocesses a contiguous range of images into its own buffer.
        let work = |range: std::ops::Range<usize>| -> Result<Vec<Processed>> {
            range
                .map(|i| {
                    let (img, name) = load(i)?;
                    let out = self.resize_and_crop(&img).map_err(|e| Error::Data(format!("{name}: {e}")))?;
                    let mut v = vec![0f32; 3 * out.height * out.width];
                    self.fill(&out, &lut, &mut v);
                    Ok((v, (out.height, out.width), name))
                })
                .collect()
        };
        let parts: Vec<Result<Vec<_>>> = if threads == 1 {
            vec![work(0..n)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..threads)
                    .map(|t| {
                        let range = (t * chunk).min(n)..((t + 1) * chunk).min(n);
                        let work = &work;
                        s.spawn(move || work(range))
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(Error::Data("an image decoding thread panicked".into()))))
                    .collect()
            })
        };
        let mut all = Vec::new();
        let mut size: Option<((usize, usize), String)> = None;
        for part in parts {
            for (v, hw, name) in part? {
                match &size {
                    None => size = Some((hw, name)),
                    Some((first, first_name)) if *first != hw => {
                        return Err(Error::Data(format!(
                            "{name}: preprocesses to {}x{} (HxW) but {first_name} to {}x{}; images of one batch must \
                             have one size: use a centre crop or an exact resize",
                            hw.0, hw.1, first.0, first.1
                        )))
                    }
                    _ => {}
                }
                all.extend_from_slice(&v);
            }
        }
        let (h, w) = size.map(|s| s.0).unwrap_or((0, 0));
        Ok(Tensor::from_vec(all, (n, 3, h, w), device)?)
    }
}

/// One preprocessed image: values, (height, width), name for errors.
type Processed = (Vec<f32>, (usize, usize), String);

fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::ConfigParse { path: path.display().to_string(), reason: e.to_string() })
}

fn parse_size(v: &Value, default_to_square: bool, what: &str) -> Result<Resize> {
    let as_px = |x: &Value, key: &str| -> Result<usize> {
        x.as_u64().filter(|&n| n > 0).map(|n| n as usize).ok_or_else(|| {
            Error::Data(format!("{what}: `{key}` is {x}, expected a positive integer number of pixels"))
        })
    };
    match v {
        Value::Number(_) => {
            let n = as_px(v, "size")?;
            Ok(if default_to_square { Resize::Exact { height: n, width: n } } else { Resize::ShortestEdge(n) })
        }
        Value::Object(m) => {
            if m.get("longest_edge").is_some_and(|x| !x.is_null()) || m.get("max_height").is_some_and(|x| !x.is_null()) {
                return Err(Error::Data(format!(
                    "{what}: {v} uses longest_edge / max_height, which is not supported; use \
                     {{\"shortest_edge\": N}} or {{\"height\": H, \"width\": W}}"
                )));
            }
            if let Some(s) = m.get("shortest_edge").filter(|x| !x.is_null()) {
                return Ok(Resize::ShortestEdge(as_px(s, "shortest_edge")?));
            }
            match (m.get("height"), m.get("width")) {
                (Some(h), Some(w)) => Ok(Resize::Exact { height: as_px(h, "height")?, width: as_px(w, "width")? }),
                _ => Err(Error::Data(format!(
                    "{what}: {v} has neither `shortest_edge` nor `height` and `width`"
                ))),
            }
        }
        _ => Err(Error::Data(format!("{what}: {v} is neither an integer nor an object"))),
    }
}

fn parse_triple(v: &Value, what: &str) -> Result<[f64; 3]> {
    match v {
        Value::Number(n) => {
            let x = n.as_f64().unwrap_or(f64::NAN);
            Ok([x, x, x])
        }
        Value::Array(a) if a.len() == 3 => {
            let mut out = [0.0; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64().ok_or_else(|| Error::Data(format!("{what}: {x} is not a number")))?;
            }
            Ok(out)
        }
        _ => Err(Error::Data(format!("{what}: {v} must be a number or a list of 3 numbers (one per RGB channel)"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Image folders
// ---------------------------------------------------------------------------------------------

/// A torchvision `ImageFolder`: `root/<class>/**/<image>.{png,jpg,jpeg}`, decoded lazily.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    classes: Vec<String>,
    samples: Vec<PathBuf>,
    labels: Vec<u32>,
    preprocess: ImagePreprocess,
    device: Device,
    threads: usize,
}

impl ImageFolder {
    /// Lists `root`'s class folders and their images (nothing is decoded yet). Batches are
    /// preprocessed with `preprocess` and created on `device`.
    pub fn open(root: &Path, preprocess: ImagePreprocess, device: &Device) -> Result<Self> {
        let rd = std::fs::read_dir(root).map_err(|e| {
            Error::io(root, std::io::Error::new(e.kind(), format!("{e}: expected a folder with one sub-folder per class")))
        })?;
        let mut classes = Vec::new();
        for entry in rd {
            let entry = entry.map_err(|e| Error::io(root, e))?;
            let path = entry.path();
            if path.is_dir() {
                let name = entry.file_name().into_string().map_err(|n| {
                    Error::Data(format!("{}: class folder name {n:?} is not valid UTF-8; rename it", root.display()))
                })?;
                classes.push(name);
            }
        }
        classes.sort();
        if classes.is_empty() {
            return Err(Error::Data(format!(
                "{}: no class sub-folders; an image folder holds one sub-folder per class (root/cat/1.png, root/dog/2.jpg)",
                root.display()
            )));
        }
        let mut samples = Vec::new();
        let mut labels = Vec::new();
        let mut empty = Vec::new();
        for (id, class) in classes.iter().enumerate() {
            let files = walk_sorted(&root.join(class))?;
            let before = samples.len();
            for f in files {
                let ext = f.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
                if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                    samples.push(f);
                    labels.push(id as u32);
                } else if UNSUPPORTED_IMAGE_EXTENSIONS.contains(&ext.as_str()) {
                    return Err(Error::Data(format!(
                        "{}: .{ext} images are not supported (only PNG and JPEG); convert it to PNG or remove it",
                        f.display()
                    )));
                }
            }
            if samples.len() == before {
                empty.push(class.clone());
            }
        }
        if !empty.is_empty() {
            return Err(Error::Data(format!(
                "{}: found no valid file for the classes {}; supported extensions are .png, .jpg, .jpeg \
                 (remove empty class folders or add images)",
                root.display(),
                empty.join(", ")
            )));
        }
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        Ok(ImageFolder { root: root.to_path_buf(), classes, samples, labels, preprocess, device: device.clone(), threads })
    }

    /// Decoding threads per batch (default: the available parallelism).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.threads = threads.max(1);
        self
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Class names (sorted folder names); the class id is the index.
    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    /// Image paths in sample order.
    pub fn paths(&self) -> &[PathBuf] {
        &self.samples
    }

    /// The preprocessing applied.
    pub fn preprocess(&self) -> &ImagePreprocess {
        &self.preprocess
    }
}

/// Files under `dir`, recursively, in the order of Python's `sorted(os.walk(dir))` with sorted file
/// names (torchvision's `make_dataset`).
fn walk_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<(String, PathBuf)> = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    // Symbolic links are followed (as torchvision does); a link back to a visited folder is not.
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = stack.pop() {
        if !seen.insert(std::fs::canonicalize(&d).map_err(|e| Error::io(&d, e))?) {
            continue;
        }
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let entry = entry.map_err(|e| Error::io(&d, e))?;
            let p = entry.path();
            if p.is_dir() {
                stack.push(p);
            }
        }
        dirs.push((d.to_string_lossy().into_owned(), d));
    }
    dirs.sort();
    let mut out = Vec::new();
    for (_, d) in dirs {
        let mut files: Vec<(String, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(&d).map_err(|e| Error::io(&d, e))? {
            let entry = entry.map_err(|e| Error::io(&d, e))?;
            let p = entry.path();
            if p.is_file() {
                files.push((entry.file_name().to_string_lossy().into_owned(), p));
            }
        }
        files.sort();
        out.extend(files.into_iter().map(|(_, p)| p));
    }
    Ok(out)
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.samples.len()
    }

    fn get_batch(&self, indices: &[usize]) -> Result<Batch> {
        check_nonempty(indices, "ImageFolder::get_batch")?;
        check_indices(indices, self.samples.len(), "ImageFolder::get_batch")?;
        let pixel_values = self.preprocess.batch(indices.len(), self.threads, &self.device, |i| {
            let path = &self.samples[indices[i]];
            Ok((decode_image_file(path)?, path.display().to_string()))
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
        Some(&self.classes)
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortest_edge_sizes_follow_transformers() {
        let p = ImagePreprocess::dinov2();
        assert_eq!(p.resized_size(28, 28), (256, 256));
        assert_eq!(p.resized_size(375, 500), (256, 341)); // int(256 * 500 / 375) = 341
        assert_eq!(p.resized_size(500, 375), (341, 256));
    }

    #[test]
    fn identity_resize_is_a_copy() {
        let img = RawImage::new(3, 2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        assert_eq!(img.resize(3, 2, Resample::Bicubic).unwrap(), img);
        assert!(img.resize(0, 2, Resample::Bicubic).is_err());
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RawImage::new(7, 5, 3, vec![200; 105]).unwrap();
        for f in [Resample::Bilinear, Resample::Bicubic, Resample::Lanczos, Resample::Box, Resample::Hamming] {
            let r = img.resize(13, 4, f).unwrap();
            assert!(r.data.iter().all(|&v| v == 200), "{f:?}");
        }
    }

    #[test]
    fn crop_pads_small_images_with_zero() {
        let p = ImagePreprocess {
            resize: None,
            resample: Resample::Bilinear,
            center_crop: Some((3, 3)),
            rescale_factor: None,
            normalize: None,
        };
        let img = RawImage::new(1, 1, 1, vec![9]).unwrap();
        let out = p.resize_and_crop(&img).unwrap();
        assert_eq!(out.data, vec![0, 0, 0, 0, 9, 0, 0, 0, 0]);
    }
}
