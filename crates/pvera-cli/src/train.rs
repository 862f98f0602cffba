//! `pvera train`: fine-tune a frozen model with a fresh PVeRA (or, `--method vera`, VeRA) adapter on
//! a local data set.
//!
//! This file checks flags and paths before any work, opens the data, hands model and data to the
//! library's `Trainer`, renders its events, and evaluates the best adapter through the library's
//! `Predictor` (the path `pvera eval` takes too). The task metadata it writes into every adapter
//! folder (`pvera_task.json`, `labels.json`) and the run's `split.json` are the library's types.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use pvera::config::{Bias, LayersToTransform, Method, PveraConfig, TargetModules};
use pvera::data::images::{ImageFolder, ImagePreprocess};
use pvera::data::split::{train_size_subset, train_val_split, ValSize};
use pvera::data::text::{CausalLm, CausalLmOptions, Columns, LabelMap, TextClassification, TextTokenizer, TokenizeOptions};
use pvera::data::{open_image_classification, Batch, Dataset};
use pvera::models::heads::{Classifier, Pooling};
use pvera::models::loader::ModelDir;
use pvera::models::AnyModel;
use pvera::predictor::inputs::{batch_labels, check_image_files};
use pvera::predictor::meta::{data_fingerprint, SplitRecord, TaskKind as MetaTask, TaskMeta};
use pvera::predictor::{PredictConfig, PredictorOptions, TaskOverrides};
use pvera::train::{
    causal_lm_loss, CausalLmObjective, ClassificationObjective, EpochMetrics, Objective, ScheduleKind, SplitData, StopReason,
    TrainConfig, TrainEvent, TrainReport, Trainer, Warmup,
};
use pvera::{PeftModel, Predictor, RunState};

use crate::common::{check_output, set_threads, OutputDir, Reuse, UsageError};
use crate::curves::write_curves;
use crate::{note, usage, warn_line};

/// The fine-tuning task.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum TaskKind {
    /// Images (class sub-folders or IDX files) -> one class each; ViT / DINOv2.
    ImageClassification,
    /// CSV / JSONL `text`,`label` -> one class each; BERT / RoBERTa.
    TextClassification,
    /// Plain text file, next-token prediction; LLaMA / GPT-2 `*ForCausalLM`.
    CausalLm,
}

impl TaskKind {
    fn meta(self) -> MetaTask {
        match self {
            TaskKind::ImageClassification => MetaTask::ImageClassification,
            TaskKind::TextClassification => MetaTask::TextClassification,
            TaskKind::CausalLm => MetaTask::CausalLm,
        }
    }
}

