//! One library path from "model directory + adapter(s) + inputs" to predictions with
//! uncertainty: [`Predictor`]. `pvera predict`, `pvera eval`, the held-out evaluation of
//! `pvera train` and `pvera serve` all go through it.
//!
//! A predictor holds one frozen backbone ([`AnyModel`] inside a [`PeftModel`]) and any number of
//! classifier adapters on it. Each adapter brings its λ's (loaded into the backbone), its own
//! classification head (the `classifier` weights its file carries, applied here outside the
//! backbone, so adapters with different label sets share one model) and its task metadata
//! (labels, pooling, maximum text length: [`meta::resolve`]). Inputs are encoded per adapter
//! (the text length it was trained with), then predicted in mean mode or with `S` Monte Carlo
//! samples of the PVeRA latent ([`crate::uncertainty`]).

pub mod calibrated;
mod embed;
pub mod inputs;
pub mod meta;

pub use embed::Embeddings;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Tensor};

use crate::checkpoint::{self, HeadTensors};
use crate::data::images::{ImagePreprocess, RawImage};
use crate::data::text::TextTokenizer;
use crate::error::{Error, Result};
use crate::models::heads::Pooling;
use crate::models::loader::{resolve_model_dir, ModelDir};
use crate::models::{AnyModel, ModelInputs, ModelOutputs};
use crate::peft_model::PeftModel;
use crate::state::{RunState, Sampling};
use crate::state::RowPlan;
use crate::uncertainty::{mc_predict, mean_predict, McConfig, McMode, McNoise, Prediction};

pub use calibrated::{adapter_hash, CalibrationChoice, Calibrator};
pub use meta::{ResolvedTask, Source, TaskKind, TaskMeta, TaskOverrides};

/// What a model reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Modality {
    /// Token ids (BERT, RoBERTa).
    Text,
    /// Pixels (ViT, DINOv2).
    Image,
}

impl Modality {
    /// The modality of a classifier backbone, or an error for model types pvera does not
    /// classify with.
    pub fn of(model_type: &str) -> Result<Modality> {
        match model_type {
            "bert" | "roberta" => Ok(Modality::Text),
            "vit" | "dinov2" => Ok(Modality::Image),
            other => Err(Error::Request(format!(
                "model_type {other:?}: classification (predict, eval, serve) needs a bert/roberta (text) or vit/dinov2 \
                 (image) backbone"
            ))),
        }
    }

    /// The task a classifier of this modality performs.
    pub fn task(self) -> TaskKind {
        match self {
            Modality::Text => TaskKind::TextClassification,
            Modality::Image => TaskKind::ImageClassification,
        }
    }
}

/// How a predictor is opened.
#[derive(Clone, Debug)]
pub struct PredictorOptions {
    /// `tokenizer.json` (default: the model directory's).
    pub tokenizer: Option<PathBuf>,
    /// Weight dtype of the frozen base (default: as stored). The adapter path computes in f32.
    pub dtype: Option<DType>,
    /// Device.
    pub device: Device,
    /// Seed of the run state's global generator (noise of adapters without `generator_seed`).
    pub seed: u64,
}

impl Default for PredictorOptions {
    fn default() -> Self {
        PredictorOptions { tokenizer: None, dtype: None, device: Device::Cpu, seed: 0 }
    }
}

/// Settings of one prediction call.
#[derive(Clone, Debug, PartialEq)]
pub struct PredictConfig {
    /// Monte Carlo samples: 1 = mean mode only; at least 2 for intervals.
    pub samples: usize,
    /// Confidence level of the Student-t interval.
    pub confidence: f64,
    /// Seed of the sampling noise (`None`: continue the generators).
    pub seed: Option<u64>,
    /// Row budget of one forward (samples are stacked up to it).
    pub max_rows: usize,
    /// Batched or sequential (PEFT's example loop) sampling.
    pub mode: McMode,
    /// Where to sample: every adapted layer, or the layers whose `sample_at_inference` is on.
    pub sampling: Sampling,
    /// Where the sampling noise comes from.
    pub noise: Noise,
}

/// One group of a mixed-adapter batch ([`Predictor::predict_mixed_groups`]): an adapter, its
/// encoded inputs, and the noise seed and numbering they would have predicted alone.
#[derive(Clone, Copy, Debug)]
pub struct MixedGroup<'a> {
    /// Adapter name.
    pub adapter: &'a str,
    /// Inputs encoded for that adapter.
    pub inputs: &'a ModelInputs,
    /// Seed of the group's sampling noise.
    pub seed: u64,
    /// Position of the group's first input in its own numbering (0 for a whole request).
    pub first: u64,
}

/// Where a prediction's sampling noise comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Noise {
    /// Each input's own noise, derived from the seed and the input's position in the call (or
    /// request): the same answer whatever batch size, row budget, mode or other requests it is
    /// predicted with. The default of every front end.
    #[default]
    PerInput,
    /// The generators' streams as PEFT draws them (restarted from the seed per batch): with
    /// [`McMode::Sequential`], PEFT's own samples; otherwise dependent on the batch layout.
    Generators,
}

