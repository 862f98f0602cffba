//! `pvera predict` and `pvera eval`: parse flags, call [`pvera::Predictor`], render.
//!
//! The classifier (model + adapter + task metadata), input encoding, Monte Carlo prediction,
//! calibration (`calibration.json`: [`pvera::predictor::calibrated`]) and the evaluation maths
//! live in the library (`pvera::predictor`, `pvera::uncertainty`); this file only turns flags into
//! calls and results into tables and files.

use std::fmt::Write as _;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use pvera::models::heads::Pooling;
use pvera::data::Dataset;
use pvera::predictor::calibrated::evaluation_rows;
use pvera::predictor::inputs::{image_files, labelled_data, subset, text_file, InputSet};
use pvera::predictor::meta::{data_fingerprint, read_labels, SplitRecord};
use pvera::predictor::{CalibrationChoice, Calibrator, Modality, Noise, PredictConfig, PredictorOptions, TaskOverrides};
use pvera::state::Sampling;
use pvera::uncertainty::{
    evaluate, figures, ood_figures, reliability_png, reliability_svg, set_figures, ConformalScore, McMode, Prediction,
    SetFigures,
};
use pvera::Predictor;

use crate::common::{check_output, set_threads, Reuse};
use crate::{say, usage, warn_line};

/// The adapter name a CLI predictor loads its one adapter under.
const ADAPTER: &str = pvera::checkpoint::DEFAULT_ADAPTER;

/// Options shared by `predict` and `eval`: the model, the adapter and the Monte Carlo settings.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Hugging Face model directory (config.json + safetensors; tokenizer.json for text models), or a hub id org/name[@revision] in the local hub cache.
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter directory with the trained `classifier` head (e.g. `pvera train`'s OUT/best).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Monte Carlo samples per input (the latent is sampled in every adapted layer) [default: 16;
    /// a VeRA adapter, which has no latent, predicts in mean mode and refuses this flag].
    #[arg(long)]
    pub samples: Option<usize>,
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
    /// Run the samples one forward each with the generators' noise streams, as PEFT's example does
    /// (PEFT's own samples for any shapes). Default: batched, each input's noise derived from the
    /// seed and its position, so an answer does not depend on --batch-size or --max-rows.
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
    /// labels.json in the adapter folder, else what the adapter config and the model's id2label say).
    #[arg(long)]
    pub labels: Option<String>,
    /// Pooling: cls, pooler, mean, cls-mean-patch (default: from pvera_task.json, else from the class the
    /// adapter was trained on, else by model type with a warning).
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

/// How `predict` and `eval` use `calibration.json` (written by `pvera calibrate` into the adapter
/// folder).
#[derive(clap::Args, Debug, Clone)]
pub struct CalibrationArgs {
    /// Ignore calibration.json in the adapter folder (no calibrated probabilities, sets or abstentions).
    #[arg(long)]
    pub no_calibration: bool,
    /// Coverage of the prediction sets, 1 − alpha: one of the levels `pvera calibrate` fitted (default: the
    /// first one it fitted, 0.9 with its defaults).
    #[arg(long, conflicts_with = "no_calibration")]
    pub coverage: Option<f64>,
    /// Conformity score of the prediction sets: lac, aps or raps, one that was fitted (default: the first
    /// fitted, lac with the defaults).
    #[arg(long, conflicts_with = "no_calibration")]
    pub score: Option<String>,
    /// Abstain also when the calibrated confidence is below P (abstain is always true when the set is not a
    /// single label).
    #[arg(long, conflicts_with = "no_calibration")]
    pub abstain_below: Option<f64>,
}

/// Reads the adapter's `calibration.json` unless `--no-calibration`, checked against the adapter
/// (a stale or damaged file is an error naming it and the fix, exit 4). `None` when there is none;
/// then the calibration flags are refused.
pub(crate) fn load_calibrator(adapter: &Path, args: &CalibrationArgs) -> Result<Option<Calibrator>> {
    if args.no_calibration {
        return Ok(None);
    }
    let score = match &args.score {
        Some(s) => match s.parse::<ConformalScore>() {
            Ok(x) => Some(x),
            Err(_) => usage!("--score {s:?}: expected lac, aps or raps"),
        },
        None => None,
    };
    let choice = CalibrationChoice { coverage: args.coverage, score, abstain_below: args.abstain_below };
    let cal = Calibrator::load(adapter, &choice).map_err(request_error)?;
    if cal.is_none() && (args.coverage.is_some() || args.score.is_some() || args.abstain_below.is_some()) {
        usage!(
            "--coverage, --score and --abstain-below use {}, which does not exist: run `pvera calibrate` for this \
             adapter first, or drop those flags",
            adapter.join(pvera::uncertainty::CALIBRATION_FILE).display()
        );
    }
    Ok(cal)
}

/// Arguments of `pvera predict`.
#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    #[command(flatten)]
    pub calibration: CalibrationArgs,
    /// Image files or folders (image models); texts (text models), `-` reads one text per line
    /// from stdin.
    #[arg(required_unless_present = "lines")]
    pub inputs: Vec<String>,
    /// Text models: read one text per line from this file (in addition to INPUT; .jsonl / .csv: the
    /// `text` field).
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
    #[command(flatten)]
    pub calibration: CalibrationArgs,
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
    /// At most N inputs of each --ood set (seeded subset; default: --limit).
    #[arg(long)]
    pub ood_limit: Option<usize>,
    /// Evaluate only the examples `pvera train --output DIR` left unused (its split.json; --data must
    /// be the same file it trained on); with a calibration.json drawn from the same run, its test rows.
    #[arg(long)]
    pub held_out_of: Option<PathBuf>,
    /// Bins of the reliability diagram and the ECE.
    #[arg(long, default_value_t = 15)]
    pub bins: usize,
    /// Output directory for eval.json, reliability.svg and reliability.png.
    #[arg(long, default_value = "pvera-eval")]
    pub output: PathBuf,
}

