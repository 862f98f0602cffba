//! `pvera train`: fine-tune a frozen model with a fresh PVeRA adapter on a local data set.

use std::cell::Cell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use pvera::config::{Bias, LayersToTransform, PveraConfig, TargetModules};
use pvera::data::images::{ImageFolder, ImagePreprocess};
use pvera::data::split::{train_size_subset, train_val_split, ValSize};
use pvera::data::text::{CausalLm, CausalLmOptions, Columns, LabelMap, TextClassification, TextTokenizer, TokenizeOptions};
use pvera::data::{open_image_classification, Batch, Dataset};
use pvera::models::heads::{Classifier, Pooling};
use pvera::models::loader::ModelDir;
use pvera::models::AnyModel;
use pvera::train::{causal_lm_loss, CausalLmObjective, ClassificationObjective, SplitData};
use pvera::train::{
    load_adapter_weights, EpochMetrics, Objective, ScheduleKind, StepOutput, TrainConfig, TrainEvent, TrainReport, Trainer,
    Warmup,
};
use pvera::{PeftModel, RunState};

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
    /// Output directory: best/ and last/ adapters, metrics.json, metrics.csv, training_curve.svg.
    #[arg(long)]
    pub output: PathBuf,
    /// tokenizer.json (default: <model>/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Padding token for tokenizers without one (e.g. GPT-2 / LLaMA: their EOS token).
    #[arg(long)]
    pub pad_token: Option<String>,

    // ---- adapter (PEFT's PveraConfig) ----
    /// Rank of the shared random projections.
    #[arg(long, default_value_t = 256)]
    pub r: i64,
    /// Modules to adapt: a comma list of names (`query,value`), a regex (full match), or
    /// `all-linear` (default: the model type's PEFT default).
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
    /// Comma list of extra modules trained in full (default: `classifier` for classification tasks).
    #[arg(long)]
    pub modules_to_save: Option<String>,
    /// Biases to train: none, all or pvera_only.
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
    /// β of the KL term of the PVeRA latent.
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
    /// Continue from a `last/` checkpoint of an earlier run with the same settings.
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

/// Training stopped on a non-finite loss, gradient or variable (exit code 8).
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Diverged {}

/// A wrong flag value or unusable data found after parsing (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

macro_rules! usage {
    ($($t:tt)*) => { return Err(anyhow::Error::new(UsageError(format!($($t)*)))) };
}

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

fn adapter_config(args: &TrainArgs, classification: bool) -> Result<PveraConfig> {
    let mut cfg = PveraConfig { r: args.r, ..PveraConfig::default() };
    cfg.target_modules = args.target_modules.as_deref().map(parse_target_modules);
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
    cfg.pvera_dropout = args.dropout;
    cfg.projection_prng_key = args.projection_prng_key;
    cfg.save_projection = args.save_projection;
    cfg.modules_to_save = match &args.modules_to_save {
        Some(s) => {
            let v = parse_list(s);
            (!v.is_empty()).then_some(v)
        }
        None if classification => Some(vec!["classifier".to_string()]),
        None => None,
    };
    cfg.bias = Bias::parse(&args.bias)?;
    cfg.base_model_name_or_path = Some(args.model.display().to_string());
    Ok(cfg)
}

/// Counts correct predictions of the training micro-batches for the progress bar.
struct Tracked<T> {
    inner: T,
    correct: Cell<usize>,
    examples: Cell<usize>,
}

impl<M, T: Objective<M>> Objective<M> for Tracked<T> {
    type Batch = T::Batch;
    fn step(&self, model: &PeftModel<M>, batch: &Self::Batch) -> pvera::Result<StepOutput> {
        let out = self.inner.step(model, batch)?;
        if let Some(c) = out.correct {
            self.correct.set(self.correct.get() + c);
            self.examples.set(self.examples.get() + out.examples);
        }
        Ok(out)
    }
}

/// Describes example `i` of a data set for the prediction printout.
type Describe = Box<dyn Fn(usize) -> String>;