/// Arguments of `pvera train`.
#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    /// Hugging Face model directory (config.json + safetensors; tokenizer.json for text tasks), or a hub id org/name[@revision] found in the local hub cache (HF_HUB_CACHE; nothing is downloaded).
    #[arg(long)]
    pub model: PathBuf,
    /// Training data: an image folder / IDX file, a CSV / JSONL file (`text`, `label`), or a text file.
    #[arg(long)]
    pub data: PathBuf,
    /// What to train.
    #[arg(long, value_enum)]
    pub task: TaskKind,
    /// Output directory (created; must be new or empty unless --overwrite): best/ and last/ adapters,
    /// metrics.json, metrics.csv, training_curve.svg, split.json, pvera_task.json.
    #[arg(long)]
    pub output: PathBuf,
    /// Replace the files of an earlier run in a non-empty --output folder.
    #[arg(long)]
    pub overwrite: bool,
    /// tokenizer.json (default: <model>/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Padding token for tokenizers without one (e.g. GPT-2 / LLaMA: their EOS token).
    #[arg(long)]
    pub pad_token: Option<String>,

    // ---- adapter (PEFT's PveraConfig / VeraConfig) ----
    /// Adapter method: pvera (probabilistic latent) or vera (PEFT's VeraConfig, no latent).
    #[arg(long, value_enum, default_value_t = MethodArg::Pvera)]
    pub method: MethodArg,
    /// Rank of the shared random projections.
    #[arg(long, default_value_t = 256)]
    pub r: i64,
    /// Modules to adapt: a comma list of names (`query,value`), a regex (full match), or
    /// `all-linear` (default: the model type's PEFT default; query,value for ViT / DINOv2).
    #[arg(long)]
    pub target_modules: Option<String>,
    /// Comma list of layer indices to adapt (default: all).
    #[arg(long)]
    pub layers_to_transform: Option<String>,
    /// Initial value of λ_d.
    #[arg(long, default_value_t = 0.1)]
    pub d_initial: f64,
    /// Dropout before the projection A.
    #[arg(long, default_value_t = 0.0)]
    pub dropout: f64,
    /// Seed of the shared projections A and B.
    #[arg(long, default_value_t = 0)]
    pub projection_prng_key: i128,
    /// Store A and B in the adapter file (true, PEFT's default) or regenerate them from the key.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub save_projection: bool,
    /// Comma list of extra modules trained in full, in addition to the `classifier` head of
    /// classification tasks.
    #[arg(long)]
    pub modules_to_save: Option<String>,
    /// Biases to train: none, all or pvera_only (vera_only).
    #[arg(long, default_value = "none")]
    pub bias: String,

    // ---- training ----
    /// Epochs.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Examples per batch.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW).
    #[arg(long, default_value_t = 4e-3)]
    pub lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// β of the KL term of the PVeRA latent (PVeRA only).
    #[arg(long, default_value_t = 0.0)]
    pub kl_weight: f64,
    /// Seed: split, shuffling, head initialisation, dropout.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// CPU threads (sets RAYON_NUM_THREADS before any work; default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// VTAB-1k style: use N examples, 80 % for training and 20 % for validation.
    #[arg(long)]
    pub train_size: Option<usize>,
    /// Validation fraction when --train-size is not given (0 = no validation).
    #[arg(long, default_value_t = 0.2)]
    pub val_fraction: f64,
    /// Text: truncation length in tokens; causal LM: block size (default 128).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// Pooling for classification: cls, pooler, mean, cls-mean-patch (default: mean for text,
    /// cls for ViT, cls-mean-patch for DINOv2).
    #[arg(long)]
    pub pooling: Option<String>,
    /// Warm-up as a fraction of all steps.
    #[arg(long, default_value_t = 0.0)]
    pub warmup_ratio: f64,
    /// Schedule after warm-up: linear, cosine or constant.
    #[arg(long, default_value = "linear")]
    pub schedule: String,
    /// Stop after this many epochs without improvement of the validation loss.
    #[arg(long)]
    pub patience: Option<usize>,
    /// Clip gradients to this global L2 norm.
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Continue from the `last/` checkpoint of an earlier run with the same settings (OUT/last).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Weight dtype of the frozen base: f32, f16 or bf16 (default: as stored).
    #[arg(long)]
    pub dtype: Option<String>,

    // ---- evaluation after training ----
    /// Held-out data evaluated with the best adapter after training.
    #[arg(long)]
    pub eval_data: Option<PathBuf>,
    /// With --train-size: evaluate the best adapter on N examples the split left unused.
    #[arg(long)]
    pub eval_held_out: Option<usize>,
    /// Predictions to print after the evaluation.
    #[arg(long, default_value_t = 5)]
    pub show_predictions: usize,
}

/// `--method`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum MethodArg {
    /// PVeRA (PEFT's PveraConfig).
    Pvera,
    /// VeRA (PEFT's VeraConfig).
    Vera,
}

impl MethodArg {
    /// The library's method.
    pub fn method(self) -> Method {
        match self {
            MethodArg::Pvera => Method::Pvera,
            MethodArg::Vera => Method::Vera,
        }
    }
}

/// Training stopped on a non-finite loss, gradient or variable (exit code 8).
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Diverged {}

fn parse_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
}

/// `query,value` -> list; `all-linear` -> all linear; anything with regex characters -> a regex
/// (PEFT's `str` form, full match); a single plain name -> a one-element list.
pub fn parse_target_modules(s: &str) -> TargetModules {
    let t = s.trim();
    if t.eq_ignore_ascii_case("all-linear") {
        return TargetModules::AllLinear;
    }
    let plain = |x: &str| x.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
    if t.contains(',') && t.split(',').all(|x| plain(x.trim())) || plain(t) {
        TargetModules::list(parse_list(t))
    } else {
        TargetModules::Regex(t.to_string())
    }
}

/// A library config error about a value that came from a flag: exit 2, named by its flag.
fn flag_error(e: pvera::Error) -> anyhow::Error {
    match e {
        pvera::Error::InvalidConfig { field, reason } => {
            let flag = match field.as_str() {
                "pvera_dropout" | "vera_dropout" => "dropout".to_string(),
                "betas" | "eps" | "min_delta" | "restore_best" => field.clone(),
                f => f.replace('_', "-"),
            };
            anyhow::Error::new(UsageError(format!("--{flag}: {reason}")))
        }
        pvera::Error::Request(m) => anyhow::Error::new(UsageError(m)),
        other => anyhow::Error::new(other),
    }
}