/// Parses `--labels`: a JSON list file, or comma-separated names.
fn parse_labels(spec: &str) -> Result<Vec<String>> {
    let p = Path::new(spec);
    if p.is_file() {
        return read_labels(p)?.ok_or_else(|| anyhow::anyhow!("--labels {spec}: cannot read"));
    }
    Ok(spec.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
}

/// Monte Carlo samples when `--samples` is not given (PVeRA adapters).
const DEFAULT_SAMPLES: usize = 16;

/// A VeRA adapter has no latent: the sampling flags are refused by name; it predicts in mean mode.
fn refuse_sampling_flags(args: &CommonArgs) -> Result<()> {
    let given = [
        (args.samples.is_some_and(|n| n >= 2), format!("--samples {}", args.samples.unwrap_or(0))),
        (args.sequential, "--sequential".to_string()),
        (args.sample_from_config, "--sample-from-config".to_string()),
        (args.sample_modules.is_some(), "--sample-modules".to_string()),
    ];
    if let Some((_, flag)) = given.iter().find(|(on, _)| *on) {
        usage!(
            "{flag}: {} is a VeRA adapter, which has no latent to sample, so there are no Monte Carlo samples; \
             drop the flag (VeRA predicts in mean mode) or use a PVeRA adapter",
            args.adapter.display()
        );
    }
    Ok(())
}

/// Validates the shared flags and opens the predictor with the adapter; prints what loading had
/// to assume (each warning once). A PVeRA adapter needs at least `min_samples`; a VeRA adapter
/// runs the mean mode (samples 1).
pub(crate) fn open(args: &CommonArgs, min_samples: usize) -> Result<(Predictor, PredictConfig)> {
    set_threads(args.threads)?;
    // `--samples 1` is the mean mode, which only a VeRA adapter may ask for (checked once loaded).
    if let Some(n) = args.samples.filter(|&n| n < min_samples && n != 1) {
        usage!("--samples {n}: intervals need at least 2 Monte Carlo samples (16 is usual)");
    }
    if !(args.confidence > 0.0 && args.confidence < 1.0) {
        usage!("--confidence {}: expected a level strictly between 0 and 1, e.g. 0.95", args.confidence);
    }
    if args.batch_size == 0 || args.max_rows == 0 {
        usage!("--batch-size and --max-rows must be at least 1");
    }
    if args.max_length == Some(0) {
        usage!("--max-length 0: a text needs at least 1 token (e.g. --max-length 128)");
    }
    let pooling = match &args.pooling {
        Some(p) => match Pooling::from_name(p) {
            Some(x) => Some(x),
            None => usage!("--pooling {p:?}: expected cls, pooler, mean or cls-mean-patch"),
        },
        None => None,
    };
    let labels = args.labels.as_deref().map(parse_labels).transpose()?;
    if labels.as_ref().is_some_and(|l| l.len() < 2) {
        usage!("--labels: {} label name(s); a classifier needs at least 2", labels.as_ref().map_or(0, Vec::len));
    }
    let sample_modules: Option<Vec<String>> = match &args.sample_modules {
        Some(list) => {
            let mods: Vec<String> = list.split(',').map(str::trim).filter(|m| !m.is_empty()).map(String::from).collect();
            if mods.is_empty() {
                usage!("--sample-modules {list:?}: name at least one module");
            }
            Some(mods)
        }
        None => None,
    };
    let opts = PredictorOptions { tokenizer: args.tokenizer.clone(), seed: args.seed, ..PredictorOptions::default() };
    let overrides = TaskOverrides { labels, pooling, max_length: args.max_length };
    let mut p = Predictor::open(&args.model, &opts).map_err(request_error)
        .with_context(|| format!("opening model {}", args.model.display()))?;
    p.add_adapter(ADAPTER, &args.adapter, &overrides)
        .map_err(request_error)
        .with_context(|| format!("loading adapter {}", args.adapter.display()))?;
    let samples_latent = p.peft_model().method(ADAPTER)?.samples();
    if !samples_latent {
        refuse_sampling_flags(args)?;
    } else if let Some(n) = args.samples.filter(|&n| n < min_samples) {
        usage!("--samples {n}: intervals need at least 2 Monte Carlo samples (16 is usual)");
    }
    if let Some(mods) = &sample_modules {
        let refs: Vec<&str> = mods.iter().map(String::as_str).collect();
        if let Err(e) = p.set_sample_modules(ADAPTER, Some(&refs)) {
            usage!("--sample-modules: {e}");
        }
    }
    // Every warning was logged through `tracing` (stderr) as it arose; printed once.
    let _ = p.take_warnings();
    let cfg = PredictConfig {
        samples: if samples_latent { args.samples.unwrap_or(DEFAULT_SAMPLES) } else { 1 },
        confidence: args.confidence,
        seed: Some(args.seed),
        max_rows: args.max_rows,
        mode: if args.sequential { McMode::Sequential } else { McMode::Batched },
        sampling: if args.sample_from_config || args.sample_modules.is_some() { Sampling::FromConfig } else { Sampling::Always },
        noise: if args.sequential { Noise::Generators } else { Noise::PerInput },
    };
    Ok((p, cfg))
}

/// A library request error (labels that do not fit the head, a pooling the model lacks, ...) is a
/// flag problem here: exit 2.
pub(crate) fn request_error(e: pvera::Error) -> anyhow::Error {
    match e {
        pvera::Error::Request(m) => anyhow::Error::new(crate::common::UsageError(m)),
        other => anyhow::Error::new(other),
    }
}

/// Predicts every input of `set` with a progress line on a terminal.
fn predict_set(p: &mut Predictor, set: &InputSet, args: &CommonArgs, cfg: &PredictConfig, what: &str) -> Result<Vec<Prediction>> {
    let t0 = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let preds = p.predict_all(
        ADAPTER,
        set.len(),
        args.batch_size,
        cfg,
        &mut |p, c| set.encode(p, ADAPTER, c),
        &mut |done, n| {
            if tty {
                crate::out::eprint(&format!("\r{what}: {done}/{n} ({:.1}s)", t0.elapsed().as_secs_f64()));
            }
        },
    );
    if tty {
        crate::out::eprint("\n");
    }
    Ok(preds.map_err(request_error)?)
}

/// The texts of `pvera predict`: arguments, `-` (stdin lines) and `--lines FILE`.
fn gather_texts(args: &PredictArgs) -> Result<Vec<String>> {
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
            if !i.contains(char::is_whitespace) && Path::new(i).is_file() {
                warn_line!(
                    "warning: {i:?} is also the name of a file; classifying the text {i:?} itself (use --lines {i} to \
                     classify the file's lines)"
                );
            }
            texts.push(i.clone());
        }
    }
    if let Some(f) = &args.lines {
        if !f.is_file() {
            return Err(crate::common::not_found(f, "--lines: no such file"));
        }
        texts.extend(text_file(f)?);
    }
    if texts.is_empty() {
        usage!("no text to classify: pass texts as arguments, `-` for stdin lines, or --lines FILE");
    }
    if let Some(k) = texts.iter().position(|t| t.trim().is_empty()) {
        usage!("input {k} is an empty text; remove it");
    }
    Ok(texts)
}

