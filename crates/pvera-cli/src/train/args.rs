//! `pvera train`'s flags: their definitions, and their conversion into the library's adapter and
//! training configurations, every value, path and combination checked before the model is
//! loaded (a bad flag fails in a second, naming itself, and leaves nothing behind).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::DType;
use pvera::config::{Bias, LayersToTransform, Method, PveraConfig, TargetModules};
use pvera::data::labelled::max_positions;
use pvera::models::heads::Pooling;
use pvera::models::loader::ModelDir;
use pvera::predictor::meta::TaskKind as MetaTask;
use pvera::train::{ScheduleKind, TrainConfig, Warmup};

use crate::common::{check_output, flag_error, set_threads, OutputDir, Reuse};
use crate::usage;

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
    pub fn meta(self) -> MetaTask {
        match self {
            TaskKind::ImageClassification => MetaTask::ImageClassification,
            TaskKind::TextClassification => MetaTask::TextClassification,
            TaskKind::CausalLm => MetaTask::CausalLm,
        }
    }
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


fn parse_list(s: &str) -> Vec<String> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect()
}

/// `query,value` -> list; `all-linear` -> all linear; anything with regex characters -> a regex
/// (PEFT's `str` form, full match); a single plain name -> a one-element list.
fn parse_target_modules(s: &str) -> TargetModules {
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

pub fn adapter_config(args: &TrainArgs, model_type: &str, classification: bool) -> Result<PveraConfig> {
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
    if cfg.target_modules.is_none()
        && pvera::targets::default_target_modules(method, model_type).is_none()
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
pub struct Checked {
    pub dir: ModelDir,
    pub dtype: Option<DType>,
    pub tcfg: TrainConfig,
    pub out: OutputDir,
}

pub fn check(args: &mut TrainArgs) -> Result<Checked> {
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