struct ClsData {
    data: Arc<dyn Dataset>,
    describe: Describe,
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
    if !path.exists() {
        return Err(anyhow::Error::new(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{}: no such file or directory", path.display()),
        )));
    }
    let is_idx = path.is_file()
        || ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"].iter().any(|f| path.join(f).is_file());
    if is_idx {
        let ds = open_image_classification(path, pre, device)?;
        let labels = ds.label_names().map(<[String]>::to_vec).unwrap_or_default();
        return Ok(ClsData { data: ds, describe: Box::new(|i| format!("#{i}")), labels });
    }
    let ds = Arc::new(ImageFolder::open(path, pre, device)?);
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

fn tokenizer(args: &TrainArgs, causal: bool) -> Result<TextTokenizer> {
    let path = args.tokenizer.clone().unwrap_or_else(|| args.model.join("tokenizer.json"));
    if !path.is_file() {
        return Err(anyhow::Error::new(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{}: no tokenizer.json; put the model's tokenizer.json there or pass --tokenizer PATH", path.display()),
        )));
    }
    let opts = TokenizeOptions {
        max_length: if causal { None } else { args.max_length },
        pad_token: args.pad_token.clone(),
        ..TokenizeOptions::default()
    };
    Ok(TextTokenizer::from_file(&path, &opts)?)
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
    Ok(TrainConfig {
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
    })
}

