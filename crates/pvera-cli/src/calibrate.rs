//! `pvera calibrate`: parse flags, predict the calibration rows, call
//! [`pvera::predictor::calibrated::fit_calibration`], write `calibration.json` into the adapter
//! folder, render. The split, the fit and the file live in the library.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::Result;
use pvera::predictor::calibrated::{adapter_hash, fit_calibration, held_out_split, plan_scores, FitOptions};
use pvera::predictor::inputs::{labelled_data, subset};
use pvera::predictor::meta::data_fingerprint;
use pvera::uncertainty::calibration_file::{CalibrationSplit, ModeCalibration};
use pvera::uncertainty::{ConformalScore, CALIBRATION_FILE};

use crate::predict::{open, predict_labelled, request_error, unused_of, CommonArgs};
use crate::{say, usage, warn_line};

/// Calibration rows drawn from a run's unused examples when `--calibration-size` is not given:
/// half of them, at most this many.
const DEFAULT_HELD_OUT_CALIBRATION: usize = 500;

/// Arguments of `pvera calibrate`.
#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Labelled calibration data (as `pvera eval --data`), disjoint from the adapter's training data and from
    /// the rows you will test on; with --held-out-of, the very file the run trained on.
    #[arg(long)]
    pub data: PathBuf,
    /// Draw the calibration rows from the examples `pvera train --output DIR` left unused (its split.json),
    /// and set the rest aside as test rows; both are recorded in calibration.json, and `pvera eval
    /// --held-out-of DIR` then evaluates the test rows.
    #[arg(long)]
    pub held_out_of: Option<PathBuf>,
    /// Calibration rows: with --held-out-of, taken from the run's unused examples (default: half of them, at
    /// most 500); without, a seeded subset of --data (default: all of it).
    #[arg(long, visible_alias = "limit")]
    pub calibration_size: Option<usize>,
    /// With --held-out-of: record at most this many test rows (default: every unused example that does not
    /// calibrate).
    #[arg(long, requires = "held_out_of")]
    pub test_size: Option<usize>,
    /// Miscoverage levels alpha of the conformal sets (comma-separated); the first is the default coverage of
    /// predict / eval.
    #[arg(long, value_delimiter = ',', default_value = "0.1,0.05")]
    pub alpha: Vec<f64>,
    /// Conformity scores (comma-separated: lac, aps, raps; default all that apply: APS and RAPS need 3 or more
    /// classes, RAPS enough rows). The first is the default of predict / eval.
    #[arg(long, value_delimiter = ',')]
    pub score: Vec<String>,
    /// Print calibration.json's summary as JSON instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// `pvera calibrate`.
