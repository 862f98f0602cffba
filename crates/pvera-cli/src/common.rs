//! What every command shares: the usage-error type (exit 2) and its macro, thread setup, and the
//! rules for output folders (never an input, never someone's model or adapter, never a
//! non-empty folder without `--overwrite`).

use std::path::{Path, PathBuf};

use anyhow::Result;

/// A wrong flag value or combination found after parsing (exit code 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for UsageError {}

/// Returns early with a [`UsageError`] (exit code 2).
#[macro_export]
macro_rules! usage {
    ($($t:tt)*) => { return Err(anyhow::Error::new($crate::common::UsageError(format!($($t)*)))) };
}

/// Sets the worker-thread count for the heavy ops (before any work starts).
pub fn set_threads(threads: Option<usize>) -> Result<()> {
    if let Some(t) = threads {
        if t == 0 {
            usage!("--threads 0: use at least one thread");
        }
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    Ok(())
}

/// A file-system error naming the path (exit code 6).
pub fn not_found(path: &Path, what: &str) -> anyhow::Error {
    anyhow::Error::new(pvera::Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, what.to_string())))
}

fn same_path(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// What kind of folder `dir` is, when it holds someone's work: a model or an adapter.
fn holds(dir: &Path) -> Option<&'static str> {
    if dir.join(pvera::checkpoint::CONFIG_NAME).is_file() || dir.join(pvera::checkpoint::WEIGHTS_NAME).is_file() {
        Some("an adapter folder")
    } else if dir.join("config.json").is_file()
        && (dir.join("model.safetensors").is_file() || dir.join("model.safetensors.index.json").is_file())
    {
        Some("a model folder")
    } else {
        None
    }
}

/// How a command may treat an existing output folder.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reuse {
    /// Refuse a non-empty folder unless `--overwrite` (the flag's value) (train, merge).
    EmptyOrOverwrite(bool),
    /// Rewrite the command's own files in a folder (eval's report).
    OwnFiles,
}

/// An output folder checked before any work: not one of `inputs` (flag, path), not inside one,
/// not an adapter folder, not a model folder (unless `--overwrite` replaces an earlier output),
/// not a file, and empty unless the rule allows.
pub fn check_output(flag: &str, out: &Path, inputs: &[(&str, &Path)], reuse: Reuse) -> Result<OutputDir> {
    for (iflag, input) in inputs {
        if same_path(out, input) {
            usage!(
                "{flag} {}: that is the {iflag} folder; write the output somewhere else (pvera never writes into its inputs)",
                out.display()
            );
        }
        if let (Ok(o), Ok(i)) = (out.canonicalize(), input.canonicalize()) {
            if o.starts_with(&i) && i.is_dir() {
                usage!("{flag} {}: that is inside the {iflag} folder {}; write the output somewhere else", out.display(), input.display());
            }
        }
    }
    if out.exists() && !out.is_dir() {
        usage!("{flag} {}: a file is there; give a folder path (it will be created)", out.display());
    }
    if !out.exists() {
        return Ok(OutputDir { path: out.to_path_buf(), existed: false });
    }
    let overwrite = reuse == Reuse::EmptyOrOverwrite(true);
    match holds(out) {
        Some(kind @ "an adapter folder") => {
            usage!("{flag} {}: that is {kind}; pick a new folder (pvera does not write beside someone's adapter)", out.display())
        }
        Some(kind) if !overwrite => usage!(
            "{flag} {}: that is {kind}; pick a new folder, or pass --overwrite if it is an earlier output of this command",
            out.display()
        ),
        _ => {}
    }
    let empty = std::fs::read_dir(out).map(|mut d| d.next().is_none()).unwrap_or(false);
    if reuse == Reuse::EmptyOrOverwrite(false) && !empty {
        usage!(
            "{flag} {}: the folder is not empty (an earlier run?); pick a new folder or pass --overwrite to replace its files",
            out.display()
        );
    }
    Ok(OutputDir { path: out.to_path_buf(), existed: true })
}

/// A checked output folder.
#[derive(Debug)]
pub struct OutputDir {
    path: PathBuf,
    existed: bool,
}

impl OutputDir {
    /// Creates the folder (and its parents) when missing.
    pub fn create(&self) -> Result<&Path> {
        std::fs::create_dir_all(&self.path).map_err(|e| pvera::Error::io(&self.path, e))?;
        Ok(&self.path)
    }

    /// Checks that the folder can be written (creating it, writing and removing a probe file),
    /// so an unwritable place fails before the work, not after it.
    pub fn probe_writable(&self) -> Result<()> {
        self.create()?;
        let probe = self.path.join(".pvera-write-probe");
        std::fs::write(&probe, b"").map_err(|e| pvera::Error::io(&probe, e))?;
        let _ = std::fs::remove_file(&probe);
        Ok(())
    }

    /// After a failed run: removes the folder if this run created it and left it empty.
    pub fn cleanup_after_failure(&self) {
        if !self.existed {
            let _ = std::fs::remove_dir(&self.path);
        }
    }
}

/// A library config error about a value that came from a flag: exit 2, named by its flag.
pub fn flag_error(e: pvera::Error) -> anyhow::Error {
    match e {
        pvera::Error::InvalidConfig { field, reason } => {
            let flag = match field.as_str() {
                "pvera_dropout" | "vera_dropout" => "dropout".to_string(),
                "betas" | "eps" | "min_delta" | "restore_best" => field.clone(),
                f => f.replace('_', "-"),
            };
            anyhow::Error::new(UsageError(format!("--{flag}: {reason}")))
        }
        pvera::Error::Request(m) => anyhow::Error::new(UsageError(m)),
        other => anyhow::Error::new(other),
    }
}