fn short(s: &str, n: usize) -> String {
    let flat: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() > n {
        format!("{}…", flat.chars().take(n).collect::<String>())
    } else {
        flat
    }
}

/// The calibration in force, for the JSON outputs.
fn calibration_json(cal: &Calibrator) -> serde_json::Value {
    let f = cal.file();
    serde_json::json!({
        "path": cal.path().display().to_string(),
        "adapter_hash": f.adapter_hash,
        "n": f.n,
        "seed": f.seed,
        "split": {"description": f.split.description, "rows_hash": f.split.rows_hash,
                  "test_rows": f.split.test_rows.len(), "test_rows_hash": f.split.test_rows_hash},
        "temperature": {"mean_mode": f.mean.temperature.temperature,
                        "monte_carlo": f.mc.as_ref().map(|m| m.temperature.temperature)},
        "monte_carlo_samples": f.mc.as_ref().map(|m| m.samples),
        "score": cal.score().name(),
        "alpha": cal.alpha(),
        "coverage": 1.0 - cal.alpha(),
    })
}

/// Prints the calibration's notes for `samples` (a sample count other than the fit's) once.
fn calibration_notes(cal: &Calibrator, samples: usize) {
    for n in cal.notes_for(samples) {
        warn_line!("note: {n}");
    }
}