impl Default for PredictConfig {
    fn default() -> Self {
        PredictConfig {
            samples: 16,
            confidence: 0.95,
            seed: Some(0),
            max_rows: crate::uncertainty::mc::DEFAULT_MAX_ROWS,
            mode: McMode::Batched,
            sampling: Sampling::Always,
            noise: Noise::PerInput,
        }
    }
}

impl PredictConfig {
    /// Checks the values (an error names the field, the value and the fix).
    pub fn validate(&self) -> Result<()> {
        if self.samples == 0 {
            return Err(Error::Request("samples 0: use 1 for the mean mode only, or at least 2 (16 is usual)".into()));
        }
        if !(self.confidence > 0.0 && self.confidence < 1.0) {
            return Err(Error::Request(format!(
                "confidence {}: expected a level strictly between 0 and 1, e.g. 0.95",
                self.confidence
            )));
        }
        if self.max_rows == 0 {
            return Err(Error::Request("max_rows 0: a forward needs at least 1 row".into()));
        }
        if self.sampling == Sampling::Never {
            return Err(Error::Request("sampling Never draws no samples; use samples 1 for the mean mode".into()));
        }
        Ok(())
    }
}

/// The classification head of one adapter: `logits = pool(outputs) · Wᵀ + b`, in f32.
#[derive(Clone, Debug)]
pub struct Head {
    /// `(num_labels, pooled width)`, f32.
    weight: Tensor,
    /// `(num_labels,)`, f32.
    bias: Option<Tensor>,
    /// Where the weights came from: `adapter` (its `modules_to_save` copy) or `model` (the
    /// checkpoint's own head, e.g. a `ViTForImageClassification` checkpoint).
    pub origin: &'static str,
}

