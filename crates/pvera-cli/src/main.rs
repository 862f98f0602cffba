//! `pvera`: the command-line tool. Thin commands over the `pvera` library.
//!
//! Exit codes (stable, scripts depend on them):
//! - 0: success
//! - 1: any other error
//! - 2: bad command line (clap)
//! - 3: `inspect --verify-projections`: stored projections differ from the regenerated ones
//! - 4: invalid or unreadable config (`adapter_config.json`), or one whose targets this model lacks;
//!   a stale or damaged `calibration.json`
//! - 5: invalid tensor file (corrupt safetensors, missing/mis-shaped/non-finite tensor)
//! - 6: file system error (missing directory or file, permissions)
//! - 7: invalid inputs file for `infer` (unknown tensor names, wrong dtype or shape)
//! - 8: `train`: training stopped on a non-finite loss, gradient or adapter value (the message names
//!   the step and the last good checkpoint)
//! - 9: unsupported model directory (unknown `model_type` or an architecture variant not implemented)
//! - 10: unusable data set (unreadable image, empty text, unknown label, ...): `train`, `eval`
//! - 130: `train` interrupted by SIGINT / SIGTERM after saving a resumable `last/` (the message
//!   says what was saved and how to resume); a second signal ends it at once
//! - 141: stdout closed by its reader (the command is killed by SIGPIPE, as a Unix tool is)
//!
//! `train` also answers 2 for flag values or data it cannot use (a task that does not fit the
//! model, a split that leaves no examples, ...).

mod bench;
mod calibrate;
mod common;
mod curves;
mod infer;
mod inspect;
mod out;
mod eval;
mod predict;
mod progress;
mod serve;
mod train;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// PVeRA adapters with exact Hugging Face PEFT parity: train, predict with uncertainty, evaluate
/// calibration, inspect, verify, infer, merge.
#[derive(Parser, Debug)]
#[command(name = "pvera", version, about, long_about = None)]
struct Cli {
    /// Log level for warnings and diagnostics (error, warn, info, debug).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print an adapter directory's config, tensors and parameter counts, and every problem that
    /// would keep it from loading; optionally verify that the stored projections equal the ones
    /// regenerated from `projection_prng_key`.
    Inspect(inspect::Args),
    /// Run a model (with PEFT adapters) on a tensor file of inputs; write the outputs.
    Infer(infer::InferArgs),
    /// Fold an adapter into the base weights; write a model directory transformers can load.
    Merge(infer::MergeArgs),
    /// Fine-tune a frozen model with a new PVeRA adapter (image / text classification, causal LM).
    Train(Box<train::TrainArgs>),
    /// Classify images or texts with Monte Carlo sampling of the adapter's latent: class,
    /// probability, Student-t interval, entropy and mutual information per input.
    Predict(Box<predict::PredictArgs>),
    /// Calibration (accuracy, NLL, Brier, ECE, reliability diagram) of mean-mode vs Monte Carlo
    /// predictions on a labelled set, and out-of-distribution AUROC against a second set.
    Eval(Box<eval::EvalArgs>),
    /// Fit calibration.json beside an adapter on labelled calibration rows: temperatures (mean mode and
    /// Monte Carlo) and split-conformal thresholds (LAC / APS / RAPS per alpha), which predict and eval use.
    Calibrate(Box<calibrate::CalibrateArgs>),
    /// Time the hot paths (eval, merged, training step, Monte Carlo, GEMM peak) on one model;
    /// `tools/bench_peft.py` runs it side by side with PyTorch + PEFT.
    Bench(Box<bench::BenchArgs>),
    /// Serve classifier adapters over HTTP (classify with uncertainty, TEI-style predict / embed, hot-load).
    Serve(Box<serve::ServeArgs>),
}

/// Exit code when stdout was closed by its reader before the output was written (what a Unix
/// tool killed by SIGPIPE reports: 128 + 13).
pub const EXIT_STDOUT_CLOSED: u8 = 141;

/// Exit code for a library error (see the crate docs).
pub fn exit_code_for(err: &anyhow::Error) -> u8 {
    for cause in err.chain() {
        if cause.downcast_ref::<infer::InputError>().is_some() {
            return 7;
        }
        if cause.downcast_ref::<progress::Diverged>().is_some() {
            return 8;
        }
        if cause.downcast_ref::<progress::Interrupted>().is_some() {
            return 130;
        }
        if cause.downcast_ref::<common::UsageError>().is_some() {
            return 2;
        }
        if cause.downcast_ref::<out::StdoutClosed>().is_some() {
            return EXIT_STDOUT_CLOSED;
        }
        if let Some(e) = cause.downcast_ref::<pvera::Error>() {
            return match e {
                pvera::Error::InvalidConfig { .. }
                | pvera::Error::ConfigParse { .. }
                | pvera::Error::WrongPeftType { .. }
                | pvera::Error::NoTargetMatched { .. }
                | pvera::Error::NoDefaultTargets { .. }
                | pvera::Error::StaleCalibration { .. } => 4,
                pvera::Error::Safetensors { .. }
                | pvera::Error::MissingTensor { .. }
                | pvera::Error::ShapeMismatch { .. }
                | pvera::Error::DtypeMismatch { .. }
                | pvera::Error::NonFinite { .. }
                | pvera::Error::UnexpectedTensors { .. } => 5,
                pvera::Error::Io { .. } => 6,
                pvera::Error::UnsupportedModel { .. } => 9,
                pvera::Error::Data(_) => 10,
                pvera::Error::Request(_) => 2,
                _ => 1,
            };
        }
        if cause.downcast_ref::<std::io::Error>().is_some() {
            return 6;
        }
    }
    1
}