fn adapter_config(args: &TrainArgs, model_type: &str, classification: bool) -> Result<PveraConfig> {
    let method = args.method.method();
    if method == Method::Vera && args.kl_weight != 0.0 {
        usage!(
            "--kl-weight {}: a VeRA adapter has no latent, so there is no KL term; drop --kl-weight or use \
             --method pvera",
            args.kl_weight
        );
    }
    let mut cfg = PveraConfig { r: args.r, ..PveraConfig::for_method(method) };
    cfg.target_modules = args.target_modules.as_deref().map(parse_target_modules);
    if cfg.target_modules.is_none() && pvera::targets::default_target_modules(method, model_type).is_none()
        && matches!(model_type, "vit" | "dinov2")
    {
        // PEFT's default tables have no ViT entry (and VeRA's none for DINOv2); the attention's
        // query and value (PVeRA's DINOv2 default) are the paper's choice for vision transformers.
        // Written into the config, so PEFT loads the adapter as it is.
        cfg.target_modules = Some(TargetModules::list(vec!["query".to_string(), "value".to_string()]));
    }
    if let Some(l) = &args.layers_to_transform {
        let mut v = Vec::new();
        for x in parse_list(l) {
            match x.parse::<i64>() {
                Ok(i) => v.push(i),
                Err(_) => usage!("--layers-to-transform {l:?}: expected comma-separated layer indices such as 0,1"),
            }
        }
        cfg.layers_to_transform = Some(if v.len() == 1 { LayersToTransform::One(v[0]) } else { LayersToTransform::Many(v) });
    }
    cfg.d_initial = args.d_initial;
    cfg.dropout = args.dropout;
    cfg.projection_prng_key = args.projection_prng_key;
    cfg.save_projection = args.save_projection;
    // The classifier head of a classification task is always trained; --modules-to-save adds to it.
    let mut modules: Vec<String> = if classification { vec!["classifier".to_string()] } else { Vec::new() };
    for m in args.modules_to_save.as_deref().map(parse_list).unwrap_or_default() {
        if !modules.contains(&m) {
            modules.push(m);
        }
    }
    cfg.modules_to_save = (!modules.is_empty()).then_some(modules);
    cfg.bias = Bias::parse(&args.bias).map_err(flag_error)?;
    cfg.base_model_name_or_path = Some(args.model.display().to_string());
    cfg.validate().map_err(flag_error)?;
    Ok(cfg)
}

fn train_config(args: &TrainArgs) -> Result<TrainConfig> {
    let schedule: ScheduleKind = match args.schedule.parse() {
        Ok(s) => s,
        Err(e) => usage!("--schedule {:?}: {e}", args.schedule),
    };
    if !(0.0..1.0).contains(&args.warmup_ratio) {
        usage!("--warmup-ratio {}: must be in [0, 1)", args.warmup_ratio);
    }
    if args.epochs == 0 {
        usage!("--epochs 0: train for at least one epoch");
    }
    if args.batch_size == 0 {
        usage!("--batch-size 0: a batch needs at least one example");
    }
    if !(args.lr > 0.0 && args.lr.is_finite()) {
        usage!("--lr {}: the learning rate must be a finite number above 0 (e.g. 4e-3)", args.lr);
    }
    let cfg = TrainConfig {
        epochs: args.epochs,
        lr: args.lr,
        weight_decay: args.weight_decay,
        schedule,
        warmup: Warmup::Ratio(args.warmup_ratio),
        max_grad_norm: args.max_grad_norm,
        grad_accum: args.grad_accum,
        kl_weight: args.kl_weight,
        patience: args.patience,
        seed: args.seed,
        output_dir: args.output.clone(),
        ..TrainConfig::default()
    };
    cfg.validate().map_err(flag_error)?;
    Ok(cfg)
}

/// Every flag and path checked before the model is loaded.
struct Checked {
    dir: ModelDir,
    dtype: Option<DType>,
    tcfg: TrainConfig,
    out: OutputDir,
}