impl Head {
    /// Number of classes.
    pub fn outputs(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Width of the pooled vector the head reads.
    pub fn inputs(&self) -> usize {
        self.weight.dims()[1]
    }

    /// Logits `(batch, labels)` of pooled vectors `(batch, width)`.
    pub fn logits(&self, pooled: &Tensor) -> Result<Tensor> {
        let y = pooled.to_dtype(DType::F32)?.matmul(&self.weight.t()?)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// One loaded adapter: its task and head.
#[derive(Clone, Debug)]
pub struct AdapterTask {
    /// The adapter name inside the predictor.
    pub name: String,
    /// The directory it was loaded from.
    pub dir: PathBuf,
    /// Labels, pooling, maximum length and where each came from.
    pub task: ResolvedTask,
    /// The head.
    pub head: Head,
}

impl AdapterTask {
    /// Label names.
    pub fn labels(&self) -> &[String] {
        &self.task.labels
    }
}

/// A classifier backbone with classifier adapters, ready to predict.
pub struct Predictor {
    pm: PeftModel<AnyModel>,
    dir: ModelDir,
    modality: Modality,
    device: Device,
    tokenizer_path: Option<PathBuf>,
    /// One tokenizer per maximum length (adapters trained with different lengths share the file).
    tokenizers: RwLock<BTreeMap<Option<usize>, Arc<TextTokenizer>>>,
    image: Option<ImagePreprocess>,
    adapters: BTreeMap<String, AdapterTask>,
    /// The longest text the model's position embeddings allow.
    max_positions: Option<usize>,
    warnings: Vec<String>,
}

impl std::fmt::Debug for Predictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Predictor")
            .field("model", &self.dir.path)
            .field("modality", &self.modality)
            .field("adapters", &self.adapters.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Predictor {
    /// Opens the model (a directory, or a hub id in the local hub cache) as a classifier
    /// backbone. Adapters are added with [`Predictor::add_adapter`].
    pub fn open(model: &Path, opts: &PredictorOptions) -> Result<Predictor> {
        let path = resolve_model_dir(model)?;
        let dir = ModelDir::open(&path)?;
        let modality = Modality::of(&dir.model_type)?;
        let (tokenizer_path, image) = match modality {
            Modality::Text => {
                let p = opts.tokenizer.clone().unwrap_or_else(|| path.join("tokenizer.json"));
                if !p.is_file() {
                    return Err(Error::io(
                        &p,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "no tokenizer.json: a text model needs its tokenizer (pass --tokenizer PATH)",
                        ),
                    ));
                }
                (Some(p), None)
            }
            Modality::Image => (None, Some(ImagePreprocess::for_model_dir(&path)?)),
        };
        let max_positions = match modality {
            Modality::Text => crate::data::labelled::max_positions(&dir),
            Modality::Image => None,
        };
        let state = Arc::new(RunState::new(opts.seed));
        let (model, registry, info) = AnyModel::load(&dir, opts.dtype, &opts.device, state)?;
        let pm = PeftModel::from_parts(model, registry, info);
        pm.state().set_grad_enabled(false)?;
        pm.eval()?;
        Ok(Predictor {
            pm,
            dir,
            modality,
            device: opts.device.clone(),
            tokenizer_path,
            tokenizers: RwLock::new(BTreeMap::new()),
            image,
            adapters: BTreeMap::new(),
            max_positions,
            warnings: Vec::new(),
        })
    }

    /// Opens the model and one adapter named `default`: what `pvera predict` / `eval` need.
    pub fn open_with_adapter(
        model: &Path,
        adapter: &Path,
        opts: &PredictorOptions,
        overrides: &TaskOverrides,
    ) -> Result<Predictor> {
        let mut p = Predictor::open(model, opts)?;
        p.add_adapter(checkpoint::DEFAULT_ADAPTER, adapter, overrides)?;
        Ok(p)
    }

    /// The model directory.
    pub fn model_dir(&self) -> &ModelDir {
        &self.dir
    }

    /// Text or images.
    pub fn modality(&self) -> Modality {
        self.modality
    }

    /// The device tensors are created on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The backbone with its adapters (e.g. to switch sampling per layer).
    pub fn peft_model(&self) -> &PeftModel<AnyModel> {
        &self.pm
    }

    /// The loaded adapters by name.
    pub fn adapters(&self) -> &BTreeMap<String, AdapterTask> {
        &self.adapters
    }

    /// One adapter's task, or an [`Error::Request`] naming the known ones.
    pub fn adapter(&self, name: &str) -> Result<&AdapterTask> {
        self.adapters.get(name).ok_or_else(|| {
            Error::Request(format!(
                "unknown adapter {name:?}; loaded adapters: {:?}",
                self.adapters.keys().collect::<Vec<_>>()
            ))
        })
    }

    /// The longest text (in tokens) the model's position embeddings allow, when known.
    pub fn max_positions(&self) -> Option<usize> {
        self.max_positions
    }

    /// Warnings collected since the last call (what loading had to assume, PEFT's load
    /// warnings), each once. Each was also logged through `tracing` when it arose (the
    /// library's rule), so a front end with a `tracing` subscriber need not print them again.
    pub fn take_warnings(&mut self) -> Vec<String> {
        let mut w = std::mem::take(&mut self.warnings);
        w.extend(self.pm.take_warnings().into_iter().map(|x| x.to_string()));
        let mut seen = std::collections::BTreeSet::new();
        w.retain(|x| seen.insert(x.clone()));
        w
    }

    /// Loads the adapter in `dir` under `name`: its λ's into the backbone, its head and task
    /// metadata here. Everything is validated before the adapter becomes visible; on an error
    /// the predictor is unchanged.
    pub fn add_adapter(&mut self, name: &str, dir: &Path, overrides: &TaskOverrides) -> Result<&AdapterTask> {
        if self.adapters.contains_key(name) {
            return Err(Error::Request(format!("adapter {name:?} is already loaded; remove it first or pick another name")));
        }
        if !dir.join(checkpoint::CONFIG_NAME).is_file() {
            let what = if dir.is_dir() { "no adapter_config.json in this folder" } else { "no such adapter folder" };
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{what}; pass an adapter directory (e.g. pvera train's OUT/best)"),
                ),
            ));
        }
        let mut files = checkpoint::read_adapter_dir(dir, &self.device)?;
        let listed_head = files
            .config
            .modules_to_save
            .as_ref()
            .is_some_and(|m| m.iter().any(|x| checkpoint::HEAD_MODULES.contains(&x.as_str())));
        let file_head = checkpoint::take_classifier_head(&mut files);
        let config = files.config.clone();
        let (head, head_outputs) = match file_head {
            Some(h) => {
                let n = h.weight.dims().first().copied();
                (Some(self.head_from(h, "adapter")?), n)
            }
            None => match self.model_head()? {
                Some(h) => {
                    let n = h.outputs();
                    (Some(h), Some(n))
                }
                None => (None, None),
            },
        };
        let Some(head) = head else {
            let why = if listed_head {
                "its modules_to_save lists a classifier head but the weights file does not carry it"
            } else {
                "modules_to_save lacks \"classifier\""
            };
            return Err(Error::Request(format!(
                "{}: the adapter has no trained `classifier` head ({why}) and the model has none either; predictions \
                 would come from a random head. Use an adapter trained with pvera train (or PEFT with \
                 modules_to_save=[\"classifier\"])",
                dir.display()
            )));
        };
        let mut task = meta::resolve(dir, &config, &self.dir, overrides, head_outputs)?;
        self.check_task(dir, &mut task, &head, overrides)?;
        // Load the λ's last: everything above can fail without touching the backbone.
        let had_adapters = !self.pm.adapter_names().is_empty();
        self.pm.load_adapter_files(files, name, false)?;
        if !had_adapters {
            self.pm.set_adapter(&[name])?;
        }
        for w in &task.warnings {
            tracing::warn!("{w}");
        }
        self.warnings.extend(task.warnings.iter().cloned());
        let entry = AdapterTask { name: name.to_string(), dir: dir.to_path_buf(), task, head };
        Ok(self.adapters.entry(name.to_string()).or_insert(entry))
    }

    /// Removes an adapter (its λ's and head).
    pub fn remove_adapter(&mut self, name: &str) -> Result<()> {
        self.adapter(name)?;
        let active = self.pm.active_adapters();
        if active.iter().any(|a| a == name) {
            if let Some(other) = self.adapters.keys().find(|k| k.as_str() != name).cloned() {
                self.pm.set_adapter(&[other.as_str()])?;
            }
        }
        self.pm.delete_adapter(name)?;
        self.adapters.remove(name);
        Ok(())
    }

    fn head_from(&self, h: HeadTensors, origin: &'static str) -> Result<Head> {
        let w = h.weight.to_dtype(DType::F32)?.to_device(&self.device)?;
        if w.dims().len() != 2 {
            return Err(Error::ShapeMismatch {
                file: origin.into(),
                key: format!("{}.weight", h.module),
                expected: "(num_labels, pooled width)".into(),
                got: w.dims().to_vec(),
                hint: String::new(),
            });
        }
        let bias = h.bias.map(|b| b.to_dtype(DType::F32)?.to_device(&self.device)).transpose()?;
        if let Some(b) = &bias {
            if b.dims() != [w.dims()[0]] {
                return Err(Error::ShapeMismatch {
                    file: origin.into(),
                    key: format!("{}.bias", h.module),
                    expected: format!("[{}]", w.dims()[0]),
                    got: b.dims().to_vec(),
                    hint: " (the head's bias must have one value per class)".into(),
                });
            }
        }
        let n = crate::layer::count_non_finite(&w)?
            + bias.as_ref().map(crate::layer::count_non_finite).transpose()?.unwrap_or(0);
        if n > 0 {
            return Err(Error::NonFinite {
                what: format!("{origin} `{}` head", h.module),
                count: n,
                hint: " (the adapter is corrupt or training diverged; use an earlier checkpoint)".into(),
            });
        }
        Ok(Head { weight: w, bias, origin })
    }

    /// The model checkpoint's own `classifier` head (a `*ForImageClassification` /
    /// `*ForSequenceClassification` checkpoint), when it has one.
    fn model_head(&self) -> Result<Option<Head>> {
        let Some(wname) = self.dir.names.iter().find(|n| *n == "classifier.weight").cloned() else {
            return Ok(None);
        };
        let st = unsafe {
            // SAFETY: read-only memory map of the model's own weights, as the model loader does.
            candle_core::safetensors::MmapedSafetensors::multi(&self.dir.weights)?
        };
        let weight = st.load(&wname, &self.device)?;
        let bias = if self.dir.names.contains("classifier.bias") { Some(st.load("classifier.bias", &self.device)?) } else { None };
        Ok(Some(self.head_from(HeadTensors { module: "classifier".into(), weight, bias }, "model")?))
    }

    /// Checks labels, pooling and maximum length against the head and the model.
    fn check_task(&self, dir: &Path, task: &mut ResolvedTask, head: &Head, overrides: &TaskOverrides) -> Result<()> {
        let mt = self.dir.model_type.as_str();
        if !task.pooling.fits(mt) {
            let ok: Vec<&str> = Pooling::ALL.iter().filter(|p| p.fits(mt)).map(|p| p.name()).collect();
            return Err(Error::Request(format!(
                "pooling {:?} does not fit a {mt} model{}; use one of {}",
                task.pooling.name(),
                if task.pooling == Pooling::ClsMeanPatch { " (it needs image patch tokens)" } else { "" },
                ok.join(", ")
            )));
        }
        let hidden = self.dir.usize_field("hidden_size")?;
        let width = task.pooling.width(hidden);
        if head.inputs() != width {
            let fits: Vec<&str> =
                Pooling::ALL.iter().filter(|p| p.fits(mt) && p.width(hidden) == head.inputs()).map(|p| p.name()).collect();
            return Err(Error::Request(format!(
                "{}: the classifier head reads {} values but {} pooling of this model gives {width} (hidden size \
                 {hidden}); the adapter was trained with another pooling or model{}",
                dir.display(),
                head.inputs(),
                task.pooling.name(),
                if fits.is_empty() { String::new() } else { format!(": try --pooling {}", fits.join(" or ")) }
            )));
        }
        let n = head.outputs();
        if task.labels.len() != n {
            if task.labels_source == Source::Model && overrides.labels.is_none() {
                task.warnings.push(format!(
                    "the model's id2label names {} classes but the adapter's head has {n}; naming them LABEL_0..LABEL_{} \
                     (pass --labels to name them)",
                    task.labels.len(),
                    n - 1
                ));
                task.labels = (0..n).map(|i| format!("LABEL_{i}")).collect();
                task.labels_source = Source::Assumed;
            } else {
                return Err(Error::Request(format!(
                    "the adapter's classifier head has {n} outputs but {} label names were given ({:?}); pass the labels \
                     the adapter was trained with (in class-id order)",
                    task.labels.len(),
                    task.labels
                )));
            }
        }
        if task.labels.len() < 2 {
            return Err(Error::Request(format!("{} label name(s); a classifier needs at least 2", task.labels.len())));
        }
        if let (Some(len), Some(max)) = (task.max_length, self.max_positions) {
            if len > max && task.max_length_source == Source::Given {
                return Err(Error::Request(format!(
                    "max length {len}: this model has {max} positions (max_position_embeddings in its config.json); \
                     use --max-length {max} or less"
                )));
            }
            if len > max {
                // A recorded length the model cannot read (the tokenizer's default at training
                // time): every text it could see was shorter than the model's positions.
                task.max_length = Some(max);
            }
        }
        if task.max_length == Some(0) {
            return Err(Error::Request("max length 0: a text needs at least 1 token (e.g. --max-length 128)".into()));
        }
        Ok(())
    }

    /// The tokenizer truncating to `max_length` (loaded once per length; its own length, capped at
    /// the model's positions, when `None`).
    fn tokenizer(&self, max_length: Option<usize>) -> Result<Arc<TextTokenizer>> {
        let poisoned = || Error::Model("tokenizer cache poisoned".into());
        if let Some(t) = self.tokenizers.read().map_err(|_| poisoned())?.get(&max_length) {
            return Ok(t.clone());
        }
        let path = self.tokenizer_path.as_deref().ok_or_else(|| Error::Request("this model reads images, not texts".into()))?;
        let tok = Arc::new(crate::data::labelled::model_tokenizer(&self.dir, Some(path), max_length, None)?);
        self.tokenizers.write().map_err(|_| poisoned())?.insert(max_length, tok.clone());
        Ok(tok)
    }

    /// The maximum text length `adapter` reads (its trained length, else the tokenizer's).
    pub fn max_length(&self, adapter: &str) -> Result<usize> {
        Ok(self.tokenizer(self.adapter(adapter)?.task.max_length)?.max_length())
    }

    /// Tokenises texts for `adapter`. With `truncate`, longer texts are cut to the adapter's
    /// maximum length; without it, a longer text is an [`Error::Request`] naming it.
    pub fn encode_texts(&self, adapter: &str, texts: &[&str], truncate: bool) -> Result<ModelInputs> {
        let tok = self.text_tokenizer(adapter)?;
        let enc = self.tokenize_texts(adapter, texts, truncate)?;
        if !truncate {
            if let Some((k, e)) = enc.iter().enumerate().find(|(_, e)| e.0.len() > tok.max_length()) {
                return Err(Error::Request(format!(
                    "input {k} has {} tokens, more than the {} this adapter reads; shorten it or ask for truncation",
                    e.0.len(),
                    tok.max_length()
                )));
            }
        }
        let seqs: Vec<(&[u32], &[u32])> = enc.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
        tok.pad_batch(&seqs, &self.device)
    }

    /// Token ids and type ids of each text as `adapter` reads them (special tokens included),
    /// truncated to its maximum length when `truncate`, not padded; an empty text is an
    /// [`Error::Request`] naming it. [`Predictor::encode_texts`] is this plus the length check
    /// and padding; the server packs several requests' sequences into one padded batch.
    pub fn tokenize_texts(&self, adapter: &str, texts: &[&str], truncate: bool) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let tok = self.text_tokenizer(adapter)?;
        if let Some(k) = texts.iter().position(|t| t.trim().is_empty()) {
            return Err(Error::Request(format!("input {k} is an empty text; remove it")));
        }
        tok.encode(texts, truncate)
    }

