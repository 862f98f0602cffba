//! `pvera predict` and `pvera eval`: Monte Carlo prediction with a trained classifier adapter,
//! per-input intervals and uncertainty, calibration and out-of-distribution reports.
//!
//! The classifier is the base model + a PVeRA adapter whose `modules_to_save` holds the
//! `classifier` head (what `pvera train` writes). Task metadata (label names, pooling, maximum
//! length) comes from flags, else `pvera_task.json` or `labels.json` in the adapter directory or
//! its parent (`pvera train` writes both in its output directory), else the model's `id2label`.

use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use pvera::data::images::{decode_image_file, ImagePreprocess, RawImage};
use pvera::data::text::{Columns, LabelMap, TextTokenizer, TokenizeOptions};
use pvera::data::{open_image_classification, Dataset};
use pvera::models::heads::{Classifier, Pooling};
use pvera::models::loader::ModelDir;
use pvera::models::ModelInputs;
use pvera::state::Sampling;
use pvera::uncertainty::{
    auroc, calibration, input_stats, mc_predict, reliability_svg, InputStats, McConfig, McMode, OodScores,
};
use pvera::{PeftModel, RunState, TorchGenerator};

use crate::train::UsageError;

macro_rules! usage {
    ($($t:tt)*) => { return Err(anyhow::Error::new(UsageError(format!($($t)*)))) };
}