/// `pvera predict`.
pub fn run_predict(args: PredictArgs) -> Result<u8> {
    let (mut p, cfg) = open(&args.common, 2)?;
    let cal = load_calibrator(&args.common.adapter, &args.calibration)?;
    let set = match p.modality() {
        Modality::Text => InputSet::Texts(gather_texts(&args)?),
        Modality::Image => {
            if args.lines.is_some() {
                usage!("--lines reads texts; an image model takes image files or folders as INPUT");
            }
            InputSet::Files(image_files(&args.inputs).map_err(request_error)?)
        }
    };
    let t0 = Instant::now();
    let mut preds = predict_set(&mut p, &set, &args.common, &cfg, "predict")?;
    if let Some(c) = &cal {
        calibration_notes(c, cfg.samples);
        c.apply(&mut preds).map_err(request_error)?;
    }
    let secs = t0.elapsed().as_secs_f64();
    let names = set.names();
    let task = p.adapter(ADAPTER)?;
    let labels = task.labels();
    if args.json {
        let rows: Vec<serde_json::Value> = preds.iter().zip(&names).map(|(pr, n)| pr.to_json(labels, Some(n))).collect();
        let j = serde_json::json!({
            "model": args.common.model.display().to_string(),
            "adapter": args.common.adapter.display().to_string(),
            "labels": labels, "pooling": task.task.pooling.name(), "samples": cfg.samples,
            "confidence": args.common.confidence, "seed": args.common.seed, "seconds": secs,
            "calibration": cal.as_ref().map(calibration_json),
            "predictions": rows,
        });
        say!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(0);
    }
    if cfg.samples < 2 {
        // A VeRA adapter: the mean mode only.
        say!("mean mode (a VeRA adapter has no latent to sample); entropy in nats");
        if let Some(c) = &cal {
            say!(
                "calibrated by {} (T = {:.3}); sets: {} at {:.0}% coverage{}",
                c.path().display(),
                c.mode(false).map(|m| m.temperature.temperature).unwrap_or(f64::NAN),
                c.score(),
                (1.0 - c.alpha()) * 100.0,
                args.calibration.abstain_below.map_or(String::new(), |b| format!("; abstain below {b}"))
            );
            say!("{:<14} {:>6} {:>6} {:>7}  {:<18} {:<7} input", "class", "p", "cal p", "entropy", "set", "abstain");
        } else {
            say!("{:<14} {:>6} {:>7}  input", "class", "p", "entropy");
        }
        for (pr, n) in preds.iter().zip(&names) {
            let k = pr.predicted();
            let entropy = pvera::uncertainty::stats::entropy(&pr.mean_mode);
            match &pr.calibrated {
                Some(c) => {
                    let set: Vec<&str> = c.prediction_set.iter().map(|&i| labels[i].as_str()).collect();
                    say!(
                        "{:<14} {:>6.3} {:>6.3} {:>7.4}  {:<18} {:<7} {}",
                        short(&labels[k], 14),
                        pr.probability(),
                        c.confidence(),
                        entropy,
                        short(&format!("{{{}}}", set.join(", ")), 18),
                        if c.abstain { "yes" } else { "no" },
                        short(n, 60)
                    );
                }
                None => say!("{:<14} {:>6.3} {:>7.4}  {}", short(&labels[k], 14), pr.probability(), entropy, short(n, 60)),
            }
        }
        say!("{} input(s) in {secs:.2}s", preds.len());
        return Ok(0);
    }
    say!(
        "{} Monte Carlo samples per input, {:.0}% Student-t interval of the modal class's probability; entropies in nats",
        cfg.samples,
        args.common.confidence * 100.0
    );
    if let Some(c) = &cal {
        say!(
            "calibrated by {} (T = {:.3}); sets: {} at {:.0}% coverage{}",
            c.path().display(),
            c.mode(true).map(|m| m.temperature.temperature).unwrap_or(f64::NAN),
            c.score(),
            (1.0 - c.alpha()) * 100.0,
            args.calibration.abstain_below.map_or(String::new(), |b| format!("; abstain below {b}"))
        );
        say!(
            "{:<14} {:>6} {:>6} {:>5}  {:<15} {:>7} {:>7}  {:<18} {:<7} input",
            "class", "p", "cal p", "votes", "interval", "entropy", "MI", "set", "abstain"
        );
    } else {
        say!(
            "{:<14} {:>6} {:>6}  {:<15} {:>7} {:>7} {:>7}  {:<14} input",
            "class", "p", "votes", "interval", "entropy", "MI", "var", "mean mode"
        );
    }
    for (pr, n) in preds.iter().zip(&names) {
        let Some(st) = &pr.mc else { continue };
        let iv = st.interval.map_or("-".to_string(), |(a, b)| format!("[{a:.3}, {b:.3}]"));
        if let Some(c) = &pr.calibrated {
            let set: Vec<&str> = c.prediction_set.iter().map(|&i| labels[i].as_str()).collect();
            say!(
                "{:<14} {:>6.3} {:>6.3} {:>4.0}%  {:<15} {:>7.4} {:>7.4}  {:<18} {:<7} {}",
                short(&labels[st.predicted], 14),
                st.mean_probs[st.predicted],
                c.confidence(),
                st.vote_share * 100.0,
                iv,
                st.predictive_entropy,
                st.mutual_information,
                short(&format!("{{{}}}", set.join(", ")), 18),
                if c.abstain { "yes" } else { "no" },
                short(n, 60)
            );
            continue;
        }
        let mm = pvera::uncertainty::stats::argmax(&pr.mean_mode);
        say!(
            "{:<14} {:>6.3} {:>5.0}%  {:<15} {:>7.4} {:>7.4} {:>7.4}  {:<14} {}",
            short(&labels[st.predicted], 14),
            st.mean_probs[st.predicted],
            st.vote_share * 100.0,
            iv,
            st.predictive_entropy,
            st.mutual_information,
            st.variance,
            short(&format!("{} {:.3}", labels[mm], pr.mean_mode.get(mm).copied().unwrap_or(f64::NAN)), 14),
            short(n, 60)
        );
    }
    say!("{} input(s) in {secs:.2}s", preds.len());
    Ok(0)
}

