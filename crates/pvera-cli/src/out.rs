//! Printing that never panics and never aborts work.
//!
//! `println!` panics when stdout is a closed pipe (`pvera predict --json … | head -3`). Here a
//! closed stdout is remembered: commands whose output is their product stop with
//! [`StdoutClosed`] (exit 141, what a Unix tool killed by SIGPIPE reports, with no message), while
//! `pvera train` keeps training and saving and simply prints no more. stderr write errors are
//! ignored (there is nowhere left to report them).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static CLOSED: AtomicBool = AtomicBool::new(false);

/// stdout was closed by its reader; the command's remaining output is dropped.
#[derive(Debug)]
pub struct StdoutClosed;

impl std::fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("stdout was closed before all output was written")
    }
}
impl std::error::Error for StdoutClosed {}

/// Whether stdout has been found closed.
pub fn closed() -> bool {
    CLOSED.load(Ordering::Relaxed)
}

/// Writes `text` to stdout and flushes. A closed pipe is remembered and reported as
/// [`StdoutClosed`]; callers that must go on (training) ignore the result.
pub fn print(text: &str) -> Result<(), StdoutClosed> {
    if closed() {
        return Err(StdoutClosed);
    }
    let mut o = std::io::stdout().lock();
    match o.write_all(text.as_bytes()).and_then(|_| o.flush()) {
        Ok(()) => Ok(()),
        Err(_) => {
            CLOSED.store(true, Ordering::Relaxed);
            Err(StdoutClosed)
        }
    }
}

/// Writes one line to stdout (see [`print`]).
pub fn line(text: &str) -> Result<(), StdoutClosed> {
    let mut s = String::with_capacity(text.len() + 1);
    s.push_str(text);
    s.push('\n');
    print(&s)
}

/// Writes one line to stderr, ignoring errors.
pub fn eline(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{text}");
}

/// Writes to stderr without a newline, ignoring errors.
pub fn eprint(text: &str) {
    let mut e = std::io::stderr().lock();
    let _ = write!(e, "{text}");
    let _ = e.flush();
}

/// `println!` for command output: stops the command with [`StdoutClosed`] when stdout is gone.
#[macro_export]
macro_rules! say {
    ($($t:tt)*) => { $crate::out::line(&format!($($t)*))? };
}

/// `println!` for progress output that must not stop the work (training): a closed stdout is
/// ignored.
#[macro_export]
macro_rules! note {
    ($($t:tt)*) => {{ let _ = $crate::out::line(&format!($($t)*)); }};
}

/// `eprintln!` that ignores a closed stderr.
#[macro_export]
macro_rules! warn_line {
    ($($t:tt)*) => { $crate::out::eline(&format!($($t)*)) };
}