    /// Preprocesses images (the model's preprocessing) into `pixel_values`.
    pub fn encode_images(&self, images: &[&RawImage]) -> Result<ModelInputs> {
        let pre = self
            .image
            .as_ref()
            .ok_or_else(|| Error::Request(format!("{} reads texts, not images", self.dir.model_type)))?;
        if images.is_empty() {
            return Err(Error::Request("no images to preprocess".into()));
        }
        let ts: Vec<Tensor> = images.iter().map(|img| pre.to_tensor(img, &self.device)).collect::<Result<_>>()?;
        Ok(ModelInputs { pixel_values: Some(Tensor::stack(&ts, 0)?), ..Default::default() })
    }

    /// The image preprocessing (image models).
    pub fn image_preprocess(&self) -> Option<&ImagePreprocess> {
        self.image.as_ref()
    }

    /// The tokenizer `adapter` encodes with (text models).
    pub fn text_tokenizer(&self, adapter: &str) -> Result<Arc<TextTokenizer>> {
        if self.modality != Modality::Text {
            return Err(Error::Request(format!("{} reads images, not texts", self.dir.model_type)));
        }
        self.tokenizer(self.adapter(adapter)?.task.max_length)
    }

    fn activate(&mut self, adapter: &str) -> Result<()> {
        self.adapter(adapter)?;
        if self.pm.active_adapters() != [adapter.to_string()] {
            self.pm.set_adapter(&[adapter])?;
        }
        Ok(())
    }