/// Predicts the labelled examples `idx` of `data` in batches; returns the predictions and the
/// labels (checked against the adapter's classes).
pub(crate) fn predict_labelled(
    p: &mut Predictor,
    data: &dyn Dataset,
    idx: &[usize],
    args: &CommonArgs,
    cfg: &PredictConfig,
    what: &str,
) -> Result<(Vec<Prediction>, Vec<usize>)> {
    let t0 = Instant::now();
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let out = p
        .predict_examples(ADAPTER, data, idx, args.batch_size, cfg, &mut |done, n| {
            if tty {
                crate::out::eprint(&format!("\r{what}: {done}/{n} ({:.1}s)", t0.elapsed().as_secs_f64()));
            }
        })
        .map_err(request_error)?;
    if tty {
        crate::out::eprint("\n");
    }
    Ok(out)
}

/// The unused examples of a training run (its split.json), checked against `data`.
pub(crate) fn unused_of(run: &Path, data_path: &Path, data: &dyn Dataset, sha: &str) -> Result<Vec<usize>> {
    let split = SplitRecord::read(run)?;
    if let Err(e) = split.check_same_data(data_path, data.len(), sha, &format!("--held-out-of {}", run.display())) {
        usage!("{e}");
    }
    if split.unused.is_empty() {
        usage!("--held-out-of {}: the run left no example unused (train with --train-size)", run.display());
    }
    if let Some(&bad) = split.unused.iter().find(|&&i| i >= data.len()) {
        usage!("{}: index {bad} is out of range for {} examples", run.join("split.json").display(), data.len());
    }
    Ok(split.unused)
}

#[derive(serde::Serialize)]
struct OodReport {
    data: String,
    inputs: usize,
    auroc: std::collections::BTreeMap<String, f64>,
    fpr95: std::collections::BTreeMap<String, f64>,
    /// The same figures after temperature scaling (with a calibration).
    after: Option<pvera::uncertainty::OodFigures>,
}

/// Conformal sets of one mode before / after temperature scaling.
fn mode_sets(
    cal: &Calibrator,
    sampled: bool,
    raw: &[Prediction],
    tempered: &[Prediction],
    labels: &[usize],
) -> Result<Vec<SetFigures>> {
    let m = cal.mode(sampled).map_err(request_error)?;
    let probs = |ps: &[Prediction]| -> Vec<Vec<f64>> {
        ps.iter().map(|p| if sampled { p.probs().to_vec() } else { p.mean_mode.clone() }).collect()
    };
    let (scaled_fits, raw_fits) = if m.conformal_on_scaled { (&m.conformal, &m.conformal_raw) } else { (&m.conformal, &m.conformal) };
    let raw_probs = probs(raw);
    let scaled_probs = if m.conformal_on_scaled { probs(tempered) } else { raw_probs.clone() };
    Ok(set_figures(&raw_probs, &scaled_probs, labels, scaled_fits, raw_fits)?)
}

