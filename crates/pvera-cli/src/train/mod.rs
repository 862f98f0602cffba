//! `pvera train`: fine-tune a frozen model with a fresh PVeRA (or, `--method vera`, VeRA) adapter
//! on a local data set.
//!
//! [`args`] checks every flag and path before any work; this file opens the data through the
//! library (`pvera::data::labelled`), writes the library's task metadata into every adapter folder
//! (`pvera_task.json`, `labels.json`) and the run's `split.json`, hands model and data to the
//! trainer ([`crate::progress::fit`] renders it), and evaluates the best adapter through
//! `pvera::Predictor`, the path `pvera eval` takes too.

mod args;

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use pvera::checkpoint::DEFAULT_ADAPTER;
use pvera::data::images::ImagePreprocess;
use pvera::data::labelled::{model_tokenizer, training_split, Encoder, LabelledSet};
use pvera::data::text::{CausalLm, CausalLmOptions, LabelMap, TextTokenizer};
use pvera::data::Dataset;
use pvera::models::heads::{Classifier, Pooling};
use pvera::models::AnyModel;
use pvera::predictor::meta::{data_fingerprint, SplitRecord, TaskKind as MetaTask, TaskMeta};
use pvera::predictor::{PredictConfig, PredictorOptions, TaskOverrides};
use pvera::train::{causal_lm_eval, CausalLmObjective, ClassificationObjective, SplitData, TrainConfig, TrainReport};
use pvera::{PeftModel, Predictor, RunState};

pub use args::{TaskKind, TrainArgs};
use crate::common::flag_error;
use args::{adapter_config, check, Checked};

use crate::curves::write_curves;
use crate::progress::fit;
use crate::{note, usage};

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

/// Writes the task metadata into the run folder and the adapter folders the trainer fills, so
/// `best/` or `last/` shipped alone still says how to predict with it.
fn write_task_meta(out: &Path, meta: &TaskMeta) -> Result<()> {
    for d in [out.to_path_buf(), out.join("best"), out.join("last")] {
        meta.write(&d).with_context(|| format!("writing task metadata into {}", d.display()))?;
    }
    Ok(())
}

/// The run's training configuration with the data's fingerprint (so a resume checks the data).
fn tcfg_for(args: &TrainArgs, c: &Checked) -> Result<TrainConfig> {
    let mut t = c.tcfg.clone();
    t.data_fingerprint = Some(data_fingerprint(&args.data)?);
    Ok(t)
}