    /// Logits of `adapter`'s head on model outputs.
    fn head_logits(task: &AdapterTask, out: &ModelOutputs, mask: Option<&Tensor>) -> Result<Tensor> {
        let pooled = task.task.pooling.pool(out, mask)?;
        task.head.logits(&pooled)
    }

    /// Restricts sampling of `adapter` to these modules (names or `.`-suffixes), or to none
    /// other than the config's own choice when `None`. Unknown names are an error listing the
    /// adapted modules; nothing changes then.
    pub fn set_sample_modules(&self, adapter: &str, modules: Option<&[&str]>) -> Result<()> {
        self.adapter(adapter)?;
        if let Some(m) = modules {
            if m.is_empty() {
                return Err(Error::Request("name at least one module to sample in".into()));
            }
            // Validate before changing anything.
            let probe = self.pm.set_sample_at_inference(adapter, Some(m), true);
            if let Err(e) = probe {
                return Err(Error::Request(format!("sample modules: {e}")));
            }
            self.pm.set_sample_at_inference(adapter, None, false)?;
            self.pm.set_sample_at_inference(adapter, Some(m), true)?;
        }
        Ok(())
    }

    /// Predicts a batch of encoded inputs with `adapter`: the mean mode always, Monte Carlo
    /// statistics when `cfg.samples ≥ 2` (the inputs numbered from 0 for their noise). A VeRA
    /// adapter has the mean mode only: `samples ≥ 2` is an [`Error::Request`]
    /// (`self.peft_model().method(adapter)` tells a front end beforehand).
    pub fn predict(&mut self, adapter: &str, inputs: &ModelInputs, cfg: &PredictConfig) -> Result<Vec<Prediction>> {
        self.predict_from(adapter, inputs, cfg, 0)
    }

