//! `pvera predict` (and the flags `eval` and `calibrate` share): parse flags, call [`pvera::Predictor`], render.
//!
//! The classifier (model + adapter + task metadata), input encoding, Monte Carlo prediction,
//! calibration (`calibration.json`: [`pvera::predictor::calibrated`]) and the evaluation maths
//! live in the library (`pvera::predictor`, `pvera::uncertainty`); this file only turns flags into
//! calls and results into tables and files.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use pvera::models::heads::Pooling;
use pvera::data::Dataset;
use pvera::predictor::inputs::{image_files, text_file, InputSet};
use pvera::predictor::meta::{read_labels, SplitRecord};
use pvera::predictor::{CalibrationChoice, Calibrator, Modality, Noise, PredictConfig, PredictorOptions, TaskOverrides};
use pvera::state::Sampling;
use pvera::uncertainty::{ConformalScore, McMode, Prediction};
use pvera::Predictor;

use crate::common::set_threads;
use crate::{say, usage, warn_line};

/// The adapter name a CLI predictor loads its one adapter under.
pub(crate) const ADAPTER: &str = pvera::checkpoint::DEFAULT_ADAPTER;

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
pub(crate) fn predict_set(p: &mut Predictor, set: &InputSet, args: &CommonArgs, cfg: &PredictConfig, what: &str) -> Result<Vec<Prediction>> {
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
pub(crate) fn calibration_json(cal: &Calibrator) -> serde_json::Value {
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
pub(crate) fn calibration_notes(cal: &Calibrator, samples: usize) {
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

pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    pvera::checkpoint::write_atomic(path, bytes).with_context(|| format!("writing {}", path.display()))
}