fn check(args: &mut TrainArgs) -> Result<Checked> {
    args.model = pvera::models::loader::resolve_model_dir(&args.model)?;
    set_threads(args.threads)?;
    let dtype = crate::infer::parse_dtype(args.dtype.as_deref())?;
    let tcfg = train_config(args)?;
    let dir = ModelDir::open(&args.model).with_context(|| format!("opening model {}", args.model.display()))?;
    if !args.data.exists() {
        return Err(crate::common::not_found(&args.data, "--data: no such file or directory"));
    }
    let mt = dir.model_type.as_str();
    let classification = args.task != TaskKind::CausalLm;
    match (args.task, mt) {
        (TaskKind::TextClassification, "bert" | "roberta")
        | (TaskKind::ImageClassification, "vit" | "dinov2")
        | (TaskKind::CausalLm, "llama" | "gpt2") => {}
        _ => usage!(
            "--task {} does not fit model_type {mt:?}: text-classification needs a bert or roberta model, \
             image-classification a vit or dinov2 model, causal-lm a llama or gpt2 model",
            args.task.meta().name()
        ),
    }
    if let Some(p) = &args.pooling {
        if !classification {
            usage!("--pooling applies to classification tasks only");
        }
        match Pooling::from_name(p) {
            Some(x) if !x.fits(mt) => usage!(
                "--pooling {p}: a {mt} model cannot pool that way{}; use {}",
                if x == Pooling::ClsMeanPatch { " (it needs image patch tokens)" } else { "" },
                Pooling::ALL.iter().filter(|q| q.fits(mt)).map(|q| q.name()).collect::<Vec<_>>().join(", ")
            ),
            Some(_) => {}
            None => usage!("--pooling {p:?}: expected cls, pooler, mean or cls-mean-patch"),
        }
    }
    if let Some(n) = args.max_length {
        if n == 0 || (args.task == TaskKind::CausalLm && n < 2) {
            usage!("--max-length {n}: {}", if classification { "a text needs at least 1 token" } else { "causal-LM blocks need at least 2 tokens" });
        }
        if let Some(max) = max_positions(&dir) {
            if n > max {
                usage!("--max-length {n}: this model has {max} positions (max_position_embeddings in its config.json); use --max-length {max} or less");
            }
        }
    }
    if args.eval_held_out.is_some() && args.train_size.is_none() {
        usage!("--eval-held-out needs --train-size (it evaluates on examples the subset left unused)");
    }
    if args.eval_held_out == Some(0) {
        usage!("--eval-held-out 0: evaluate at least one example");
    }
    if args.eval_data.is_some() && args.eval_held_out.is_some() {
        usage!("--eval-data and --eval-held-out both choose the evaluation set; pass one");
    }
    if let Some(p) = &args.eval_data {
        if !p.exists() {
            return Err(crate::common::not_found(p, "--eval-data: no such file or directory"));
        }
    }
    if let Some(r) = &args.resume {
        if !r.exists() {
            return Err(crate::common::not_found(r, "--resume: no such folder (pass OUT/last of the earlier run)"));
        }
    }
    adapter_config(args, mt, classification)?;
    let mut inputs: Vec<(&str, &Path)> = vec![("--model", &args.model), ("--data", &args.data)];
    if let Some(p) = &args.eval_data {
        inputs.push(("--eval-data", p));
    }
    let reuse = Reuse::EmptyOrOverwrite(args.overwrite || args.resume.is_some());
    let out = check_output("--output", &args.output, &inputs, reuse)?;
    Ok(Checked { dir, dtype, tcfg, out })
}

pub fn run(mut args: TrainArgs) -> Result<u8> {
    let c = check(&mut args)?;
    let started = Instant::now();
    let result = c.out.probe_writable().and_then(|_| match args.task {
        TaskKind::CausalLm => run_causal(&args, &c, started),
        _ => run_classification(&args, &c, started),
    });
    if result.is_err() {
        c.out.cleanup_after_failure();
    }
    result
}

/// A classification data set with the labels and a description of each example.
struct ClsData {
    data: Arc<dyn Dataset>,
    describe: Box<dyn Fn(usize) -> String>,
    labels: Vec<String>,
}

fn snippet(s: &str, n: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > n {
        format!("{}…", flat.chars().take(n).collect::<String>())
    } else {
        flat
    }
}

fn open_text_cls(path: &Path, tok: &TextTokenizer, map: Option<LabelMap>, device: &Device) -> Result<ClsData> {
    let ds = Arc::new(
        TextClassification::from_file(path, &Columns::default(), tok, map, device)
            .with_context(|| format!("reading {}", path.display()))?,
    );
    let labels = ds.label_map().names().to_vec();
    let d2 = ds.clone();
    Ok(ClsData { data: ds, describe: Box::new(move |i| snippet(d2.text(i).unwrap_or(""), 60)), labels })
}

fn open_image_cls(path: &Path, pre: ImagePreprocess, device: &Device) -> Result<ClsData> {
    let is_idx = path.is_file()
        || ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"].iter().any(|f| path.join(f).is_file());
    if is_idx {
        let ds = open_image_classification(path, pre, device)?;
        let labels = ds.label_names().map(<[String]>::to_vec).unwrap_or_default();
        return Ok(ClsData { data: ds, describe: Box::new(|i| format!("#{i}")), labels });
    }
    let ds = Arc::new(ImageFolder::open(path, pre, device)?);
    // Every image is checked before training: a broken file fails now, not mid-epoch.
    check_image_files(ds.paths())?;
    let labels = ds.classes().to_vec();
    let d2 = ds.clone();
    let root = path.to_path_buf();
    Ok(ClsData {
        data: ds,
        describe: Box::new(move |i| {
            d2.paths().get(i).map(|p| p.strip_prefix(&root).unwrap_or(p).display().to_string()).unwrap_or_default()
        }),
        labels,
    })
}