pub fn run(args: CalibrateArgs) -> Result<u8> {
    let mut alphas = Vec::new();
    for &a in &args.alpha {
        if !(a > 0.0 && a < 1.0) {
            usage!("--alpha {a}: a miscoverage level must be strictly between 0 and 1, e.g. 0.1 (90 % coverage)");
        }
        if alphas.contains(&a) {
            usage!("--alpha {a} is given twice");
        }
        alphas.push(a);
    }
    if alphas.is_empty() {
        usage!("--alpha: give at least one level, e.g. 0.1");
    }
    let mut scores = Vec::new();
    for s in &args.score {
        match s.parse::<ConformalScore>() {
            Ok(x) if !scores.contains(&x) => scores.push(x),
            Ok(x) => usage!("--score {x} is given twice"),
            Err(_) => usage!("--score {s:?}: expected lac, aps or raps"),
        }
    }
    let scores_given = !scores.is_empty();
    if !scores_given {
        scores = ConformalScore::ALL.to_vec();
    }
    if args.calibration_size == Some(0) {
        usage!("--calibration-size 0: calibrate on at least one row");
    }
    if !args.data.exists() {
        return Err(crate::common::not_found(&args.data, "--data: no such file or folder"));
    }
    let adapter = &args.common.adapter;
    let (mut p, cfg) = open(&args.common, 1)?;
    let data = labelled_data(&p, pvera::checkpoint::DEFAULT_ADAPTER, &args.data).map_err(request_error)?;
    let sha = data_fingerprint(&args.data)?;
    let seed = args.common.seed;
    let split = match &args.held_out_of {
        Some(run) => {
            let unused = unused_of(run, &args.data, data.as_ref(), &sha)?;
            let n_cal = args.calibration_size.unwrap_or_else(|| (unused.len() / 2).clamp(1, DEFAULT_HELD_OUT_CALIBRATION));
            let (cal, mut test) = held_out_split(&unused, n_cal, seed).map_err(|e| match e {
                pvera::Error::Request(m) => anyhow::Error::new(crate::common::UsageError(format!("--calibration-size: {m}"))),
                other => other.into(),
            })?;
            if let Some(t) = args.test_size {
                test.truncate(t);
            }
            let description = format!(
                "{} of the {} examples `pvera train --output {}` left unused (randperm, seed {seed}); {} of the others \
                 are the test rows",
                cal.len(),
                unused.len(),
                run.display(),
                test.len()
            );
            CalibrationSplit::new(args.data.display().to_string(), cal, description).with_test_rows(test)
        }
        None => {
            let rows = subset(data.len(), args.calibration_size, seed);
            let description = format!(
                "{} of the {} rows of {} ({}); assumed disjoint from the adapter's training data and from the rows it \
                 will be tested on (not checked: --held-out-of draws them from a training run's unused examples)",
                rows.len(),
                data.len(),
                args.data.display(),
                if rows.len() < data.len() { format!("randperm subset, seed {seed}") } else { "all".into() }
            );
            warn_line!("note: {description}");
            CalibrationSplit::new(args.data.display().to_string(), rows, description)
        }
    }
    .with_data_sha256(sha);
    // the adapter folder must take the file before the work starts
    let probe = adapter.join(".pvera-write-probe");
    std::fs::write(&probe, b"").map_err(|e| pvera::Error::io(&probe, e))?;
    let _ = std::fs::remove_file(&probe);
    let hash = adapter_hash(adapter)?;
    // every score and alpha checked against the rows before the first forward
    let opts = FitOptions { alphas, scores, scores_given, seed, ..FitOptions::default() };
    let classes = p.adapter(pvera::checkpoint::DEFAULT_ADAPTER)?.labels().len();
    plan_scores(classes, split.rows.len(), &opts).map_err(request_error)?;

    let t0 = std::time::Instant::now();
    let rows = split.rows.clone();
    let (preds, labels) = predict_labelled(&mut p, data.as_ref(), &rows, &args.common, &cfg, "calibrate")?;
    let fitted = fit_calibration(&preds, &labels, &hash, split, &opts).map_err(request_error)?;
    for n in &fitted.notes {
        warn_line!("note: {n}");
    }
    let path = adapter.join(CALIBRATION_FILE);
    fitted.file.write(&path)?;
    let secs = t0.elapsed().as_secs_f64();
    let f = &fitted.file;
    let labels_names = p.adapter(pvera::checkpoint::DEFAULT_ADAPTER)?.labels().to_vec();

    if args.json {
        let mode = |m: &ModeCalibration| {
            serde_json::json!({
                "samples": m.samples,
                "temperature": m.temperature,
                "conformal": m.conformal.iter().map(|c| serde_json::json!({
                    "score": c.score.name(),
                    "thresholds": c.thresholds,
                })).collect::<Vec<_>>(),
            })
        };
        let j = serde_json::json!({
            "calibration": path.display().to_string(),
            "adapter_hash": f.adapter_hash,
            "labels": labels_names,
            "n": f.n,
            "seed": f.seed,
            "split": {"description": f.split.description, "rows": f.split.rows, "rows_hash": f.split.rows_hash,
                      "test_rows": f.split.test_rows, "test_rows_hash": f.split.test_rows_hash},
            "mean_mode": mode(&f.mean),
            "monte_carlo": f.mc.as_ref().map(mode),
            "notes": fitted.notes,
            "seconds": secs,
        });
        say!("{}", serde_json::to_string_pretty(&j)?);
        return Ok(0);
    }
    let mut s = String::new();
    let _ = writeln!(s, "calibrated {} on {} rows in {secs:.1}s", adapter.display(), f.n);
    let _ = writeln!(s, "rows: {} ({})", f.split.description, f.split.rows_hash);
    if let Some(h) = &f.split.test_rows_hash {
        let _ = writeln!(s, "test rows: {} ({h}); evaluate them with pvera eval --held-out-of", f.split.test_rows.len());
    }
    for (name, m) in [("mean mode", Some(&f.mean)), ("Monte Carlo", f.mc.as_ref())] {
        let Some(m) = m else { continue };
        let t = &m.temperature;
        let _ = writeln!(
            s,
            "{name} ({} sample(s)): T = {:.4}{}, NLL {:.4} -> {:.4}",
            m.samples,
            t.temperature,
            if t.at_bound { " (at the search bound)" } else { "" },
            t.nll_before,
            t.nll_after
        );
        for c in &m.conformal {
            let th: Vec<String> = c
                .thresholds
                .iter()
                .map(|x| {
                    let raps = x.raps.map_or(String::new(), |r| format!(" (k {}, lambda {})", r.k_reg, r.lambda));
                    format!("alpha {}: q {:.6}{raps}", x.alpha, x.quantile)
                })
                .collect();
            let _ = writeln!(s, "  {:<4} {}", c.score.name(), th.join("; "));
        }
    }
    let _ = writeln!(s, "wrote {}", path.display());
    crate::out::print(&s)?;
    Ok(0)
}
