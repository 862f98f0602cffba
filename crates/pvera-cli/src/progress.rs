//! `pvera train`'s run on the terminal and in logs: the trainer driven with a stop flag for
//! SIGINT / SIGTERM, its events rendered (a progress bar on a terminal, a line every few seconds
//! otherwise, epoch lines, each warning once), its outcome turned into the CLI's error types.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use pvera::data::Batch;
use pvera::train::{EpochMetrics, Objective, SplitData, StopReason, TrainConfig, TrainEvent, TrainReport, Trainer};
use pvera::PeftModel;

use crate::common::UsageError;
use crate::curves::write_curves;
use crate::{note, warn_line};

/// Training stopped on a non-finite loss, gradient or variable (exit code 8).
#[derive(Debug)]
pub struct Diverged(pub String);

impl std::fmt::Display for Diverged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Diverged {}

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

/// Trains `pm` on `data` with `task` (resuming from `resume` when given), rendering the events;
/// `out` receives the curves as epochs end.
pub fn fit<M, T>(
    tcfg: TrainConfig,
    resume: Option<&Path>,
    out: &Path,
    pm: &mut PeftModel<M>,
    task: &T,
    data: &mut SplitData,
) -> Result<TrainReport>
where
    T: Objective<M, Batch = Batch>,
{
    let mut trainer = Trainer::new(tcfg).map_err(crate::common::flag_error)?;
    trainer.set_stop_flag(stop_flag()?);
    if let Some(r) = resume {
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
    let out = out.to_path_buf();
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
            let _ = write_curves(&out, &r.epochs);
            let msg = interrupted.unwrap_or_else(|| format!("training interrupted; resume with --resume {}", out.join("last").display()));
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

pub fn epoch_line(m: &EpochMetrics, epochs: usize) -> String {
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