fn tokenizer(args: &TrainArgs, causal: bool, positions: Option<usize>) -> Result<TextTokenizer> {
    let path = args.tokenizer.clone().unwrap_or_else(|| args.model.join("tokenizer.json"));
    if !path.is_file() {
        return Err(crate::common::not_found(
            &path,
            "no tokenizer.json; put the model's tokenizer.json there or pass --tokenizer PATH",
        ));
    }
    let mut opts = TokenizeOptions {
        max_length: if causal { None } else { args.max_length },
        pad_token: args.pad_token.clone(),
        ..TokenizeOptions::default()
    };
    let tok = TextTokenizer::from_file(&path, &opts)?;
    // The tokenizer's own length may exceed what the model reads (a tokenizer saved with 512 on a
    // smaller model): cap it at the model's positions (a flag beyond them was refused earlier).
    match positions {
        Some(max) if !causal && tok.max_length() > max => {
            opts.max_length = Some(max);
            Ok(TextTokenizer::from_file(&path, &opts)?)
        }
        _ => Ok(tok),
    }
}

/// The longest sequence the model's position embeddings allow (BERT-style encoders).
fn max_positions(dir: &ModelDir) -> Option<usize> {
    let max = dir.config.get("max_position_embeddings").or_else(|| dir.config.get("n_positions"))?.as_u64()? as usize;
    Some(if dir.model_type == "roberta" { max.saturating_sub(2) } else { max })
}

struct Plan {
    train: Vec<usize>,
    val: Vec<usize>,
    rest: Vec<usize>,
}

fn plan_split(args: &TrainArgs, n: usize, stratify: Option<&[u32]>) -> Result<Plan> {
    if let Some(k) = args.train_size {
        if k < 2 {
            usage!("--train-size {k}: needs at least 2 examples (80 % train, 20 % validation)");
        }
        if k > n {
            usage!("--train-size {k}: the data has only {n} example(s)");
        }
        let s = train_size_subset(n, k, args.seed, stratify)?;
        return Ok(Plan { train: s.train, val: s.val, rest: s.rest });
    }
    if args.val_fraction == 0.0 {
        return Ok(Plan { train: (0..n).collect(), val: Vec::new(), rest: Vec::new() });
    }
    if !(args.val_fraction > 0.0 && args.val_fraction < 1.0) {
        usage!("--val-fraction {}: must be in [0, 1)", args.val_fraction);
    }
    let s = train_val_split(n, ValSize::Fraction(args.val_fraction), args.seed, stratify)
        .map_err(|e| UsageError(format!("{e} (data {}: {n} example(s))", args.data.display())))?;
    Ok(Plan { train: s.train, val: s.val, rest: s.rest })
}

/// Writes the task metadata into the run folder and the adapter folders the trainer fills, so
/// `best/` or `last/` shipped alone still says how to predict with it.
fn write_task_meta(out: &Path, meta: &TaskMeta) -> Result<()> {
    for d in [out.to_path_buf(), out.join("best"), out.join("last")] {
        meta.write(&d).with_context(|| format!("writing task metadata into {}", d.display()))?;
    }
    Ok(())
}