/// Options shared by `predict` and `eval`: the model, the adapter and the Monte Carlo settings.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Hugging Face model directory (config.json + safetensors; tokenizer.json for text models), or a hub id org/name[@revision] in the local hub cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory with the trained `classifier` head (e.g. `pvera train`'s OUT/best).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Monte Carlo samples per input (the latent is sampled in every adapted layer).
    #[arg(long, default_value_t = 16)]
    pub samples: usize,
    /// Confidence level of the Student-t interval of the top-class probability.
    #[arg(long, default_value_t = 0.95)]
    pub confidence: f64,
    /// Seed of the sampling noise (adapters with generator_seed use their own seed instead).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Inputs per Monte Carlo batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Row budget of one forward: samples are stacked into batches of at most this many rows
    /// (default: the library's `DEFAULT_MAX_ROWS`, measured fastest on MiniLM-sized inputs).
    #[arg(long, default_value_t = pvera::uncertainty::mc::DEFAULT_MAX_ROWS)]
    pub max_rows: usize,
    /// Run the samples one forward each, as PEFT's example does (same noise as PEFT for any shapes).
    #[arg(long)]
    pub sequential: bool,
    /// Sample only in the layers whose sample_at_inference is on (the config or its per-module dict)
    /// instead of every adapted layer.
    #[arg(long)]
    pub sample_from_config: bool,
    /// Sample only in these adapted modules (comma-separated names or `.`-suffixes, e.g.
    /// `value` or `encoder.layer.5.attention.self.query`); the mean path elsewhere.
    #[arg(long, conflicts_with = "sample_from_config")]
    pub sample_modules: Option<String>,
    /// Label names: a JSON list file, or comma-separated names (default: pvera_task.json /
    /// labels.json beside the adapter, else the model's id2label).
    #[arg(long)]
    pub labels: Option<String>,
    /// Pooling: cls, pooler, mean, cls-mean-patch (default: from pvera_task.json, else by model type).
    #[arg(long)]
    pub pooling: Option<String>,
    /// Maximum tokens per text (default: from pvera_task.json, else the tokenizer's).
    #[arg(long)]
    pub max_length: Option<usize>,
    /// tokenizer.json (default: <model>/tokenizer.json).
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Threads for the heavy ops (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Arguments of `pvera predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Image files or folders (image models); texts (text models), `-` reads one text per line
    /// from stdin.
    #[arg(required = true)]
    pub inputs: Vec<String>,
    /// Text models: read one text per line from this file (in addition to INPUT).
    #[arg(long)]
    pub lines: Option<PathBuf>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `pvera eval`.
#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Labelled data: CSV/JSONL (text, label) for text models; a folder of class sub-folders, an IDX
    /// images file (labels beside it) or an IDX folder (train split) for image models.
    #[arg(long)]
    pub data: PathBuf,
    /// Out-of-distribution inputs for the AUROC: an image folder (searched recursively), an IDX
    /// images file, `noise:N` (N uniform-noise images), or a text file (.txt one per line,
    /// .jsonl/.csv `text` column). Repeat for several sets; each gets its own AUROCs.
    #[arg(long)]
    pub ood: Vec<String>,
    /// Evaluate a seeded random subset of N examples (with --held-out-of: the first N unused
    /// examples, as `pvera train --eval-held-out N` does), and at most N OOD inputs.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Evaluate only the examples `pvera train --output DIR` left unused (its split.json; --data must
    /// be the same file it trained on).
    #[arg(long)]
    pub held_out_of: Option<PathBuf>,
    /// Bins of the reliability diagram and the ECE.
    #[arg(long, default_value_t = 15)]
    pub bins: usize,
    /// Output directory for eval.json and reliability.svg.
    #[arg(long, default_value = "pvera-eval")]
    pub output: PathBuf,
}

enum Modality {
    Text(TextTokenizer),
    Image(ImagePreprocess),
}

struct Loaded {
    pm: PeftModel<Classifier>,
    labels: Vec<String>,
    modality: Modality,
    device: Device,
    pooling: String,
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", path.display()))
}

fn string_list(v: &serde_json::Value, what: &str) -> Result<Vec<String>> {
    let Some(a) = v.as_array() else { usage!("{what}: expected a JSON list of label names") };
    a.iter()
        .map(|x| match x {
            serde_json::Value::String(s) => Ok(s.clone()),
            other => Ok(other.to_string()),
        })
        .collect()
}

/// pvera_task.json / labels.json in the adapter directory, then its parent.
fn task_meta(adapter: &Path) -> Result<(Option<serde_json::Value>, Option<Vec<String>>)> {
    for dir in [Some(adapter), adapter.parent()].into_iter().flatten() {
        let t = dir.join("pvera_task.json");
        if t.is_file() {
            let v = read_json(&t)?;
            let labels = match v.get("labels") {
                Some(l) => Some(string_list(l, &t.display().to_string())?),
                None => None,
            };
            return Ok((Some(v), labels));
        }
        let l = dir.join("labels.json");
        if l.is_file() {
            return Ok((None, Some(string_list(&read_json(&l)?, &l.display().to_string())?)));
        }
    }
    Ok((None, None))
}

fn id2label(dir: &ModelDir) -> Option<Vec<String>> {
    let m = dir.config.get("id2label")?.as_object()?;
    let mut v: Vec<(usize, String)> =
        m.iter().filter_map(|(k, x)| Some((k.parse().ok()?, x.as_str()?.to_string()))).collect();
    v.sort();
    (v.iter().enumerate().all(|(i, (k, _))| i == *k) && !v.is_empty()).then(|| v.into_iter().map(|x| x.1).collect())
}

fn load(args: &CommonArgs) -> Result<Loaded> {
    let mut args = args.clone();
    args.model = pvera::models::loader::resolve_model_dir(&args.model)?;
    let args = &args;
    if let Some(t) = args.threads {
        if t == 0 {
            usage!("--threads 0: use at least one thread");
        }
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    if args.samples < 2 {
        usage!("--samples {}: intervals need at least 2 Monte Carlo samples (16 is usual)", args.samples);
    }
    if !(args.confidence > 0.0 && args.confidence < 1.0) {
        usage!("--confidence {}: expected a level strictly between 0 and 1, e.g. 0.95", args.confidence);
    }
    if args.batch_size == 0 || args.max_rows == 0 {
        usage!("--batch-size and --max-rows must be at least 1");
    }
    let device = Device::Cpu;
    let dir = ModelDir::open(&args.model).with_context(|| format!("opening model {}", args.model.display()))?;
    if !args.adapter.join("adapter_config.json").is_file() {
        return Err(anyhow::Error::new(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!(
                "--adapter {}: no adapter_config.json there; pass the adapter directory (e.g. pvera train's OUT/best)",
                args.adapter.display()
            ),
        )));
    }
    let mt = dir.model_type.clone();
    let text = match mt.as_str() {
        "bert" | "roberta" => true,
        "vit" | "dinov2" => false,
        _ => usage!(
            "model_type {mt:?}: predict/eval classify with bert/roberta (text) or vit/dinov2 (images) backbones"
        ),
    };
    let (meta, meta_labels) = task_meta(&args.adapter)?;
    let labels = match &args.labels {
        Some(l) if Path::new(l).is_file() => string_list(&read_json(Path::new(l))?, l)?,
        Some(l) => l.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        None => match meta_labels.or_else(|| id2label(&dir)) {
            Some(l) => l,
            None => usage!(
                "no label names: none of pvera_task.json / labels.json in {} or its parent, and no id2label in the \
                 model's config.json; pass --labels a,b,c (in class-id order) or --labels labels.json",
                args.adapter.display()
            ),
        },
    };
    if labels.len() < 2 {
        usage!("{} label name(s); a classifier needs at least 2", labels.len());
    }
    let meta_str = |k: &str| meta.as_ref().and_then(|m| m.get(k)).and_then(|v| v.as_str()).map(String::from);
    let pooling = args.pooling.clone().or_else(|| meta_str("pooling")).unwrap_or_else(|| {
        match mt.as_str() {
            "vit" => "cls",
            "dinov2" => "cls-mean-patch",
            _ => "mean",
        }
        .to_string()
    });
    let Some(pool) = Pooling::from_name(&pooling) else {
        usage!("--pooling {pooling:?}: expected cls, pooler, mean or cls-mean-patch");
    };
    let modality = if text {
        let path = args.tokenizer.clone().unwrap_or_else(|| args.model.join("tokenizer.json"));
        if !path.is_file() {
            return Err(anyhow::Error::new(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{}: no tokenizer.json; pass --tokenizer PATH", path.display()),
            )));
        }
        let max_length = args
            .max_length
            .or_else(|| meta.as_ref().and_then(|m| m.get("max_length")).and_then(|v| v.as_u64()).map(|v| v as usize));
        let opts = TokenizeOptions { max_length, ..TokenizeOptions::default() };
        Modality::Text(TextTokenizer::from_file(&path, &opts)?)
    } else {
        Modality::Image(ImagePreprocess::for_model_dir(&args.model)?)
    };
    if let Some(n) = adapter_head_outputs(&args.adapter.join("adapter_model.safetensors")) {
        if n != labels.len() {
            usage!(
                "the adapter's classifier head has {n} outputs but {} label names were given ({labels:?}); pass the \
                 labels the adapter was trained with (in class-id order)",
                labels.len()
            );
        }
    }
    let state = Arc::new(RunState::new(args.seed));
    let (model, registry, info) = Classifier::load(&dir, labels.len(), pool, None, &device, state, 0)
        .with_context(|| format!("loading model {}", args.model.display()))?;
    let cfg = pvera::config::PveraConfig::from_file(&args.adapter.join("adapter_config.json"))?;
    let head_in_adapter = cfg.modules_to_save.as_ref().is_some_and(|m| m.iter().any(|x| x == "classifier"));
    let head_in_model = dir.names.iter().any(|n| n == "classifier.weight" || n.ends_with(".classifier.weight"));
    if !head_in_adapter && !head_in_model {
        usage!(
            "{}: the adapter has no trained `classifier` head (modules_to_save lacks \"classifier\") and the model has \
             none either; predictions would come from a random head. Use an adapter trained with pvera train (or \
             PEFT with modules_to_save=[\"classifier\"])",
            args.adapter.display()
        );
    }
    let mut pm = PeftModel::from_pretrained(model, registry, info, &args.adapter, "default", false)
        .with_context(|| format!("loading adapter {}", args.adapter.display()))?;
    pm.state().set_grad_enabled(false)?;
    if let Some(list) = &args.sample_modules {
        let mods: Vec<&str> = list.split(',').map(str::trim).filter(|m| !m.is_empty()).collect();
        if mods.is_empty() {
            usage!("--sample-modules {list:?}: name at least one module");
        }
        pm.set_sample_at_inference("default", None, false)?;
        if let Err(e) = pm.set_sample_at_inference("default", Some(&mods), true) {
            usage!("--sample-modules: {e}");
        }
    }
    for w in pm.take_warnings() {
        tracing::warn!("{w}");
    }
    // The head's output width must match the label names.
    let w = pm.model().head.site().weight()?;
    let classes = match pm.model().head.site().module_copy("default")? {
        Some((wc, _)) => wc.as_tensor().dims()[0],
        None => w.dims()[0],
    };
    if classes != labels.len() {
        usage!(
            "the classifier head has {classes} outputs but {} label names were given ({:?}); pass the labels the \
             adapter was trained with",
            labels.len(),
            labels
        );
    }
    Ok(Loaded { pm, labels, modality, device, pooling })
}

/// Rows of the adapter's trained `classifier` weight, read from the safetensors header (None when
/// the file or the key is missing; loading reports those properly).
fn adapter_head_outputs(file: &Path) -> Option<usize> {
    use std::io::Read;
    let mut f = std::fs::File::open(file).ok()?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).ok()?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return None;
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&header).ok()?;
    v.as_object()?
        .iter()
        .find(|(k, _)| k.ends_with("classifier.modules_to_save.default.weight") || k.ends_with("classifier.weight"))
        .and_then(|(_, t)| t.get("shape")?.as_array()?.first()?.as_u64())
        .map(|x| x as usize)
}

fn mc_config(args: &CommonArgs) -> McConfig {
    McConfig {
        samples: args.samples,
        max_rows: args.max_rows,
        seed: Some(args.seed),
        mode: if args.sequential { McMode::Sequential } else { McMode::Batched },
        sampling: if args.sample_from_config || args.sample_modules.is_some() {
            Sampling::FromConfig
        } else {
            Sampling::Always
        },
        with_mean: true,
    }
}

/// One predicted input: MC statistics and the mean-mode probabilities.
struct Prediction {
    stats: InputStats,
    mean_mode: Vec<f64>,
}

fn predict_batch(l: &Loaded, inputs: &ModelInputs, cfg: &McConfig, confidence: f64) -> Result<Vec<Prediction>> {
    let out = mc_predict(&l.pm, inputs, cfg, |x: &ModelInputs| l.pm.model().forward(x))?;
    (0..out.inputs)
        .map(|b| {
            Ok(Prediction {
                stats: input_stats(&out.input_samples(b), confidence)?,
                mean_mode: out.input_mean_mode(b).unwrap_or_default(),
            })
        })
        .collect()
}

/// Runs every batch of `n` inputs (`make(range)` builds the model inputs) with a progress line.
fn predict_all(
    l: &Loaded,
    n: usize,
    args: &CommonArgs,
    what: &str,
    make: &dyn Fn(&[usize]) -> Result<ModelInputs>,
) -> Result<Vec<Prediction>> {
    let cfg = mc_config(args);
    let mut preds = Vec::with_capacity(n);
    let idx: Vec<usize> = (0..n).collect();
    let t0 = Instant::now();
    let quiet = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    for chunk in idx.chunks(args.batch_size) {
        let inputs = make(chunk)?;
        // Each batch restarts the generators from the seed, so a batch's samples do not depend on
        // which batches ran before it.
        preds.extend(predict_batch(l, &inputs, &cfg, args.confidence)?);
        if !quiet {
            eprint!("\r{what}: {}/{n} ({:.1}s)", preds.len(), t0.elapsed().as_secs_f64());
        }
    }
    if !quiet {
        eprintln!();
    }
    Ok(preds)
}

fn text_inputs(tok: &TextTokenizer, texts: &[String], device: &Device) -> Result<ModelInputs> {
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let enc = tok.encode(&refs, true)?;
    let seqs: Vec<(&[u32], &[u32])> = enc.iter().map(|(a, b)| (a.as_slice(), b.as_slice())).collect();
    Ok(tok.pad_batch(&seqs, device)?)
}

fn image_inputs(pre: &ImagePreprocess, images: &[&RawImage], device: &Device) -> Result<ModelInputs> {
    let ts: Vec<Tensor> = images.iter().map(|img| pre.to_tensor(img, device)).collect::<pvera::Result<_>>()?;
    Ok(ModelInputs { pixel_values: Some(Tensor::stack(&ts, 0)?), ..Default::default() })
}

const IMAGE_EXT: [&str; 3] = ["png", "jpg", "jpeg"];

fn is_image(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| IMAGE_EXT.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files under `dir`, recursively, sorted.
fn images_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let p = e?.path();
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

fn short(s: &str, n: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > n {
        format!("{}…", flat.chars().take(n).collect::<String>())
    } else {
        flat
    }
}

fn prediction_json(p: &Prediction, labels: &[String], input: &str) -> serde_json::Value {
    let st = &p.stats;
    let mm = pvera::uncertainty::stats::argmax(&p.mean_mode);
    serde_json::json!({
        "input": input,
        "predicted": labels[st.predicted],
        "predicted_id": st.predicted,
        "probability": st.mean_probs[st.predicted],
        "modal_class": labels[st.modal_class],
        "vote_share": st.vote_share,
        "modal_probability_mean": st.modal_prob_mean,
        "interval": st.interval.map(|(a, b)| vec![a, b]),
        "confidence": st.confidence,
        "sem": st.sem,
        "predictive_entropy": st.predictive_entropy,
        "expected_entropy": st.expected_entropy,
        "mutual_information": st.mutual_information,
        "variance": st.variance,
        "mean_probs": labels.iter().cloned().zip(st.mean_probs.iter().map(|&v| serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
        "mean_mode": {"predicted": labels[mm], "probability": p.mean_mode.get(mm), "probs": p.mean_mode},
        "samples": st.samples,
    })
}

/// `pvera predict`.
pub fn run_predict(args: PredictArgs) -> Result<u8> {
    let l = load(&args.common)?;
    let t0 = Instant::now();
    let (names, preds) = match &l.modality {
        Modality::Text(tok) => {
            let mut texts = Vec::new();
            for i in &args.inputs {
                if i == "-" {
                    for line in std::io::stdin().lock().lines() {
                        let line = line.context("reading stdin")?;
                        if !line.trim().is_empty() {
                            texts.push(line);
                        }
                    }
                } else {
                    texts.push(i.clone());
                }
            }
            if let Some(f) = &args.lines {
                let text = std::fs::read_to_string(f).with_context(|| format!("reading --lines {}", f.display()))?;
                texts.extend(text.lines().filter(|x| !x.trim().is_empty()).map(String::from));
            }
            if texts.is_empty() || texts.iter().all(|t| t.trim().is_empty()) {
                usage!("no text to classify: pass texts as arguments, `-` for stdin lines, or --lines FILE");
            }
            if let Some(k) = texts.iter().position(|t| t.trim().is_empty()) {
                usage!("input {k} is an empty text; remove it");
            }
            let preds = predict_all(&l, texts.len(), &args.common, "predict", &|c| {
                let batch: Vec<String> = c.iter().map(|&i| texts[i].clone()).collect();
                text_inputs(tok, &batch, &l.device)
            })?;
            (texts, preds)
        }
        Modality::Image(pre) => {
            let mut files = Vec::new();
            for i in &args.inputs {
                let p = PathBuf::from(i);
                if p.is_dir() {
                    let found = images_under(&p)?;
                    if found.is_empty() {
                        usage!("{i}: a folder without PNG/JPEG images");
                    }
                    files.extend(found);
                } else if p.is_file() {
                    files.push(p);
                } else {
                    return Err(anyhow::Error::new(std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        format!("{i}: no such image file or folder"),
                    )));
                }
            }
            let preds = predict_all(&l, files.len(), &args.common, "predict", &|c| {
                let imgs: Vec<RawImage> = c
                    .iter()
                    .map(|&i| decode_image_file(&files[i]).with_context(|| format!("decoding {}", files[i].display())))
                    .collect::<Result<_>>()?;
                let refs: Vec<&RawImage> = imgs.iter().collect();
                image_inputs(pre, &refs, &l.device)
            })?;
            (files.iter().map(|p| p.display().to_string()).collect(), preds)
        }
    };
    let secs = t0.elapsed().as_secs_f64();
    if args.json {
        let rows: Vec<serde_json::Value> =
            preds.iter().zip(&names).map(|(p, n)| prediction_json(p, &l.labels, n)).collect();
        let j = serde_json::json!({
            "model": args.common.model.display().to_string(),
            "adapter": args.common.adapter.display().to_string(),
            "labels": l.labels, "pooling": l.pooling, "samples": args.common.samples,
            "confidence": args.common.confidence, "seed": args.common.seed, "seconds": secs,
            "predictions": rows,
        });
        println!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(0);
    }
    let c = args.common.confidence;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} Monte Carlo samples per input, {:.0}% Student-t interval of the modal class's probability; entropies in nats",
        args.common.samples,
        c * 100.0
    );
    let _ = writeln!(
        s,
        "{:<14} {:>6} {:>6}  {:<15} {:>7} {:>7} {:>7}  {:<14} input",
        "class", "p", "votes", "interval", "entropy", "MI", "var", "mean mode"
    );
    for (p, n) in preds.iter().zip(&names) {
        let st = &p.stats;
        let iv = st.interval.map_or("-".to_string(), |(a, b)| format!("[{a:.3}, {b:.3}]"));
        let mm = pvera::uncertainty::stats::argmax(&p.mean_mode);
        let _ = writeln!(
            s,
            "{:<14} {:>6.3} {:>5.0}%  {:<15} {:>7.4} {:>7.4} {:>7.4}  {:<14} {}",
            short(&l.labels[st.predicted], 14),
            st.mean_probs[st.predicted],
            st.vote_share * 100.0,
            iv,
            st.predictive_entropy,
            st.mutual_information,
            st.variance,
            short(&format!("{} {:.3}", l.labels[mm], p.mean_mode.get(mm).copied().unwrap_or(f64::NAN)), 14),
            short(n, 60)
        );
    }
    let _ = writeln!(s, "{} input(s) in {secs:.2}s", preds.len());
    print!("{s}");
    Ok(0)
}

fn ood_inputs<'a>(spec: &str, l: &'a Loaded, limit: Option<usize>, seed: u64) -> Result<(usize, Box<dyn Fn(&[usize]) -> Result<ModelInputs> + 'a>)> {
    match &l.modality {
        Modality::Image(pre) => {
            if let Some(n) = spec.strip_prefix("noise:") {
                let Ok(n) = n.parse::<usize>() else { usage!("--ood {spec}: expected noise:N with N a number of images") };
                if n == 0 {
                    usage!("--ood {spec}: N must be at least 1");
                }
                let n = limit.map_or(n, |k| k.min(n));
                let pre = pre.clone();
                return Ok((
                    n,
                    Box::new(move |c: &[usize]| {
                        let imgs: Vec<RawImage> = c
                            .iter()
                            .map(|&i| {
                                // uniform RGB noise, one generator per image: reproducible from the seed
                                let mut g = TorchGenerator::new(seed.wrapping_add(1_000_003 * i as u64 + 17));
                                let (w, h) = (224, 224);
                                let bytes: Vec<u8> =
                                    (0..w * h * 3).map(|_| (g.random() & 0xff) as u8).collect();
                                Ok(RawImage::new(w, h, 3, bytes)?)
                            })
                            .collect::<Result<_>>()?;
                        let refs: Vec<&RawImage> = imgs.iter().collect();
                        image_inputs(&pre, &refs, &l.device)
                    }),
                ));
            }
            let p = PathBuf::from(spec);
            if p.is_file() && spec.contains("-images-idx3-ubyte") {
                let arr = pvera::data::idx::read_idx(&p, 3)?;
                let (count, rows, cols) = (arr.dims[0], arr.dims[1], arr.dims[2]);
                let idx = subset(count, limit, seed);
                let pre = pre.clone();
                return Ok((
                    idx.len(),
                    Box::new(move |c: &[usize]| {
                        let sz = rows * cols;
                        let imgs: Vec<RawImage> = c
                            .iter()
                            .map(|&i| Ok(RawImage::new(cols, rows, 1, arr.data[idx[i] * sz..(idx[i] + 1) * sz].to_vec())?))
                            .collect::<Result<_>>()?;
                        let refs: Vec<&RawImage> = imgs.iter().collect();
                        image_inputs(&pre, &refs, &l.device)
                    }),
                ));
            }
            if p.is_dir() {
                let files = images_under(&p)?;
                if files.is_empty() {
                    usage!("--ood {spec}: a folder without PNG/JPEG images");
                }
                let idx = subset(files.len(), limit, seed);
                let pre = pre.clone();
                return Ok((
                    idx.len(),
                    Box::new(move |c: &[usize]| {
                        let imgs: Vec<RawImage> = c
                            .iter()
                            .map(|&i| {
                                let f = &files[idx[i]];
                                decode_image_file(f).with_context(|| format!("decoding {}", f.display()))
                            })
                            .collect::<Result<_>>()?;
                        let refs: Vec<&RawImage> = imgs.iter().collect();
                        image_inputs(&pre, &refs, &l.device)
                    }),
                ));
            }
            if !p.exists() {
                return Err(anyhow::Error::new(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("--ood {spec}: no such file or folder"),
                )));
            }
            usage!("--ood {spec}: expected an image folder, an IDX images file (*-images-idx3-ubyte[.gz]) or noise:N")
        }
        Modality::Text(tok) => {
            let p = PathBuf::from(spec);
            let raw = std::fs::read_to_string(&p).with_context(|| format!("reading --ood {spec}"))?;
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
            let texts: Vec<String> = match ext.as_str() {
                "jsonl" => raw
                    .lines()
                    .enumerate()
                    .filter(|(_, x)| !x.trim().is_empty())
                    .map(|(k, x)| {
                        let v: serde_json::Value =
                            serde_json::from_str(x).with_context(|| format!("{spec}:{}: not a JSON object", k + 1))?;
                        v.get("text").and_then(|t| t.as_str()).map(String::from).ok_or_else(|| {
                            anyhow::Error::new(UsageError(format!("{spec}:{}: no string field \"text\"", k + 1)))
                        })
                    })
                    .collect::<Result<_>>()?,
                "csv" => pvera::data::text::read_records(&p, &Columns::default())?.into_iter().map(|r| r.text).collect(),
                _ => raw.lines().filter(|x| !x.trim().is_empty()).map(String::from).collect(),
            };
            if texts.is_empty() {
                usage!("--ood {spec}: no texts found");
            }
            let idx = subset(texts.len(), limit, seed);
            Ok((
                idx.len(),
                Box::new(move |c: &[usize]| {
                    let batch: Vec<String> = c.iter().map(|&i| texts[idx[i]].clone()).collect();
                    text_inputs(tok, &batch, &l.device)
                }),
            ))
        }
    }
}

/// Up to `limit` of `n` indices: a seeded random subset (torch.randperm order), or all in order.
fn subset(n: usize, limit: Option<usize>, seed: u64) -> Vec<usize> {
    match limit {
        Some(k) if k < n => pvera::train::shuffled_indices(n, seed, 0).into_iter().take(k).collect(),
        _ => (0..n).collect(),
    }
}

#[derive(serde::Serialize)]
struct OodReport {
    data: String,
    inputs: usize,
    auroc: serde_json::Value,
}

fn scores(preds: &[Prediction]) -> Vec<(OodScores, OodScores)> {
    preds
        .iter()
        .map(|p| {
            let mc = OodScores::from_stats(&p.stats);
            let mm_max = p.mean_mode.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mean = OodScores {
                msp: 1.0 - mm_max,
                entropy: pvera::uncertainty::stats::entropy(&p.mean_mode),
                mutual_information: 0.0,
            };
            (mean, mc)
        })
        .collect()
}

fn auroc_table(pos: &[(OodScores, OodScores)], neg: &[(OodScores, OodScores)]) -> Result<serde_json::Value> {
    let col = |v: &[(OodScores, OodScores)], f: &dyn Fn(&(OodScores, OodScores)) -> f64| -> Vec<f64> { v.iter().map(f).collect() };
    let mut m = serde_json::Map::new();
    let rows: [(&str, &dyn Fn(&(OodScores, OodScores)) -> f64); 5] = [
        ("mean_mode_msp", &|s| s.0.msp),
        ("mean_mode_entropy", &|s| s.0.entropy),
        ("mc_msp", &|s| s.1.msp),
        ("mc_entropy", &|s| s.1.entropy),
        ("mc_mutual_information", &|s| s.1.mutual_information),
    ];
    for (name, f) in rows {
        m.insert(name.to_string(), serde_json::json!(auroc(&col(neg, f), &col(pos, f))?));
    }
    Ok(serde_json::Value::Object(m))
}

/// `pvera eval`.
pub fn run_eval(args: EvalArgs) -> Result<u8> {
    if args.bins == 0 {
        usage!("--bins 0: the reliability diagram needs at least 1 bin (15 is usual)");
    }
    if args.limit == Some(0) {
        usage!("--limit 0: evaluate at least one example");
    }
    let l = load(&args.common)?;
    let started = Instant::now();
    let data: Arc<dyn Dataset> = match &l.modality {
        Modality::Text(tok) => Arc::new(
            pvera::data::text::TextClassification::from_file(
                &args.data,
                &Columns::default(),
                tok,
                Some(LabelMap::new(l.labels.clone())?),
                &l.device,
            )
            .with_context(|| format!("reading {}", args.data.display()))?,
        ),
        Modality::Image(pre) => {
            if !args.data.exists() {
                return Err(anyhow::Error::new(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("--data {}: no such file or directory", args.data.display()),
                )));
            }
            let d = open_image_classification(&args.data, pre.clone(), &l.device)?;
            if let Some(names) = d.label_names() {
                if names.len() > l.labels.len() || names.iter().zip(&l.labels).any(|(a, b)| a != b) {
                    usage!(
                        "--data {}: classes {:?} differ from the adapter's labels {:?}",
                        args.data.display(),
                        names,
                        l.labels
                    );
                }
            }
            d
        }
    };
    let idx = match &args.held_out_of {
        Some(dir) => {
            let f = dir.join("split.json");
            let v = read_json(&f)?;
            let n = v.get("examples").and_then(|x| x.as_u64()).unwrap_or(u64::MAX);
            if n != data.len() as u64 {
                usage!(
                    "--held-out-of {}: the split is of {n} examples but --data {} has {}; pass the data set that \
                     run trained on",
                    dir.display(),
                    args.data.display(),
                    data.len()
                );
            }
            let unused: Vec<usize> = v
                .get("unused")
                .and_then(|x| x.as_array())
                .map(|a| a.iter().filter_map(|x| x.as_u64().map(|u| u as usize)).collect())
                .unwrap_or_default();
            if unused.is_empty() {
                usage!("--held-out-of {}: the run left no example unused (train with --train-size)", dir.display());
            }
            if let Some(&bad) = unused.iter().find(|&&i| i >= data.len()) {
                usage!("{}: index {bad} is out of range for {} examples", f.display(), data.len());
            }
            unused.into_iter().take(args.limit.unwrap_or(usize::MAX)).collect()
        }
        None => subset(data.len(), args.limit, args.common.seed),
    };
    let labels_seen = std::cell::RefCell::new(vec![0usize; idx.len()]);
    let preds = predict_all(&l, idx.len(), &args.common, "eval", &|c| {
        let b = data.get_batch(&c.iter().map(|&i| idx[i]).collect::<Vec<_>>())?;
        let y: Vec<u32> = b.labels.to_dtype(DType::U32)?.to_vec1()?;
        let mut seen = labels_seen.borrow_mut();
        for (k, &i) in c.iter().enumerate() {
            seen[i] = y[k] as usize;
        }
        Ok(b.inputs)
    })?;
    let labels = labels_seen.into_inner();
    if let Some(&bad) = labels.iter().find(|&&y| y >= l.labels.len()) {
        usage!("--data {}: label id {bad} but the adapter has {} classes", args.data.display(), l.labels.len());
    }
    let mean_probs: Vec<Vec<f64>> = preds.iter().map(|p| p.mean_mode.clone()).collect();
    let mc_probs: Vec<Vec<f64>> = preds.iter().map(|p| p.stats.mean_probs.clone()).collect();
    let cal_mean = calibration(&mean_probs, &labels, args.bins)?;
    let cal_mc = calibration(&mc_probs, &labels, args.bins)?;

    // Misclassification detection: do the uncertainty scores rank the MC mistakes first?
    let sc = scores(&preds);
    let (wrong, right): (Vec<_>, Vec<_>) =
        sc.iter().zip(&preds).zip(&labels).partition(|((_, p), &y)| p.stats.predicted != y);
    let wrong: Vec<_> = wrong.into_iter().map(|((s, _), _)| *s).collect();
    let right: Vec<_> = right.into_iter().map(|((s, _), _)| *s).collect();
    let error_detection = if wrong.is_empty() || right.is_empty() {
        serde_json::Value::Null
    } else {
        auroc_table(&wrong, &right)?
    };
    let widths: Vec<f64> = preds.iter().filter_map(|p| p.stats.interval.map(|(a, b)| b - a)).collect();
    let mean_width = widths.iter().sum::<f64>() / widths.len().max(1) as f64;
    let unanimous = preds.iter().filter(|p| p.stats.vote_share >= 1.0).count() as f64 / preds.len() as f64;
    let mean_mi = preds.iter().map(|p| p.stats.mutual_information).sum::<f64>() / preds.len() as f64;

    let mut ood = Vec::new();
    for spec in &args.ood {
        let (n, make) = ood_inputs(spec, &l, args.limit, args.common.seed)?;
        let op = predict_all(&l, n, &args.common, "ood", &*make)?;
        let osc = scores(&op);
        ood.push(OodReport { data: spec.clone(), inputs: n, auroc: auroc_table(&osc, &sc)? });
    }
    let secs = started.elapsed().as_secs_f64();

    std::fs::create_dir_all(&args.output).with_context(|| format!("creating {}", args.output.display()))?;
    let title = format!(
        "reliability: {} ({} examples, {} MC samples)",
        args.data.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
        preds.len(),
        args.common.samples
    );
    let svg = reliability_svg(&title, &[("mean mode", &cal_mean), ("Monte Carlo", &cal_mc)]);
    write_atomic(&args.output.join("reliability.svg"), svg.as_bytes())?;
    let examples: Vec<serde_json::Value> = preds
        .iter()
        .zip(&labels)
        .zip(&idx)
        .map(|((p, &y), &i)| {
            serde_json::json!({
                "index": i, "label": y, "predicted": p.stats.predicted, "probability": p.stats.mean_probs[p.stats.predicted],
                "vote_share": p.stats.vote_share, "interval": p.stats.interval.map(|(a, b)| vec![a, b]),
                "predictive_entropy": p.stats.predictive_entropy, "mutual_information": p.stats.mutual_information,
                "mean_mode_predicted": pvera::uncertainty::stats::argmax(&p.mean_mode),
                "mean_mode_probability": p.mean_mode.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            })
        })
        .collect();
    let report = serde_json::json!({
        "model": args.common.model.display().to_string(),
        "adapter": args.common.adapter.display().to_string(),
        "data": args.data.display().to_string(),
        "examples": preds.len(),
        "labels": l.labels,
        "samples": args.common.samples,
        "confidence": args.common.confidence,
        "seed": args.common.seed,
        "bins": args.bins,
        "nll_floor": pvera::uncertainty::calibration::NLL_FLOOR,
        "mean_mode": cal_mean,
        "monte_carlo": cal_mc,
        "monte_carlo_extra": {
            "mean_interval_width": mean_width,
            "unanimous_vote_share": unanimous,
            "mean_mutual_information": mean_mi,
            "error_detection_auroc": error_detection,
        },
        "ood": ood,
        "seconds": secs,
        "per_example": examples,
    });
    write_atomic(&args.output.join("eval.json"), (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "eval: {} examples of {}, {} MC samples, {} bins, {:.1}s",
        preds.len(),
        args.data.display(),
        args.common.samples,
        args.bins,
        secs
    );
    let _ = writeln!(s, "{:<12} {:>9} {:>8} {:>8} {:>8} {:>8}", "", "accuracy", "NLL", "Brier", "ECE", "MCE");
    for (name, c) in [("mean mode", &cal_mean), ("Monte Carlo", &cal_mc)] {
        let _ = writeln!(
            s,
            "{name:<12} {:>9.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4}",
            c.accuracy, c.nll, c.brier, c.ece, c.mce
        );
    }
    let _ = writeln!(
        s,
        "MC: mean {:.0}% interval width {mean_width:.4}; unanimous votes {:.1}%; mean MI {mean_mi:.5} nats",
        args.common.confidence * 100.0,
        unanimous * 100.0
    );
    if let serde_json::Value::Object(m) = &error_detection {
        let _ = writeln!(s, "misclassification AUROC: {}", fmt_auroc(m));
    }
    for o in &ood {
        if let serde_json::Value::Object(m) = &o.auroc {
            let _ = writeln!(s, "OOD AUROC vs {} ({} inputs): {}", o.data, o.inputs, fmt_auroc(m));
        }
    }
    let _ = writeln!(s, "wrote {} and {}", args.output.join("eval.json").display(), args.output.join("reliability.svg").display());
    print!("{s}");
    Ok(0)
}

fn fmt_auroc(m: &serde_json::Map<String, serde_json::Value>) -> String {
    m.iter().map(|(k, v)| format!("{k} {:.4}", v.as_f64().unwrap_or(f64::NAN))).collect::<Vec<_>>().join(", ")
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    pvera::checkpoint::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}