    /// [`Predictor::predict`] for inputs numbered from `first` (their position in a longer list or
    /// a request), which fixes their per-input noise.
    pub fn predict_from(&mut self, adapter: &str, inputs: &ModelInputs, cfg: &PredictConfig, first: u64) -> Result<Vec<Prediction>> {
        cfg.validate()?;
        self.activate(adapter)?;
        let task = self.adapter(adapter)?;
        let forward = |x: &ModelInputs| -> Result<Tensor> {
            let out = self.pm.model().forward(x)?;
            Self::head_logits(task, &out, x.attention_mask.as_ref())
        };
        if cfg.samples < 2 {
            let (p, c) = mean_predict(&self.pm, inputs, forward)?;
            return Ok(p.chunks(c).map(|row| Prediction::mean_only(row.to_vec())).collect());
        }
        let out = mc_predict(&self.pm, inputs, &self.mc_config(cfg, first), forward)?;
        (0..out.inputs)
            .map(|b| Prediction::sampled(out.input_mean_mode(b).unwrap_or_default(), out.input_samples(b), cfg.confidence))
            .collect()
    }

    fn mc_config(&self, cfg: &PredictConfig, first: u64) -> McConfig {
        McConfig {
            samples: cfg.samples,
            max_rows: cfg.max_rows,
            seed: cfg.seed,
            mode: cfg.mode,
            sampling: cfg.sampling,
            with_mean: true,
            noise: match cfg.noise {
                Noise::PerInput => McNoise::PerInput { first },
                Noise::Generators => McNoise::Generators,
            },
        }
    }

    /// One forward for a batch whose rows belong to different adapters: `groups[g] = (adapter,
    /// inputs)`; the rows of every group go through the backbone together (one base GEMM per
    /// layer, one `x·A` per projection group, each row scaled by its adapter's λ's), then through
    /// their adapter's head. Returns the predictions per group, in order. Equal to predicting each
    /// group alone within float rounding (merged weights do not apply here). Texts of different
    /// lengths are padded to the longest. With `cfg.samples ≥ 2` every group's inputs are numbered
    /// from 0 and draw their noise from `cfg.seed`, as [`Predictor::predict`] of the group alone;
    /// [`Predictor::predict_mixed_groups`] gives each group its own seed and numbering.
    pub fn predict_mixed(&mut self, groups: &[(&str, &ModelInputs)], cfg: &PredictConfig) -> Result<Vec<Vec<Prediction>>> {
        let seed = cfg.seed.unwrap_or(0);
        let groups: Vec<MixedGroup<'_>> =
            groups.iter().map(|&(adapter, inputs)| MixedGroup { adapter, inputs, seed, first: 0 }).collect();
        self.predict_mixed_groups(&groups, cfg)
    }