fn run_classification(args: &TrainArgs, c: &Checked, started: Instant) -> Result<u8> {
    let device = Device::Cpu;
    let text = args.task == TaskKind::TextClassification;
    let mt = c.dir.model_type.as_str();
    let pooling = args.pooling.as_deref().and_then(Pooling::from_name).unwrap_or_else(|| Pooling::default_for(mt));
    let (tok, pre) = if text {
        (Some(tokenizer(args, false, max_positions(&c.dir))?), None)
    } else {
        (None, Some(ImagePreprocess::for_model_dir(&args.model)?))
    };
    let open = |p: &Path, map: Option<LabelMap>| -> Result<ClsData> {
        match (&tok, &pre) {
            (Some(t), _) => open_text_cls(p, t, map, &device),
            (_, Some(pr)) => open_image_cls(p, pr.clone(), &device),
            _ => usage!("no tokenizer or image preprocessing for {mt}"),
        }
    };
    let train = open(&args.data, None)?;
    let n = train.data.len();
    if train.labels.len() < 2 {
        usage!("{}: {} class(es) found; classification needs at least 2", args.data.display(), train.labels.len());
    }
    // The evaluation set is opened (and checked) now, not after training.
    let eval_set = match &args.eval_data {
        Some(p) => {
            let d = open(p, Some(LabelMap::new(train.labels.clone())?))?;
            if !text && d.labels != train.labels {
                usage!("--eval-data {}: classes {:?} differ from the training classes {:?}", p.display(), d.labels, train.labels);
            }
            Some(d)
        }
        None => None,
    };
    let plan = plan_split(args, n, train.data.class_ids())?;
    if let Some(k) = args.eval_held_out {
        if plan.rest.is_empty() {
            usage!("--eval-held-out {k}: no unused examples left (the data has {n}, --train-size takes them all)");
        }
    }
    note!(
        "data: {} ({n} examples, {} classes: {}); train {} / validation {}{}",
        args.data.display(),
        train.labels.len(),
        train.labels.join(", "),
        plan.train.len(),
        plan.val.len(),
        if plan.rest.is_empty() { String::new() } else { format!(" / unused {}", plan.rest.len()) }
    );
    // The model and the adapter are built before anything is written, so a run that cannot start
    // leaves no files behind.
    let state = Arc::new(RunState::new(args.seed));
    let (model, registry, info) = Classifier::load(&c.dir, train.labels.len(), pooling, c.dtype, &device, state, args.seed)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let mut pm = PeftModel::new(model, registry, info, adapter_config(args, mt, true)?, "default").map_err(flag_error)?;
    let sha = data_fingerprint(&args.data)?;
    let meta = TaskMeta {
        task: args.task.meta(),
        model_type: mt.to_string(),
        labels: train.labels.clone(),
        pooling: Some(pooling.name().to_string()),
        max_length: tok.as_ref().map(TextTokenizer::max_length),
    };
    write_task_meta(&args.output, &meta)?;
    SplitRecord {
        data: args.data.display().to_string(),
        examples: n,
        seed: args.seed,
        data_sha256: Some(sha),
        train: plan.train.clone(),
        validation: plan.val.clone(),
        unused: plan.rest.clone(),
    }
    .write(&args.output)?;
    let report = {
        let mut data = SplitData::new(train.data.clone(), plan.train.clone(), plan.val.clone(), args.batch_size, args.seed)?;
        let r = fit(args, c.tcfg.clone(), &mut pm, &ClassificationObjective, &mut data)?;
        drop(pm);
        r
    };

    // Held-out evaluation of the best adapter, through the library's predictor.
    let (set, idx, what) = match (eval_set, args.eval_held_out) {
        (Some(d), _) => {
            let idx: Vec<usize> = (0..d.data.len()).collect();
            let what = args.eval_data.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
            (d, idx, what)
        }
        (None, Some(k)) => {
            let idx: Vec<usize> = plan.rest.iter().copied().take(k).collect();
            let what = format!("{} held-out examples of {}", idx.len(), args.data.display());
            (train, idx, what)
        }
        (None, None) => return finish(args, &report, serde_json::Value::Null, started),
    };
    let best = args.output.join("best");
    let opts = PredictorOptions { tokenizer: args.tokenizer.clone(), dtype: c.dtype, seed: args.seed, ..PredictorOptions::default() };
    let overrides = TaskOverrides { labels: Some(meta.labels.clone()), pooling: Some(pooling), max_length: meta.max_length };
    let mut p = Predictor::open_with_adapter(&args.model, &best, &opts, &overrides)
        .with_context(|| format!("loading {}", best.display()))?;
    let t0 = Instant::now();
    let mut ys = vec![0usize; idx.len()];
    let cfg = PredictConfig { samples: 1, ..PredictConfig::default() };
    let preds = p.predict_all(
        pvera::checkpoint::DEFAULT_ADAPTER,
        idx.len(),
        args.batch_size,
        &cfg,
        &mut |_, chunk| {
            let b: Batch = set.data.get_batch(&chunk.iter().map(|&i| idx[i]).collect::<Vec<_>>())?;
            for (k, y) in batch_labels(&b.labels)?.into_iter().enumerate() {
                ys[chunk[k]] = y;
            }
            Ok(b.inputs)
        },
        &mut |_, _| {},
    )?;
    let correct = preds.iter().zip(&ys).filter(|(p, &y)| p.predicted() == y).count();
    let acc = correct as f64 / preds.len() as f64;
    let loss = preds.iter().zip(&ys).map(|(p, &y)| -p.mean_mode[y].max(f64::MIN_POSITIVE).ln()).sum::<f64>() / preds.len() as f64;
    note!(
        "eval (best adapter, epoch {}): {what}: accuracy {acc:.4} ({correct}/{}), loss {loss:.4}, {:.1}s",
        report.best_epoch.map_or("-".to_string(), |e| e.to_string()),
        preds.len(),
        t0.elapsed().as_secs_f64()
    );
    let shown = preds.iter().zip(&ys).zip(&idx).take(args.show_predictions);
    if args.show_predictions > 0 {
        note!("predictions:");
    }
    for ((pr, &y), &i) in shown {
        let k = pr.predicted();
        note!(
            "  [{}] true {:<8} predicted {:<8} p={:.3}  {}",
            if y == k { "ok" } else { "XX" },
            meta.labels[y],
            meta.labels[k],
            pr.probability(),
            (set.describe)(i)
        );
    }
    let eval_json = serde_json::json!({
        "data": what, "examples": preds.len(), "correct": correct, "accuracy": acc, "loss": loss,
        "best_epoch": report.best_epoch,
    });
    finish(args, &report, eval_json, started)
}