/// `pvera eval`.
pub fn run_eval(args: EvalArgs) -> Result<u8> {
    if args.bins == 0 {
        usage!("--bins 0: the reliability diagram needs at least 1 bin (15 is usual)");
    }
    if args.limit == Some(0) || args.ood_limit == Some(0) {
        usage!("--limit / --ood-limit 0: evaluate at least one example");
    }
    if !args.data.exists() {
        return Err(crate::common::not_found(&args.data, "--data: no such file or folder"));
    }
    let out = check_output(
        "--output",
        &args.output,
        &[("--model", &args.common.model), ("--adapter", &args.common.adapter), ("--data", &args.data)],
        Reuse::OwnFiles,
    )?;
    let (mut p, cfg) = open(&args.common, 2)?;
    let cal = load_calibrator(&args.common.adapter, &args.calibration)?;
    let data = labelled_data(&p, ADAPTER, &args.data).map_err(request_error)?;
    let sha = if args.held_out_of.is_some() || cal.is_some() { Some(data_fingerprint(&args.data)?) } else { None };
    // Rows: the run's unused examples (or the calibration's recorded test rows), else every row;
    // never the calibration rows of the calibration in force.
    let (mut rows_source, candidates): (String, Vec<usize>) = match &args.held_out_of {
        Some(dir) => {
            let unused = unused_of(dir, &args.data, data.as_ref(), sha.as_deref().unwrap_or_default())?;
            match &cal {
                Some(c) if !c.file().split.test_rows.is_empty() && c.file().split.data_sha256 == sha => {
                    let pool: std::collections::HashSet<usize> = unused.iter().copied().collect();
                    if !c.file().split.test_rows.iter().all(|r| pool.contains(r)) {
                        usage!(
                            "{}: its test rows are not all among the examples {} left unused, so it was calibrated \
                             against another training run; re-run `pvera calibrate --held-out-of {}` for this adapter",
                            c.path().display(),
                            dir.display(),
                            dir.display()
                        );
                    }
                    (
                        format!("the test rows {} set aside from {}'s unused examples", c.path().display(), dir.display()),
                        c.file().split.test_rows.clone(),
                    )
                }
                _ => (format!("the examples {} left unused", dir.display()), unused),
            }
        }
        None => ("all rows".to_string(), (0..data.len()).collect()),
    };
    let (candidates, excluded) = match (&cal, &sha) {
        (Some(c), Some(s)) => evaluation_rows(c.file(), s, candidates),
        _ => (candidates, 0),
    };
    if excluded > 0 {
        rows_source.push_str(&format!(", without the {excluded} calibration row(s)"));
    }
    if candidates.is_empty() {
        usage!("no example left to evaluate ({rows_source})");
    }
    let idx: Vec<usize> = if args.held_out_of.is_some() {
        candidates.into_iter().take(args.limit.unwrap_or(usize::MAX)).collect()
    } else {
        subset(candidates.len(), args.limit, args.common.seed).into_iter().map(|i| candidates[i]).collect()
    };
    // Everything the run needs is opened and checked before the first forward.
    let mut oods = Vec::new();
    for spec in &args.ood {
        let set = InputSet::open_ood(spec, p.modality(), args.ood_limit.or(args.limit), args.common.seed).map_err(request_error)?;
        oods.push((spec.clone(), set));
    }
    out.probe_writable()?;
    if let Some(c) = &cal {
        calibration_notes(c, cfg.samples);
        c.mode(cfg.samples >= 2).map_err(request_error)?;
    }

    let started = Instant::now();
    let (mut preds, labels) = predict_labelled(&mut p, data.as_ref(), &idx, &args.common, &cfg, "eval")?;
    let task = p.adapter(ADAPTER)?.task.clone();
    let ev = evaluate(&preds, &labels, args.bins)?;
    let before = figures(&preds, &labels, args.bins)?;
    let tempered: Option<Vec<Prediction>> = match &cal {
        Some(c) => Some(preds.iter().map(|x| c.temper(x, args.common.confidence)).collect::<pvera::Result<_>>().map_err(request_error)?),
        None => None,
    };
    let after = tempered.as_ref().map(|t| figures(t, &labels, args.bins)).transpose()?;
    // Sets of each mode the run has (a VeRA adapter: the mean mode only).
    let conformal: Option<Vec<(&str, Vec<SetFigures>)>> = match (&cal, &tempered) {
        (Some(c), Some(t)) => {
            let mut v = vec![("mean mode", mode_sets(c, false, &preds, t, &labels)?)];
            if cfg.samples >= 2 {
                v.push(("Monte Carlo", mode_sets(c, true, &preds, t, &labels)?));
            }
            Some(v)
        }
        _ => None,
    };
    if let Some(c) = &cal {
        c.apply(&mut preds).map_err(request_error)?;
    }
    let mut ood = Vec::new();
    for (spec, set) in &oods {
        let op = predict_set(&mut p, set, &args.common, &cfg, "ood")?;
        let f = ood_figures(&preds, &op)?;
        let after = match (&cal, &tempered) {
            (Some(c), Some(t)) => {
                let top: Vec<Prediction> = op
                    .iter()
                    .map(|x| c.temper(x, args.common.confidence))
                    .collect::<pvera::Result<_>>()
                    .map_err(request_error)?;
                Some(ood_figures(t, &top)?)
            }
            _ => None,
        };
        ood.push(OodReport { data: spec.clone(), inputs: set.len(), auroc: f.auroc, fpr95: f.fpr95, after });
    }
    let secs = started.elapsed().as_secs_f64();

    // A VeRA adapter (samples 1) has the mean mode only: the Monte Carlo figures are null.
    let cal_mc = ev.monte_carlo.as_ref();
    let extra = ev.monte_carlo_extra.as_ref();
    let samples_text = if cfg.samples < 2 { "mean mode only".to_string() } else { format!("{} MC samples", cfg.samples) };
    let title = format!(
        "reliability: {} ({} examples, {samples_text})",
        args.data.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
        preds.len(),
    );
    let mut curves: Vec<(&str, &pvera::uncertainty::Calibration)> = vec![("mean mode", &ev.mean_mode)];
    curves.extend(cal_mc.map(|c| ("Monte Carlo", c)));
    if let Some(a) = &after {
        curves.push(("mean mode + T", &a.mean_mode.calibration));
        if let Some(m) = &a.monte_carlo {
            curves.push(("Monte Carlo + T", &m.calibration));
        }
    }
    let svg = reliability_svg(&title, &curves);
    let png = reliability_png(&title, &curves)?;
    let dir = out.create()?;
    write_atomic(&dir.join("reliability.svg"), svg.as_bytes())?;
    write_atomic(&dir.join("reliability.png"), &png)?;
    let examples: Vec<serde_json::Value> = preds
        .iter()
        .zip(&labels)
        .zip(&idx)
        .map(|((pr, &y), &i)| {
            let c = pr.calibrated.as_ref();
            let calibrated = serde_json::json!({
                "calibrated_probability": c.map(|c| c.confidence()),
                "calibrated_predicted": c.map(|c| pvera::uncertainty::stats::argmax(&c.probs)),
                "prediction_set": c.map(|c| &c.prediction_set),
                "abstain": c.map(|c| c.abstain),
            });
            let Some(st) = pr.mc.as_ref() else {
                let mut row = serde_json::json!({
                    "index": i, "label": y, "predicted": pr.predicted(), "probability": pr.probability(),
                    "predictive_entropy": pvera::uncertainty::stats::entropy(&pr.mean_mode),
                });
                merge_json(&mut row, calibrated);
                return row;
            };
            let mut row = serde_json::json!({
                "index": i, "label": y, "predicted": st.predicted, "probability": st.mean_probs[st.predicted],
                "vote_share": st.vote_share, "interval": st.interval.map(|(a, b)| vec![a, b]),
                "predictive_entropy": st.predictive_entropy, "mutual_information": st.mutual_information,
                "mean_mode_predicted": pvera::uncertainty::stats::argmax(&pr.mean_mode),
                "mean_mode_probability": pr.mean_mode.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            });
            merge_json(&mut row, calibrated);
            row
        })
        .collect();
    let abstained = preds.iter().filter(|x| x.calibrated.as_ref().is_some_and(|c| c.abstain)).count();
    let report = serde_json::json!({
        "model": args.common.model.display().to_string(),
        "adapter": args.common.adapter.display().to_string(),
        "data": args.data.display().to_string(),
        "rows": rows_source,
        "excluded_calibration_rows": excluded,
        "examples": preds.len(),
        "labels": task.labels,
        "method": p.peft_model().method(ADAPTER)?.name(),
        "samples": cfg.samples,
        "confidence": args.common.confidence,
        "seed": args.common.seed,
        "bins": args.bins,
        "nll_floor": pvera::uncertainty::calibration::NLL_FLOOR,
        "mean_mode": ev.mean_mode,
        "monte_carlo": cal_mc,
        "monte_carlo_extra": extra,
        "calibration": cal.as_ref().map(calibration_json),
        "calibration_note": if cal.is_some() { serde_json::Value::Null } else { serde_json::json!(
            "no calibration.json in the adapter folder (or --no-calibration): figures before temperature scaling only; \
             `pvera calibrate` fits the temperature and the conformal thresholds the after figures need") },
        "figures": {"before": before, "after": after},
        "conformal": conformal.as_ref().map(|c| serde_json::json!({"mean_mode": c[0].1, "monte_carlo": c.get(1).map(|m| &m.1)})),
        "abstained": cal.as_ref().map(|_| abstained),
        "ood": ood,
        "seconds": secs,
        "per_example": examples,
    });
    write_atomic(&dir.join("eval.json"), (serde_json::to_string_pretty(&report)? + "\n").as_bytes())?;

    let mut s = String::new();
    let _ = writeln!(
        s,
        "eval: {} examples of {} ({rows_source}), {samples_text}, {} bins, {:.1}s",
        preds.len(),
        args.data.display(),
        args.bins,
        secs
    );
    let _ = writeln!(
        s,
        "{:<17} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "", "accuracy", "NLL", "Brier", "ECE", "MCE", "aECE", "AURC", "acc@80", "acc@90"
    );
    let mut rows: Vec<(&str, &pvera::uncertainty::ModeFigures)> = vec![("mean mode", &before.mean_mode)];
    if let Some(m) = &before.monte_carlo {
        rows.push(("Monte Carlo", m));
    }
    if let Some(a) = &after {
        rows.push(("mean mode + T", &a.mean_mode));
        if let Some(m) = &a.monte_carlo {
            rows.push(("Monte Carlo + T", m));
        }
    }
    for (name, f) in rows {
        let c = &f.calibration;
        let _ = writeln!(
            s,
            "{name:<17} {:>9.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4} {:>8.4}",
            c.accuracy,
            c.nll,
            c.brier,
            c.ece,
            c.mce,
            f.adaptive_ece,
            f.selective.aurc,
            f.selective.accuracy_at_80,
            f.selective.accuracy_at_90
        );
    }
    match &cal {
        Some(c) => {
            let f = c.file();
            let _ = writeln!(
                s,
                "calibration: {} (n {}, T mean mode {:.4}, T Monte Carlo {}); sets {} at {:.0}%: {abstained} of {} abstain",
                c.path().display(),
                f.n,
                f.mean.temperature.temperature,
                f.mc.as_ref().map_or("-".into(), |m| format!("{:.4} ({} samples)", m.temperature.temperature, m.samples)),
                c.score(),
                (1.0 - c.alpha()) * 100.0,
                preds.len()
            );
        }
        None => {
            let _ = writeln!(s, "no calibration.json (or --no-calibration): figures before temperature scaling only");
        }
    }
    if let Some(conf) = &conformal {
        let _ = writeln!(s, "conformal sets: coverage / mean size, before -> after temperature scaling");
        for (mode, sets) in conf {
            for f in sets {
                let b = f.before.as_ref().map_or("-".to_string(), |b| format!("{:.4} / {:.3}", b.coverage, b.mean_size));
                let _ = writeln!(
                    s,
                    "  {mode:<12} {:<5} alpha {:<5} target {:.3}: {b} -> {:.4} / {:.3}",
                    f.score.name(),
                    f.alpha,
                    1.0 - f.alpha,
                    f.after.coverage,
                    f.after.mean_size
                );
            }
        }
    }
    if let Some(extra) = extra {
        let _ = writeln!(
            s,
            "MC: mean {:.0}% interval width {:.4}; unanimous votes {:.1}%; mean MI {:.5} nats",
            args.common.confidence * 100.0,
            extra.mean_interval_width,
            extra.unanimous_vote_share * 100.0,
            extra.mean_mutual_information
        );
        if let Some(m) = &extra.error_detection_auroc {
            let _ = writeln!(s, "misclassification AUROC: {}", fmt_auroc(m));
        }
    }
    for o in &ood {
        let _ = writeln!(s, "OOD AUROC vs {} ({} inputs): {}", o.data, o.inputs, fmt_auroc(&o.auroc));
        let _ = writeln!(s, "  FPR95: {}", fmt_auroc(&o.fpr95));
        if let Some(a) = &o.after {
            let _ = writeln!(s, "  after T: AUROC {}; FPR95 {}", fmt_auroc(&a.auroc), fmt_auroc(&a.fpr95));
        }
    }
    let _ = writeln!(
        s,
        "wrote {}, {} and {}",
        dir.join("eval.json").display(),
        dir.join("reliability.svg").display(),
        dir.join("reliability.png").display()
    );
    crate::out::print(&s)?;
    Ok(0)
}

fn fmt_auroc(m: &std::collections::BTreeMap<String, f64>) -> String {
    m.iter().map(|(k, v)| format!("{k} {v:.4}")).collect::<Vec<_>>().join(", ")
}

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    pvera::checkpoint::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}

/// Adds `extra`'s keys to the JSON object `row`.
fn merge_json(row: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(r), serde_json::Value::Object(e)) = (row.as_object_mut(), extra) {
        r.extend(e);
    }
}