    /// [`Predictor::predict_mixed`] where each group (e.g. one request) has its own noise seed and
    /// the position of its first input, so each group draws exactly the noise of
    /// [`Predictor::predict_from`] with `PredictConfig { seed, .. }` and `first`, whatever else shares
    /// the batch, and gets its probabilities within float rounding (per-input noise; `cfg.seed` and
    /// `cfg.noise` are not used). `cfg.samples`,
    /// `confidence`, `max_rows` and `sampling` apply to every group. Monte Carlo needs PVeRA
    /// adapters (a VeRA group is an [`Error::Request`]) and the batched mode.
    pub fn predict_mixed_groups(&mut self, groups: &[MixedGroup<'_>], cfg: &PredictConfig) -> Result<Vec<Vec<Prediction>>> {
        cfg.validate()?;
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let mut plan_rows: Vec<Option<String>> = Vec::new();
        let mut ids: Vec<(u64, u64)> = Vec::new();
        let mut sizes = Vec::with_capacity(groups.len());
        for g in groups {
            self.adapter(g.adapter)?;
            if cfg.samples >= 2 && !self.pm.method(g.adapter)?.samples() {
                return Err(crate::layer::vera_cannot_sample(g.adapter));
            }
            let n = crate::uncertainty::McInput::rows(g.inputs)?;
            sizes.push(n);
            plan_rows.extend(std::iter::repeat_n(Some(g.adapter.to_string()), n));
            ids.extend((0..n as u64).map(|i| (g.seed, g.first + i)));
        }
        if cfg.samples >= 2 && cfg.mode != McMode::Batched {
            return Err(Error::Request(
                "a mixed-adapter batch samples in the batched mode with per-input noise; run sequential requests alone".into(),
            ));
        }
        let pad = match self.modality {
            Modality::Text => self.tokenizer(None)?.pad_id().unwrap_or(0),
            Modality::Image => 0,
        };
        let parts: Vec<&ModelInputs> = groups.iter().map(|g| g.inputs).collect();
        let batch = concat_padded(&parts, pad)?;
        let total: usize = sizes.iter().sum();
        let tasks: Vec<&AdapterTask> = groups.iter().map(|g| self.adapter(g.adapter)).collect::<Result<_>>()?;
        let widths: Vec<usize> = tasks.iter().map(|t| t.labels().len()).collect();
        let width = widths.iter().copied().max().unwrap_or(0);
        // Each row's logits through its own head (heads differ in width and labels), padded to
        // the widest head with -inf, which adds nothing to a softmax.
        let forward = |x: &ModelInputs| -> Result<Tensor> {
            let out = self.pm.model().forward(x)?;
            let rows = crate::uncertainty::McInput::rows(x)?;
            let mut parts = Vec::with_capacity(groups.len() * rows.div_ceil(total.max(1)));
            let mut at = 0;
            while at < rows {
                for (gi, &n) in sizes.iter().enumerate() {
                    let part = slice_outputs(&out, at, n)?;
                    let mask = x.attention_mask.as_ref().map(|m| m.narrow(0, at, n)).transpose()?;
                    let logits = Self::head_logits(tasks[gi], &part, mask.as_ref())?.to_dtype(DType::F32)?;
                    let logits = if widths[gi] < width {
                        let fill = Tensor::full(f32::NEG_INFINITY, (n, width - widths[gi]), logits.device())?;
                        Tensor::cat(&[&logits, &fill], 1)?
                    } else {
                        logits
                    };
                    parts.push(logits);
                    at += n;
                }
            }
            Ok(Tensor::cat(&parts, 0)?)
        };
        let state = self.pm.state().clone();
        state.set_rows(RowPlan { adapters: Some(Arc::new(plan_rows)), seeds: None })?;
        let result = (|| -> Result<Vec<Vec<Prediction>>> {
            let (mean, samples): (Vec<f64>, Option<crate::uncertainty::McOutput>) = if cfg.samples < 2 {
                let (p, _) = mean_predict(&self.pm, &batch, forward)?;
                (p, None)
            } else {
                let mc = McConfig {
                    samples: cfg.samples,
                    max_rows: cfg.max_rows,
                    seed: Some(groups[0].seed),
                    mode: McMode::Batched,
                    sampling: cfg.sampling,
                    with_mean: true,
                    noise: McNoise::PerRow(Arc::new(ids)),
                };
                let out = mc_predict(&self.pm, &batch, &mc, forward)?;
                (out.mean_mode.clone().unwrap_or_default(), Some(out))
            };
            let mut preds = Vec::with_capacity(groups.len());
            let mut row = 0;
            for (gi, &n) in sizes.iter().enumerate() {
                let c = widths[gi];
                let mut v = Vec::with_capacity(n);
                for b in row..row + n {
                    let mean_mode = mean[b * width..b * width + c].to_vec();
                    v.push(match &samples {
                        None => Prediction::mean_only(mean_mode),
                        Some(out) => {
                            let s: Vec<Vec<f64>> = out.input_samples(b).into_iter().map(|p| p[..c].to_vec()).collect();
                            Prediction::sampled(mean_mode, s, cfg.confidence)?
                        }
                    });
                }
                preds.push(v);
                row += n;
            }
            Ok(preds)
        })();
        state.set_rows(RowPlan::default())?;
        result
    }

    /// Predicts `n` inputs in batches of `batch_size`: `make(indices)` encodes the inputs at
    /// those positions. With per-input noise an input's samples depend only on the seed and its
    /// position (not on the batch size); with the generators' streams each batch restarts them
    /// from the seed. `progress(done, n)` is called after each batch.
    pub fn predict_all(
        &mut self,
        adapter: &str,
        n: usize,
        batch_size: usize,
        cfg: &PredictConfig,
        make: &mut dyn FnMut(&Predictor, &[usize]) -> Result<ModelInputs>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Vec<Prediction>> {
        if batch_size == 0 {
            return Err(Error::Request("batch size 0: a batch needs at least 1 input".into()));
        }
        let mut preds = Vec::with_capacity(n);
        let idx: Vec<usize> = (0..n).collect();
        for chunk in idx.chunks(batch_size) {
            let inputs = make(self, chunk)?;
            preds.extend(self.predict_from(adapter, &inputs, cfg, chunk[0] as u64)?);
            progress(preds.len(), n);
        }
        Ok(preds)
    }
}

/// Rows `at..at + n` of model outputs.
fn slice_outputs(out: &ModelOutputs, at: usize, n: usize) -> Result<ModelOutputs> {
    Ok(ModelOutputs {
        last_hidden_state: out.last_hidden_state.narrow(0, at, n)?,
        logits: out.logits.as_ref().map(|t| t.narrow(0, at, n)).transpose()?,
        pooler_output: out.pooler_output.as_ref().map(|t| t.narrow(0, at, n)).transpose()?,
    })
}

/// Stacks batches of model inputs along the batch, padding token sequences to the longest with
/// `pad` (attention mask 0, token type 0). Images must share a size.
pub fn concat_padded(parts: &[&ModelInputs], pad: u32) -> Result<ModelInputs> {
    let width = parts.iter().filter_map(|p| p.input_ids.as_ref().map(|t| t.dims().get(1).copied().unwrap_or(0))).max();
    let pad_to = |t: &Tensor, value: f64| -> Result<Tensor> {
        let (b, s) = t.dims2()?;
        let w = width.unwrap_or(s);
        if s == w {
            return Ok(t.clone());
        }
        let fill = (Tensor::ones((b, w - s), t.dtype(), t.device())? * value)?;
        Ok(Tensor::cat(&[t, &fill], 1)?)
    };
    let field = |get: &dyn Fn(&ModelInputs) -> Option<&Tensor>, value: f64| -> Result<Option<Tensor>> {
        let ts: Vec<&Tensor> = parts.iter().filter_map(|p| get(p)).collect();
        if ts.is_empty() {
            return Ok(None);
        }
        if ts.len() != parts.len() {
            return Err(Error::Request("the batches to stack do not carry the same inputs".into()));
        }
        let padded: Vec<Tensor> = ts.iter().map(|t| if t.rank() == 2 { pad_to(t, value) } else { Ok((*t).clone()) }).collect::<Result<_>>()?;
        Ok(Some(Tensor::cat(&padded, 0)?))
    };
    Ok(ModelInputs {
        input_ids: field(&|p| p.input_ids.as_ref(), pad as f64)?,
        attention_mask: field(&|p| p.attention_mask.as_ref(), 0.0)?,
        token_type_ids: field(&|p| p.token_type_ids.as_ref(), 0.0)?,
        pixel_values: field(&|p| p.pixel_values.as_ref(), 0.0)?,
    })
}

impl Predictor {
    /// Predicts examples `idx` of a labelled data set (encoded by the data set itself, e.g. with
    /// the tokenizer the adapter was trained with) in batches, returning the predictions and the
    /// examples' class ids. What `pvera eval` and `pvera train`'s held-out evaluation run.
    pub fn predict_examples(
        &mut self,
        adapter: &str,
        data: &dyn crate::data::Dataset,
        idx: &[usize],
        batch_size: usize,
        cfg: &PredictConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Vec<Prediction>, Vec<usize>)> {
        let mut labels = vec![0usize; idx.len()];
        let preds = self.predict_all(
            adapter,
            idx.len(),
            batch_size,
            cfg,
            &mut |_, chunk| {
                let b = data.get_batch(&chunk.iter().map(|&i| idx[i]).collect::<Vec<_>>())?;
                let ys = b.labels.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                for (k, y) in ys.into_iter().enumerate() {
                    labels[chunk[k]] = y as usize;
                }
                Ok(b.inputs)
            },
            progress,
        )?;
        let classes = self.adapter(adapter)?.labels().len();
        if let Some(&bad) = labels.iter().find(|&&y| y >= classes) {
            return Err(Error::Data(format!("the data has label id {bad} but the adapter has {classes} classes")));
        }
        Ok((preds, labels))
    }
}