fn run_causal(args: &TrainArgs, c: &Checked, started: Instant) -> Result<u8> {
    let device = Device::Cpu;
    let tok = tokenizer(args, true, None)?;
    let block = args.max_length.unwrap_or(128);
    let open = |p: &Path| -> Result<Arc<dyn Dataset>> {
        Ok(Arc::new(
            CausalLm::from_text_file(p, &tok, &CausalLmOptions::new(block), &device)
                .with_context(|| format!("reading {}", p.display()))?,
        ))
    };
    let ds = open(&args.data)?;
    let n = ds.len();
    if n == 0 {
        usage!("{}: too little text for one block of {block} tokens; lower --max-length", args.data.display());
    }
    let eval = match &args.eval_data {
        Some(p) => {
            let e = open(p)?;
            if e.is_empty() {
                usage!("--eval-data {}: too little text for one block of {block} tokens", p.display());
            }
            Some(e)
        }
        None => None,
    };
    let plan = plan_split(args, n, None)?;
    note!("data: {} ({n} blocks of {block} tokens); train {} / validation {}", args.data.display(), plan.train.len(), plan.val.len());
    let meta = TaskMeta {
        task: MetaTask::CausalLm,
        model_type: c.dir.model_type.clone(),
        labels: Vec::new(),
        pooling: None,
        max_length: Some(block),
    };
    let state = Arc::new(RunState::new(args.seed));
    let (model, registry, info) =
        AnyModel::load(&c.dir, c.dtype, &device, state).with_context(|| format!("loading model {}", args.model.display()))?;
    let mut pm = PeftModel::new(model, registry, info, adapter_config(args, &c.dir.model_type, false)?, "default").map_err(flag_error)?;
    write_task_meta(&args.output, &meta)?;
    let mut data = SplitData::new(ds.clone(), plan.train.clone(), plan.val.clone(), args.batch_size, args.seed)?;
    let report = fit(args, c.tcfg.clone(), &mut pm, &CausalLmObjective, &mut data)?;
    let mut eval_json = serde_json::Value::Null;
    if let (Some(eval), Some(p)) = (eval, &args.eval_data) {
        let best = args.output.join("best");
        pvera::train::load_adapter_weights(&mut pm, &best).with_context(|| format!("loading {}", best.display()))?;
        pm.eval()?;
        pm.state().set_grad_enabled(false)?;
        let (mut sum, mut tokens) = (0.0f64, 0usize);
        let idx: Vec<usize> = (0..eval.len()).collect();
        for chunk in idx.chunks(args.batch_size.max(1)) {
            let b = eval.get_batch(chunk)?;
            let out = pm.model().forward(&b.inputs)?;
            let logits = out.logits.as_ref().context("the model returned no logits")?;
            let (loss, k) = causal_lm_loss(logits, &b.labels, b.inputs.attention_mask.as_ref())?;
            sum += loss.to_scalar::<f32>()? as f64 * k as f64;
            tokens += k;
        }
        let loss = sum / tokens.max(1) as f64;
        note!("eval (best adapter): {}: loss {loss:.4}, perplexity {:.2} ({tokens} tokens)", p.display(), loss.exp());
        eval_json = serde_json::json!({"data": p.display().to_string(), "tokens": tokens, "loss": loss, "perplexity": loss.exp()});
    }
    finish(args, &report, eval_json, started)
}

/// How often a progress line is written when stderr is not a terminal (a log file, a pipe):
/// every 10 s, or every `PVERA_PROGRESS_SECS` seconds.
fn log_every() -> Duration {
    let secs = std::env::var("PVERA_PROGRESS_SECS").ok().and_then(|v| v.parse::<f64>().ok()).filter(|v| *v >= 0.0);
    Duration::from_secs_f64(secs.unwrap_or(10.0))
}

/// Ctrl-C (SIGINT) or SIGTERM: the first one asks the trainer to stop after the current
/// optimizer step and save a resumable `last/`; a second one ends the process at once (exit 130).
fn stop_flag() -> Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        // Registered first: when the flag is already set (a second signal), exit with 130.
        signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone()).context("installing a signal handler")?;
        signal_hook::flag::register(sig, flag.clone()).context("installing a signal handler")?;
    }
    Ok(flag)
}

/// Training was interrupted by a signal after saving a resumable checkpoint (exit 130, the
/// shell's code for SIGINT).
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Interrupted {}