fn run_classification(args: &TrainArgs, c: &Checked, started: Instant) -> Result<u8> {
    let device = Device::Cpu;
    let mt = c.dir.model_type.as_str();
    let pooling = args.pooling.as_deref().and_then(Pooling::from_name).unwrap_or_else(|| Pooling::default_for(mt));
    let tok = match args.task {
        TaskKind::TextClassification => Some(model_tokenizer(&c.dir, args.tokenizer.as_deref(), args.max_length, args.pad_token.clone())?),
        _ => None,
    };
    let pre = match args.task {
        TaskKind::ImageClassification => Some(ImagePreprocess::for_model_dir(&args.model)?),
        _ => None,
    };
    let encoder = match (&tok, &pre) {
        (Some(t), _) => Encoder::Text(t),
        (_, Some(p)) => Encoder::Image(p),
        _ => usage!("no tokenizer or image preprocessing for {mt}"),
    };
    let open = |p: &Path, map: Option<LabelMap>| LabelledSet::open(p, encoder, map, &device).with_context(|| format!("reading {}", p.display()));
    let train = open(&args.data, None)?;
    let n = train.data.len();
    if train.labels.len() < 2 {
        usage!("{}: {} class(es) found; classification needs at least 2", args.data.display(), train.labels.len());
    }
    // The evaluation set is opened (and checked) now, not after training.
    let eval_set = match &args.eval_data {
        Some(p) => {
            let d = open(p, Some(LabelMap::new(train.labels.clone())?))?;
            if tok.is_none() && d.labels != train.labels {
                usage!("--eval-data {}: classes {:?} differ from the training classes {:?}", p.display(), d.labels, train.labels);
            }
            Some(d)
        }
        None => None,
    };
    let plan = training_split(n, args.train_size, args.val_fraction, args.seed, train.data.class_ids()).map_err(flag_error)?;
    if args.eval_held_out.is_some() && plan.rest.is_empty() {
        usage!("--eval-held-out: no unused examples left (the data has {n}, --train-size takes them all)");
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
    let tcfg = tcfg_for(args, c)?;
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
        data_sha256: tcfg.data_fingerprint.clone(),
        train: plan.train.clone(),
        validation: plan.val.clone(),
        unused: plan.rest.clone(),
    }
    .write(&args.output)?;
    let mut data = SplitData::new(train.data.clone(), plan.train.clone(), plan.val.clone(), args.batch_size, args.seed)?;
    let report = fit(tcfg, args.resume.as_deref(), &args.output, &mut pm, &ClassificationObjective, &mut data)?;
    drop(pm);

    // Held-out evaluation of the best adapter, through the library's predictor.
    let (set, idx, what) = match (eval_set, args.eval_held_out) {
        (Some(d), _) => {
            let idx: Vec<usize> = (0..d.data.len()).collect();
            (d, idx, args.eval_data.as_ref().map(|p| p.display().to_string()).unwrap_or_default())
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
    let mut p = Predictor::open_with_adapter(&args.model, &best, &opts, &overrides).with_context(|| format!("loading {}", best.display()))?;
    let t0 = Instant::now();
    let cfg = PredictConfig { samples: 1, ..PredictConfig::default() };
    let (preds, ys) = p.predict_examples(DEFAULT_ADAPTER, set.data.as_ref(), &idx, args.batch_size, &cfg, &mut |_, _| {})?;
    let cal = pvera::uncertainty::calibration(&preds.iter().map(|p| p.mean_mode.clone()).collect::<Vec<_>>(), &ys, 15)?;
    let correct = preds.iter().zip(&ys).filter(|(p, &y)| p.predicted() == y).count();
    note!(
        "eval (best adapter, epoch {}): {what}: accuracy {:.4} ({correct}/{}), loss {:.4}, {:.1}s",
        report.best_epoch.map_or("-".to_string(), |e| e.to_string()),
        cal.accuracy,
        preds.len(),
        cal.nll,
        t0.elapsed().as_secs_f64()
    );
    if args.show_predictions > 0 {
        note!("predictions:");
    }
    for ((pr, &y), &i) in preds.iter().zip(&ys).zip(&idx).take(args.show_predictions) {
        let k = pr.predicted();
        let mark = if y == k { "ok" } else { "XX" };
        note!("  [{mark}] true {:<8} predicted {:<8} p={:.3}  {}", meta.labels[y], meta.labels[k], pr.probability(), set.describe(i));
    }
    let eval_json = serde_json::json!({
        "data": what, "examples": preds.len(), "correct": correct, "accuracy": cal.accuracy, "loss": cal.nll,
        "best_epoch": report.best_epoch,
    });
    finish(args, &report, eval_json, started)
}

fn run_causal(args: &TrainArgs, c: &Checked, started: Instant) -> Result<u8> {
    let device = Device::Cpu;
    let tok = model_tokenizer(&c.dir, args.tokenizer.as_deref(), None, args.pad_token.clone())?;
    let block = args.max_length.unwrap_or(128);
    let open = |p: &Path| -> Result<Arc<dyn Dataset>> {
        Ok(Arc::new(
            CausalLm::from_text_file(p, &tok, &CausalLmOptions::new(block), &device).with_context(|| format!("reading {}", p.display()))?,
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
    let plan = training_split(n, args.train_size, args.val_fraction, args.seed, None).map_err(flag_error)?;
    note!("data: {} ({n} blocks of {block} tokens); train {} / validation {}", args.data.display(), plan.train.len(), plan.val.len());
    let state = Arc::new(RunState::new(args.seed));
    let (model, registry, info) =
        AnyModel::load(&c.dir, c.dtype, &device, state).with_context(|| format!("loading model {}", args.model.display()))?;
    let mut pm = PeftModel::new(model, registry, info, adapter_config(args, &c.dir.model_type, false)?, "default").map_err(flag_error)?;
    let meta = TaskMeta { task: MetaTask::CausalLm, model_type: c.dir.model_type.clone(), labels: Vec::new(), pooling: None, max_length: Some(block) };
    write_task_meta(&args.output, &meta)?;
    let mut data = SplitData::new(ds.clone(), plan.train.clone(), plan.val.clone(), args.batch_size, args.seed)?;
    let report = fit(tcfg_for(args, c)?, args.resume.as_deref(), &args.output, &mut pm, &CausalLmObjective, &mut data)?;
    let mut eval_json = serde_json::Value::Null;
    if let (Some(eval), Some(p)) = (eval, &args.eval_data) {
        let best = args.output.join("best");
        pvera::train::load_adapter_weights(&mut pm, &best).with_context(|| format!("loading {}", best.display()))?;
        let (loss, tokens) = causal_lm_eval(&pm, eval.as_ref(), args.batch_size)?;
        note!("eval (best adapter): {}: loss {loss:.4}, perplexity {:.2} ({tokens} tokens)", p.display(), loss.exp());
        eval_json = serde_json::json!({"data": p.display().to_string(), "tokens": tokens, "loss": loss, "perplexity": loss.exp()});
    }
    finish(args, &report, eval_json, started)
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
