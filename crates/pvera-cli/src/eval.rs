//! `pvera eval`: parse flags, call [`pvera::Predictor`] on labelled data (and OOD sets), render
//! the library's figures (`pvera::uncertainty::evaluate`, `figures`, `ood_figures`, `set_figures`)
//! as tables, `eval.json` and the reliability diagram. Calibration (`calibration.json`) is read
//! and applied by the library ([`pvera::predictor::calibrated`]).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use pvera::predictor::calibrated::evaluation_rows;
use pvera::predictor::inputs::{labelled_data, subset, InputSet};
use pvera::predictor::meta::data_fingerprint;
use pvera::predictor::Calibrator;
use pvera::uncertainty::{
    evaluate, figures, ood_figures, reliability_png, reliability_svg, set_figures, Prediction, SetFigures,
};

use crate::predict::{
    calibration_json, calibration_notes, load_calibrator, open, predict_labelled, predict_set, request_error, unused_of,
    write_atomic, CalibrationArgs, CommonArgs, ADAPTER,
};
use crate::common::{check_output, Reuse};
use crate::usage;

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


/// Adds `extra`'s keys to the JSON object `row`.
fn merge_json(row: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(r), serde_json::Value::Object(e)) = (row.as_object_mut(), extra) {
        r.extend(e);
    }
}