fn fit<M, T>(args: &TrainArgs, mut tcfg: TrainConfig, pm: &mut PeftModel<M>, task: &T, data: &mut SplitData) -> Result<TrainReport>
where
    T: Objective<M, Batch = Batch>,
{
    tcfg.data_fingerprint = Some(data_fingerprint(&args.data)?);
    let mut trainer = Trainer::new(tcfg).map_err(flag_error)?;
    trainer.set_stop_flag(stop_flag()?);
    if let Some(r) = &args.resume {
        trainer.resume_from(pm, r).map_err(resume_error).with_context(|| format!("resuming from {}", r.display()))?;
    }
    let mut interrupted: Option<String> = None;
    let mut warned = std::collections::BTreeSet::new();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    let (mut steps_per_epoch, mut epochs) = (0usize, 0usize);
    let mut last_log = Instant::now();
    let every = log_every();
    let mut seen: Vec<EpochMetrics> = Vec::new();
    let out = args.output.clone();
    let result = trainer.fit(pm, task, data, |ev| match ev {
        TrainEvent::Started { trainable, steps, steps_per_epoch: spe, epochs: e, start_epoch, .. } => {
            note!("{trainable}");
            note!(
                "training: {e} epoch(s) x {spe} step(s) = {steps} optimizer steps{}",
                if start_epoch > 1 { format!(", resuming at epoch {start_epoch}") } else { String::new() }
            );
            steps_per_epoch = spe;
            epochs = e;
        }
        TrainEvent::Warning { message } => {
            // The same warning at every save (e.g. save_projection=false) is said once per run.
            if warned.insert(message.clone()) {
                warn_line!("warning: {message}");
            }
        }
        TrainEvent::Interrupted { message, .. } => interrupted = Some(message),
        TrainEvent::Step { epoch, step, steps, loss, examples_per_sec, lr, examples, correct, .. } => {
            let acc = match correct {
                Some(c) if examples > 0 => format!(" acc {:.3}", c as f64 / examples as f64),
                _ => String::new(),
            };
            let msg = format!("loss {loss:.4}{acc} {examples_per_sec:.1} ex/s lr {lr:.2e}");
            if tty {
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(steps_per_epoch as u64).with_style(style.clone());
                    b.set_prefix(format!("epoch {epoch}/{epochs}"));
                    b
                });
                b.set_message(msg);
                b.inc(1);
            } else if last_log.elapsed() >= every {
                last_log = Instant::now();
                note!("epoch {epoch}/{epochs} step {step}/{steps}: {msg}");
            }
        }
        TrainEvent::EpochEnd { metrics: m } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            note!("{}", epoch_line(&m, epochs));
            seen.push(m);
            // Keep the files current during the run (rewritten in full at the end).
            let _ = write_curves(&out, &seen);
        }
        TrainEvent::EarlyStop { epoch, best_epoch, patience, .. } => {
            note!("early stop after epoch {epoch}: no improvement for {patience} epoch(s); best epoch {best_epoch}")
        }
        _ => {}
    });
    if let Some(b) = bar.take() {
        b.abandon();
    }
    match result {
        Ok(r) if r.stop == StopReason::Interrupted => {
            let _ = write_curves(&args.output, &r.epochs);
            let msg = interrupted.unwrap_or_else(|| format!("training interrupted; resume with --resume {}", args.output.join("last").display()));
            Err(anyhow::Error::new(Interrupted(msg)))
        }
        Ok(r) => Ok(r),
        Err(e @ pvera::Error::NonFinite { .. }) => Err(anyhow::Error::new(Diverged(e.to_string()))),
        Err(e) => Err(e.into()),
    }
}

/// A resume that does not fit the flags (a finished run, other data, ...) is a flag problem.
fn resume_error(e: pvera::Error) -> anyhow::Error {
    match e {
        e @ (pvera::Error::InvalidConfig { .. } | pvera::Error::Data(_)) => anyhow::Error::new(UsageError(e.to_string())),
        other => anyhow::Error::new(other),
    }
}

fn fmt_opt(v: Option<f64>, p: usize) -> String {
    v.map_or("-".to_string(), |x| format!("{x:.p$}"))
}

fn epoch_line(m: &EpochMetrics, epochs: usize) -> String {
    format!(
        "epoch {}/{epochs}: train loss {:.4} acc {} | val loss {} acc {} | {:.1}s, {:.1} ex/s{}",
        m.epoch,
        m.train_loss,
        fmt_opt(m.train_accuracy, 4),
        fmt_opt(m.val_loss, 4),
        fmt_opt(m.val_accuracy, 4),
        m.seconds,
        m.examples_per_sec,
        if m.is_best { "  *best" } else { "" }
    )
}

fn finish(args: &TrainArgs, report: &TrainReport, eval: serde_json::Value, started: Instant) -> Result<u8> {
    write_curves(&args.output, &report.epochs)?;
    let mut json = serde_json::to_value(report)?;
    json["method"] = serde_json::json!(args.method.method().name());
    json["eval"] = eval;
    json["wall_seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
    pvera::checkpoint::write_atomic(&args.output.join("metrics.json"), (serde_json::to_string_pretty(&json)? + "\n").as_bytes())?;
    note!(
        "done in {:.1}s: best epoch {} -> {}; last -> {}; metrics.json, metrics.csv, training_curve.svg in {}",
        started.elapsed().as_secs_f64(),
        report.best_epoch.map_or("-".to_string(), |e| e.to_string()),
        args.output.join("best").display(),
        args.output.join("last").display(),
        args.output.display()
    );
    Ok(0)
}