pub fn run(mut args: TrainArgs) -> Result<u8> {
    args.model = pvera::models::loader::resolve_model_dir(&args.model)?;
    if let Some(t) = args.threads {
        if t == 0 {
            usage!("--threads 0: use at least one thread");
        }
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let device = Device::Cpu;
    let dtype = crate::infer::parse_dtype(args.dtype.as_deref())?;
    let tcfg = train_config(&args)?;
    let dir = ModelDir::open(&args.model).with_context(|| format!("opening model {}", args.model.display()))?;
    if !args.data.exists() {
        return Err(anyhow::Error::new(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("--data {}: no such file or directory", args.data.display()),
        )));
    }
    std::fs::create_dir_all(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    let started = Instant::now();
    match args.task {
        TaskKind::CausalLm => run_causal(&args, &dir, dtype, &device, tcfg, started),
        _ => run_classification(&args, &dir, dtype, &device, tcfg, started),
    }
}

fn run_classification(
    args: &TrainArgs,
    dir: &ModelDir,
    dtype: Option<DType>,
    device: &Device,
    tcfg: TrainConfig,
    started: Instant,
) -> Result<u8> {
    let text = args.task == TaskKind::TextClassification;
    let mt = dir.model_type.as_str();
    match (text, mt) {
        (true, "bert" | "roberta") | (false, "vit" | "dinov2") => {}
        _ => usage!(
            "--task {:?} does not fit model_type {mt:?}: text-classification needs bert/roberta, \
             image-classification vit/dinov2",
            args.task
        ),
    }
    let pooling_name = args.pooling.clone().unwrap_or_else(|| {
        match mt {
            "vit" => "cls",
            "dinov2" => "cls-mean-patch",
            _ => "mean",
        }
        .to_string()
    });
    let Some(pooling) = Pooling::from_name(&pooling_name) else {
        usage!("--pooling {pooling_name:?}: expected cls, pooler, mean or cls-mean-patch");
    };
    let (tok, pre) = if text {
        (Some(tokenizer(args, false)?), None)
    } else {
        (None, Some(ImagePreprocess::for_model_dir(&args.model)?))
    };
    let train = match (&tok, &pre) {
        (Some(t), _) => open_text_cls(&args.data, t, None, device)?,
        (_, Some(p)) => open_image_cls(&args.data, p.clone(), device)?,
        _ => unreachable!(),
    };
    let n = train.data.len();
    if train.labels.len() < 2 {
        usage!("{}: {} class(es) found; classification needs at least 2", args.data.display(), train.labels.len());
    }
    let plan = plan_split(args, n, train.data.class_ids())?;
    println!(
        "data: {} ({n} examples, {} classes: {}); train {} / validation {}{}",
        args.data.display(),
        train.labels.len(),
        train.labels.join(", "),
        plan.train.len(),
        plan.val.len(),
        if plan.rest.is_empty() { String::new() } else { format!(" / unused {}", plan.rest.len()) }
    );
    std::fs::write(args.output.join("labels.json"), serde_json::to_string_pretty(&train.labels)? + "\n")?;
    // What `pvera predict` / `pvera eval` need to rebuild the classifier around best/ or last/.
    let meta = serde_json::json!({
        "task": if text { "text-classification" } else { "image-classification" },
        "model_type": mt,
        "labels": train.labels,
        "pooling": pooling_name,
        "max_length": tok.as_ref().map(TextTokenizer::max_length),
    });
    std::fs::write(args.output.join("pvera_task.json"), serde_json::to_string_pretty(&meta)? + "\n")?;
    // The split, so `pvera eval --held-out-of OUT` evaluates exactly the examples training never saw.
    let split = serde_json::json!({
        "data": args.data.display().to_string(), "examples": n, "seed": args.seed,
        "train": plan.train, "validation": plan.val, "unused": plan.rest,
    });
    std::fs::write(args.output.join("split.json"), serde_json::to_string(&split)? + "\n")?;

    let state = Arc::new(RunState::new(args.seed));
    let (model, registry, info) = Classifier::load(dir, train.labels.len(), pooling, dtype, device, state, args.seed)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let config = adapter_config(args, true)?;
    let mut pm = PeftModel::new(model, registry, info, config, "default")?;
    let task = Tracked { inner: ClassificationObjective, correct: Cell::new(0), examples: Cell::new(0) };
    let mut data = SplitData::new(train.data.clone(), plan.train.clone(), plan.val.clone(), args.batch_size, args.seed)?;
    let report = fit(args, tcfg, &mut pm, &task, &mut data)?;

    // Held-out evaluation with the best adapter.
    let eval_set: Option<(ClsData, Vec<usize>, String)> = if let Some(p) = &args.eval_data {
        let d = match (&tok, &pre) {
            (Some(t), _) => open_text_cls(p, t, Some(LabelMap::new(train.labels.clone())?), device)?,
            (_, Some(pr)) => {
                let d = open_image_cls(p, pr.clone(), device)?;
                if d.labels != train.labels {
                    usage!(
                        "--eval-data {}: classes {:?} differ from the training classes {:?}",
                        p.display(),
                        d.labels,
                        train.labels
                    );
                }
                d
            }
            _ => unreachable!(),
        };
        let idx = (0..d.data.len()).collect();
        Some((d, idx, p.display().to_string()))
    } else if let Some(k) = args.eval_held_out {
        if args.train_size.is_none() {
            usage!("--eval-held-out needs --train-size (it evaluates on examples the subset left unused)");
        }
        let idx: Vec<usize> = plan.rest.iter().copied().take(k).collect();
        if idx.is_empty() {
            usage!("--eval-held-out {k}: no unused examples left (the data has {n}, --train-size takes them all)");
        }
        let what = format!("{} held-out examples of {}", idx.len(), args.data.display());
        Some((train, idx, what))
    } else {
        None
    };
    let mut eval_json = serde_json::Value::Null;
    if let Some((set, idx, what)) = eval_set {
        let best = args.output.join("best");
        load_adapter_weights(&mut pm, &best).with_context(|| format!("loading {}", best.display()))?;
        pm.eval()?;
        pm.state().set_grad_enabled(false)?;
        let t0 = Instant::now();
        let mut preds: Vec<(usize, u32, u32, f32)> = Vec::with_capacity(idx.len());
        let mut loss_sum = 0.0f64;
        for chunk in idx.chunks(args.batch_size.max(1)) {
            let batch: Batch = set.data.get_batch(chunk)?;
            let logits = pm.model().forward(&batch.inputs)?;
            let (loss, _) = pvera::train::classification_loss(&logits, &batch.labels)?;
            loss_sum += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            let probs = candle_nn_softmax(&logits)?;
            let p: Vec<Vec<f32>> = probs.to_vec2()?;
            let y: Vec<u32> = batch.labels.to_vec1()?;
            for (k, &i) in chunk.iter().enumerate() {
                let (arg, pmax) =
                    p[k].iter().enumerate().fold((0usize, f32::MIN), |a, (j, &v)| if v > a.1 { (j, v) } else { a });
                preds.push((i, y[k], arg as u32, pmax));
            }
        }
        let correct = preds.iter().filter(|p| p.1 == p.2).count();
        let acc = correct as f64 / preds.len() as f64;
        let eval_loss = loss_sum / preds.len() as f64;
        println!(
            "eval (best adapter, epoch {}): {what}: accuracy {:.4} ({correct}/{}), loss {eval_loss:.4}, {:.1}s",
            report.best_epoch.map_or("-".to_string(), |e| e.to_string()),
            acc,
            preds.len(),
            t0.elapsed().as_secs_f64()
        );
        let shown: Vec<&(usize, u32, u32, f32)> = preds.iter().take(args.show_predictions).collect();
        if !shown.is_empty() {
            println!("predictions:");
            for (i, y, p, prob) in shown {
                println!(
                    "  [{}] true {:<8} predicted {:<8} p={prob:.3}  {}",
                    if y == p { "ok" } else { "XX" },
                    set.labels[*y as usize],
                    set.labels[*p as usize],
                    (set.describe)(*i)
                );
            }
        }
        eval_json = serde_json::json!({
            "data": what, "examples": preds.len(), "correct": correct, "accuracy": acc, "loss": eval_loss,
            "best_epoch": report.best_epoch,
        });
    }
    finish(args, &report, eval_json, started)
}

fn candle_nn_softmax(logits: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(D::Minus1)?;
    let e = logits.broadcast_sub(&max)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

fn run_causal(
    args: &TrainArgs,
    dir: &ModelDir,
    dtype: Option<DType>,
    device: &Device,
    tcfg: TrainConfig,
    started: Instant,
) -> Result<u8> {
    let mt = dir.model_type.as_str();
    if !matches!(mt, "llama" | "gpt2") {
        usage!("--task causal-lm needs a llama or gpt2 model; {} has model_type {mt:?}", args.model.display());
    }
    if args.pooling.is_some() {
        usage!("--pooling applies to classification tasks only");
    }
    let tok = tokenizer(args, true)?;
    let block = args.max_length.unwrap_or(128);
    if block < 2 {
        usage!("--max-length {block}: causal-LM blocks need at least 2 tokens");
    }
    let open = |p: &Path| -> Result<Arc<dyn Dataset>> {
        Ok(Arc::new(
            CausalLm::from_text_file(p, &tok, &CausalLmOptions::new(block), device)
                .with_context(|| format!("reading {}", p.display()))?,
        ))
    };
    let ds = open(&args.data)?;
    let n = ds.len();
    if n == 0 {
        usage!("{}: too little text for one block of {block} tokens; lower --max-length", args.data.display());
    }
    let plan = plan_split(args, n, None)?;
    println!(
        "data: {} ({n} blocks of {block} tokens); train {} / validation {}",
        args.data.display(),
        plan.train.len(),
        plan.val.len()
    );
    let state = Arc::new(RunState::new(args.seed));
    let (model, registry, info) =
        AnyModel::load(dir, dtype, device, state).with_context(|| format!("loading model {}", args.model.display()))?;
    let config = adapter_config(args, false)?;
    let mut pm = PeftModel::new(model, registry, info, config, "default")?;
    let task = Tracked { inner: CausalLmObjective, correct: Cell::new(0), examples: Cell::new(0) };
    let mut data = SplitData::new(ds.clone(), plan.train.clone(), plan.val.clone(), args.batch_size, args.seed)?;
    let report = fit(args, tcfg, &mut pm, &task, &mut data)?;
    let mut eval_json = serde_json::Value::Null;
    if let Some(p) = &args.eval_data {
        let eval = open(p)?;
        if eval.is_empty() {
            usage!("--eval-data {}: too little text for one block of {block} tokens", p.display());
        }
        let best = args.output.join("best");
        load_adapter_weights(&mut pm, &best).with_context(|| format!("loading {}", best.display()))?;
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
        println!("eval (best adapter): {}: loss {loss:.4}, perplexity {:.2} ({tokens} tokens)", p.display(), loss.exp());
        eval_json = serde_json::json!({"data": p.display().to_string(), "tokens": tokens, "loss": loss, "perplexity": loss.exp()});
    }
    finish(args, &report, eval_json, started)
}

fn fit<M, T>(
    args: &TrainArgs,
    tcfg: TrainConfig,
    pm: &mut PeftModel<M>,
    task: &Tracked<T>,
    data: &mut SplitData,
) -> Result<TrainReport>
where
    T: Objective<M, Batch = Batch>,
{
    let mut trainer = Trainer::new(tcfg)?;
    if let Some(r) = &args.resume {
        trainer.resume_from(pm, r).with_context(|| format!("resuming from {}", r.display()))?;
    }
    let style = ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}<{eta})")
        .expect("valid template")
        .progress_chars("=> ");
    let mut bar: Option<ProgressBar> = None;
    let mut steps_per_epoch = 0usize;
    let mut epochs = 0usize;
    let mut seen: Vec<EpochMetrics> = Vec::new();
    let out = args.output.clone();
    let result = trainer.fit(pm, task, data, |ev| match ev {
        TrainEvent::Started { trainable, steps, steps_per_epoch: spe, epochs: e, start_epoch, .. } => {
            println!("{trainable}");
            println!(
                "training: {e} epoch(s) x {spe} step(s) = {steps} optimizer steps{}",
                if start_epoch > 1 { format!(", resuming at epoch {start_epoch}") } else { String::new() }
            );
            steps_per_epoch = spe;
            epochs = e;
        }
        TrainEvent::Warning { message } => eprintln!("warning: {message}"),
        TrainEvent::Step { epoch, loss, examples_per_sec, lr, .. } => {
            let b = bar.get_or_insert_with(|| {
                task.correct.set(0);
                task.examples.set(0);
                let b = ProgressBar::new(steps_per_epoch as u64).with_style(style.clone());
                b.set_prefix(format!("epoch {epoch}/{epochs}"));
                b
            });
            let acc = if task.examples.get() > 0 {
                format!(" acc {:.3}", task.correct.get() as f64 / task.examples.get() as f64)
            } else {
                String::new()
            };
            b.set_message(format!("loss {loss:.4}{acc} {examples_per_sec:.1} ex/s lr {lr:.2e}"));
            b.inc(1);
        }
        TrainEvent::EpochEnd { metrics: m } => {
            if let Some(b) = bar.take() {
                b.finish_and_clear();
            }
            task.correct.set(0);
            task.examples.set(0);
            println!("{}", epoch_line(&m, epochs));
            seen.push(m);
            // Keep the files current during the run (rewritten in full at the end).
            let _ = write_curves(&out, &seen);
        }
        TrainEvent::EarlyStop { epoch, best_epoch, patience, .. } => {
            println!("early stop after epoch {epoch}: no improvement for {patience} epoch(s); best epoch {best_epoch}")
        }
        _ => {}
    });
    if let Some(b) = bar.take() {
        b.abandon();
    }
    match result {
        Ok(r) => Ok(r),
        Err(e @ pvera::Error::NonFinite { .. }) => Err(anyhow::Error::new(Diverged(e.to_string()))),
        Err(e) => Err(e.into()),
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

fn write_curves(out: &Path, epochs: &[EpochMetrics]) -> Result<()> {
    let mut csv = String::from(
        "epoch,step,train_loss,train_kl,train_accuracy,val_loss,val_accuracy,lr,seconds,examples_per_sec,is_best\n",
    );
    let o = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    for m in epochs {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{}",
            m.epoch,
            m.step,
            m.train_loss,
            o(m.train_kl),
            o(m.train_accuracy),
            o(m.val_loss),
            o(m.val_accuracy),
            m.lr,
            m.seconds,
            m.examples_per_sec,
            m.is_best
        );
    }
    std::fs::write(out.join("metrics.csv"), csv)?;
    std::fs::write(out.join("training_curve.svg"), training_curve_svg(epochs))?;
    let json = serde_json::json!({ "epochs": epochs });
    std::fs::write(out.join("metrics.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    Ok(())
}

fn finish(args: &TrainArgs, report: &TrainReport, eval: serde_json::Value, started: Instant) -> Result<u8> {
    write_curves(&args.output, &report.epochs)?;
    let mut json = serde_json::to_value(report)?;
    json["eval"] = eval;
    json["wall_seconds"] = serde_json::json!(started.elapsed().as_secs_f64());
    std::fs::write(args.output.join("metrics.json"), serde_json::to_string_pretty(&json)? + "\n")?;
    println!(
        "done in {:.1}s: best epoch {} -> {}; last -> {}; metrics.json, metrics.csv, training_curve.svg in {}",
        started.elapsed().as_secs_f64(),
        report.best_epoch.map_or("-".to_string(), |e| e.to_string()),
        args.output.join("best").display(),
        args.output.join("last").display(),
        args.output.display()
    );
    Ok(0)
}

/// A hand-written SVG: train / validation loss (left axis) and validation accuracy (right axis,
/// 0..1) per epoch.
pub fn training_curve_svg(epochs: &[EpochMetrics]) -> String {
    let (w, h) = (720.0f64, 400.0f64);
    let (l, r, t, b) = (70.0, 70.0, 40.0, 50.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let n = epochs.len().max(1);
    let x_of = |e: usize| if n == 1 { l + pw / 2.0 } else { l + pw * (e as f64 - 1.0) / (n as f64 - 1.0) };
    let losses: Vec<f64> = epochs
        .iter()
        .flat_map(|m| [Some(m.train_loss), m.val_loss])
        .flatten()
        .filter(|v| v.is_finite())
        .collect();
    let lmax = losses.iter().copied().fold(0.0f64, f64::max).max(1e-6) * 1.05;
    let y_loss = |v: f64| t + ph * (1.0 - v / lmax);
    let y_acc = |v: f64| t + ph * (1.0 - v);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">pvera train: loss and validation accuracy</text>"#, w / 2.0);
    let _ = writeln!(s, r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let y = t + ph * (1.0 - f);
        let _ = writeln!(s, r##"<line x1="{l}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##, l + pw);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{:.3}</text>"#, l - 6.0, y + 4.0, lmax * f);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}">{:.2}</text>"#, l + pw + 6.0, y + 4.0, f);
    }
    for m in epochs {
        let x = x_of(m.epoch.saturating_sub(epochs[0].epoch) + 1);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, t + ph + 18.0, m.epoch);
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">epoch</text>"#, l + pw / 2.0, h - 8.0);
    let _ = writeln!(s, r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">loss</text>"#, t + ph / 2.0, t + ph / 2.0);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle" transform="rotate(90 {} {})">accuracy</text>"#, w - 14.0, t + ph / 2.0, w - 14.0, t + ph / 2.0);
    let series: [(&str, &str, &str, Box<dyn Fn(&EpochMetrics) -> Option<f64>>, bool); 3] = [
        ("train loss", "#1f77b4", "", Box::new(|m| Some(m.train_loss)), false),
        ("val loss", "#ff7f0e", "", Box::new(|m| m.val_loss), false),
        ("val accuracy", "#2ca02c", r#" stroke-dasharray="6 4""#, Box::new(|m| m.val_accuracy), true),
    ];
    for (i, (name, color, dash, get, acc)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = epochs
            .iter()
            .filter_map(|m| {
                let v = get(m)?;
                v.is_finite().then(|| {
                    (x_of(m.epoch.saturating_sub(epochs[0].epoch) + 1), if *acc { y_acc(v) } else { y_loss(v) })
                })
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#, p.join(" "));
        for (x, y) in &pts {
            let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#);
        }
        let ly = t + 14.0 + 16.0 * i as f64;
        let lx = l + 10.0;
        let _ = writeln!(s, r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#, lx + 22.0);
        let _ = writeln!(s, r#"<text x="{}" y="{}">{name}</text>"#, lx + 28.0, ly + 4.0);
    }
    s.push_str("</svg>\n");
    s
}