/// glibc returns every freed block above its mmap threshold (128 KiB at first) to the kernel, so
/// each tensor of a forward pass is a fresh `mmap`, page-faulted in and unmapped again; for
/// MiniLM that doubled the time of an eval forward. Keep such blocks in the heap instead.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_TOP_PAD: i32 = -2;
    const M_MMAP_THRESHOLD: i32 = -3;
    const M_MMAP_MAX: i32 = -4;
    // SAFETY: mallopt only changes allocator parameters; called before any other thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum on 64-bit
        // Never give freed heap back to the kernel: a training step frees gigabytes at its end and
        // the next step would page-fault all of it in again (zeroed pages, TLB shootdowns across
        // threads); with a 1 GiB threshold this was 15 % of a MiniLM step. The peak (what RSS
        // reports) is unchanged; the process keeps it for reuse.
        mallopt(M_TRIM_THRESHOLD, -1);
        // Grow the heap in 64 MiB steps instead of one `brk` per large tensor.
        mallopt(M_TOP_PAD, 64 << 20);
        // No mmap at all: blocks above the (at most 32 MiB) threshold would still be fresh,
        // page-faulted mappings on every op (a DINOv2-S Monte Carlo forward of 32 images has
        // 50 MB activations); from the heap they are reused like the smaller ones.
        mallopt(M_MMAP_MAX, 0);
    }
}
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// The error and its causes on one line, each said once: a cause whose text the line already
/// holds (an I/O error that its wrapper quotes) is not repeated.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if msg.is_empty() || line.contains(&msg) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&msg);
    }
    line
}

/// `--log`: a level (error, warn, info, debug, trace, off) or tracing directives with `=`
/// (`pvera=debug,warn`); anything else is a typo, not a module name.
fn log_filter(spec: &str) -> Result<tracing_subscriber::EnvFilter, String> {
    const LEVELS: [&str; 6] = ["error", "warn", "info", "debug", "trace", "off"];
    let ok = spec.split(',').all(|d| {
        let d = d.trim();
        LEVELS.contains(&d.to_ascii_lowercase().as_str()) || d.split_once('=').is_some_and(|(_, l)| LEVELS.contains(&l.to_ascii_lowercase().as_str()))
    });
    if !ok {
        return Err(format!("--log {spec:?}: expected a level (error, warn, info, debug, trace, off) or directives such as pvera=debug,warn"));
    }
    tracing_subscriber::EnvFilter::try_new(spec).map_err(|e| format!("--log {spec:?}: {e}"))
}

/// A closed stdout ends a command as it ends a Unix tool: killed by SIGPIPE at the next write (a
/// shell reports 141), with nothing half-done (every file is written atomically before the
/// printing). Rust ignores SIGPIPE, which turns the write into an error and `println!` into a
/// panic; this restores the default. `train` keeps ignoring it: a closed stdout must not stop
/// training (it prints through `out::line`, which drops output once stdout is gone).
#[cfg(unix)]
fn die_on_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: resets one signal's disposition to the default before any other thread exists.
    unsafe {
        signal(SIGPIPE, SIG_DFL);
    }
}
#[cfg(not(unix))]
fn die_on_sigpipe() {}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Train(_) | Command::Serve(_)) {
        die_on_sigpipe();
    }
    let filter = match log_filter(&cli.log) {
        Ok(f) => f,
        Err(msg) => {
            out::eline(&format!("error: {msg}"));
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Infer(args) => infer::run_infer(args),
        Command::Merge(args) => infer::run_merge(args),
        Command::Train(args) => train::run(*args),
        Command::Predict(args) => predict::run_predict(*args),
        Command::Eval(args) => eval::run_eval(*args),
        Command::Calibrate(args) => calibrate::run(*args),
        Command::Bench(args) => bench::run(*args),
        Command::Serve(args) => serve::run(*args),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = exit_code_for(&e);
            if code != EXIT_STDOUT_CLOSED {
                out::eline(&format!("error: {}", error_chain(&e)));
            }
            ExitCode::from(code)
        }
    }
}
