//! `calibration.json`: what `pvera calibrate` fits on a calibration split and what predict, eval
//! and the server apply: per prediction mode (mean, Monte Carlo) the temperature and the conformal
//! thresholds per score and `α`, with the split, the seed and a hash of the adapter the fit belongs
//! to. [`CalibrationFile::check_adapter_hash`] refuses a file fitted for another adapter
//! ([`Error::StaleCalibration`]). Fitting and applying it: [`crate::predictor::calibrated`].
//! Read and written as pretty JSON; writes are atomic ([`write_atomic`]). Numbers are read with
//! [`parse_json_exact`], so every threshold comes back bit for bit (serde_json's default float
//! parser is best-effort and may land one ulp off).

use std::path::Path;

use crate::checkpoint::write_atomic;
use crate::error::{Error, Result};
use crate::uncertainty::conformal::{ConformalFit, ConformalScore};
use crate::uncertainty::temperature::TemperatureFit;

/// The file name, beside the adapter.
pub const CALIBRATION_FILE: &str = "calibration.json";
/// The format this version writes and reads (a newer one is refused).
pub const CALIBRATION_FORMAT_VERSION: u32 = 1;

/// Parses JSON with every number correctly rounded to the nearest f64. serde_json without its
/// `float_roundtrip` feature parses floats on a best-effort basis (sometimes one ulp off), which
/// would move a conformal threshold read back from a file. Each number token is taken out of the
/// text as a marked string, parsed by Rust's `str::parse` (correctly rounded), and put back as a
/// [`serde_json::Number`] holding that exact value; integers stay integers.
pub fn parse_json_exact(text: &str) -> std::result::Result<serde_json::Value, serde_json::Error> {
    const MARK: char = '\u{1}';
    let mut quoted = String::with_capacity(text.len() + text.len() / 4);
    let mut chars = text.chars().peekable();
    let (mut in_string, mut escaped) = (false, false);
    while let Some(ch) = chars.next() {
        if in_string {
            quoted.push(ch);
            if escaped {
                escaped = false;
            } else if ch == '\\' {
                escaped = true;
            } else if ch == '"' {
                in_string = false;
            }
        } else if ch == '"' {
            in_string = true;
            quoted.push(ch);
        } else if ch == '-' || ch.is_ascii_digit() {
            quoted.push_str("\"\\u0001");
            quoted.push(ch);
            while let Some(&c) = chars.peek() {
                if c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-') {
                    quoted.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
            quoted.push('"');
        } else {
            quoted.push(ch);
        }
    }
    fn restore(v: serde_json::Value) -> std::result::Result<serde_json::Value, String> {
        use serde_json::Value;
        Ok(match v {
            Value::String(s) => match s.strip_prefix(MARK) {
                Some(tok) => {
                    let int = !tok.contains(['.', 'e', 'E']);
                    if let (true, Ok(u)) = (int, tok.parse::<u64>()) {
                        Value::from(u)
                    } else if let (true, Ok(i)) = (int, tok.parse::<i64>()) {
                        Value::from(i)
                    } else {
                        let x: f64 = tok.parse().map_err(|e| format!("number {tok:?}: {e}"))?;
                        Value::Number(serde_json::Number::from_f64(x).ok_or(format!("number {tok} is out of range"))?)
                    }
                }
                None => Value::String(s),
            },
            Value::Array(a) => Value::Array(a.into_iter().map(restore).collect::<std::result::Result<_, _>>()?),
            Value::Object(o) => Value::Object(
                o.into_iter().map(|(k, v)| Ok((k, restore(v)?))).collect::<std::result::Result<_, String>>()?,
            ),
            other => other,
        })
    }
    // syntax errors with the file's own line and column first
    serde_json::from_str::<serde_json::Value>(text)?;
    let v: serde_json::Value = serde_json::from_str(&quoted)?;
    restore(v).map_err(serde::de::Error::custom)
}

/// The calibration rows: which rows of which data set the fit used.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CalibrationSplit {
    /// The data set (as the user named it).
    pub data: String,
    /// Row indices into the data set, in the order used.
    pub rows: Vec<usize>,
    /// [`rows_hash`] of `rows`.
    pub rows_hash: String,
    /// How the rows were chosen (free text, e.g. "held out of TRAIN_OUT's split, seed 0").
    #[serde(default)]
    pub description: String,
    /// SHA-256 fingerprint of the data set's contents
    /// ([`data_fingerprint`](crate::predictor::meta::data_fingerprint)), so an evaluation of the
    /// same data can leave the calibration rows out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_sha256: Option<String>,
    /// The test rows set aside with the calibration rows (when the split was made of a training
    /// run's unused examples): disjoint from `rows` and from the training data.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test_rows: Vec<usize>,
    /// [`rows_hash`] of `test_rows` (when there are test rows).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_rows_hash: Option<String>,
}

impl CalibrationSplit {
    /// A split record with its hash.
    pub fn new(data: impl Into<String>, rows: Vec<usize>, description: impl Into<String>) -> Self {
        let rows_hash = rows_hash(&rows);
        CalibrationSplit {
            data: data.into(),
            rows,
            rows_hash,
            description: description.into(),
            data_sha256: None,
            test_rows: Vec::new(),
            test_rows_hash: None,
        }
    }

    /// The same split with the data set's fingerprint recorded.
    pub fn with_data_sha256(mut self, sha256: impl Into<String>) -> Self {
        self.data_sha256 = Some(sha256.into());
        self
    }

    /// The same split with its test rows (and their hash) recorded.
    pub fn with_test_rows(mut self, test_rows: Vec<usize>) -> Self {
        self.test_rows_hash = (!test_rows.is_empty()).then(|| rows_hash(&test_rows));
        self.test_rows = test_rows;
        self
    }
}

/// 64-bit FNV-1a over the rows as little-endian u64s, in hex: a short fingerprint of a split.
pub fn rows_hash(rows: &[usize]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &r in rows {
        for b in (r as u64).to_le_bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("fnv1a64:{h:016x}")
}

/// The calibration of one prediction mode.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ModeCalibration {
    /// Monte Carlo samples `S` (1 in mean mode).
    pub samples: usize,
    /// The fitted temperature.
    pub temperature: TemperatureFit,
    /// Whether the conformal thresholds were fitted on temperature-scaled probabilities (then
    /// the sets must be computed on them too).
    pub conformal_on_scaled: bool,
    /// One fit per conformity score.
    pub conformal: Vec<ConformalFit>,
    /// When `conformal_on_scaled`: the same scores fitted on the unscaled probabilities, so an
    /// evaluation can report conformal sets before and after temperature scaling.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conformal_raw: Vec<ConformalFit>,
}

impl ModeCalibration {
    /// The conformal fit of `score`, if present.
    pub fn conformal(&self, score: ConformalScore) -> Option<&ConformalFit> {
        self.conformal.iter().find(|f| f.score == score)
    }
}

/// The contents of `calibration.json`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CalibrationFile {
    /// [`CALIBRATION_FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// The pvera version that wrote it.
    pub pvera_version: String,
    /// Hash of the adapter the fit belongs to (computed by the caller).
    pub adapter_hash: String,
    /// Calibration rows.
    pub n: usize,
    /// Seed of the split and of the randomised scores.
    pub seed: u64,
    /// The calibration rows.
    pub split: CalibrationSplit,
    /// Mean-mode calibration.
    pub mean: ModeCalibration,
    /// Monte Carlo calibration, when fitted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mc: Option<ModeCalibration>,
}

impl CalibrationFile {
    /// A file of this format version and pvera version.
    pub fn new(
        adapter_hash: impl Into<String>,
        seed: u64,
        split: CalibrationSplit,
        mean: ModeCalibration,
        mc: Option<ModeCalibration>,
    ) -> Self {
        CalibrationFile {
            format_version: CALIBRATION_FORMAT_VERSION,
            pvera_version: env!("CARGO_PKG_VERSION").to_string(),
            adapter_hash: adapter_hash.into(),
            n: split.rows.len(),
            seed,
            split,
            mean,
            mc,
        }
    }

    /// Refuses a file fitted for another adapter with [`Error::StaleCalibration`]: `hash` is the
    /// current adapter's, `path` the file (for the message).
    pub fn check_adapter_hash(&self, hash: &str, path: &Path) -> Result<()> {
        if self.adapter_hash != hash {
            return Err(Error::StaleCalibration {
                path: path.to_path_buf(),
                file_hash: self.adapter_hash.clone(),
                adapter_hash: hash.to_string(),
            });
        }
        Ok(())
    }

    /// The calibration of Monte Carlo mode if `mc`, else of mean mode.
    pub fn mode(&self, mc: bool) -> Option<&ModeCalibration> {
        if mc {
            self.mc.as_ref()
        } else {
            Some(&self.mean)
        }
    }

    /// Checks the values a reader relies on: the format version, positive finite temperatures,
    /// finite thresholds with `α` in (0, 1), `n` matching the split.
    pub fn validate(&self) -> Result<()> {
        if self.format_version > CALIBRATION_FORMAT_VERSION {
            return Err(Error::config(
                "format_version",
                format!(
                    "{CALIBRATION_FILE} has format {} but this pvera reads up to {CALIBRATION_FORMAT_VERSION}; \
                     upgrade pvera or re-run `pvera calibrate` with this version",
                    self.format_version
                ),
            ));
        }
        if self.n != self.split.rows.len() {
            return Err(Error::config(
                "n",
                format!("n = {} but the split lists {} rows", self.n, self.split.rows.len()),
            ));
        }
        if !self.split.test_rows.is_empty() {
            let cal: std::collections::HashSet<usize> = self.split.rows.iter().copied().collect();
            if let Some(r) = self.split.test_rows.iter().find(|r| cal.contains(r)) {
                return Err(Error::config(
                    "split.test_rows",
                    format!("row {r} is both a calibration and a test row; re-run `pvera calibrate`"),
                ));
            }
        }
        for (name, m) in [("mean", Some(&self.mean)), ("mc", self.mc.as_ref())] {
            let Some(m) = m else { continue };
            let t = m.temperature.temperature;
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::config(
                    format!("{name}.temperature"),
                    format!("got {t}; a temperature must be finite and > 0. Re-run `pvera calibrate`"),
                ));
            }
            for f in m.conformal.iter().chain(&m.conformal_raw) {
                for th in &f.thresholds {
                    if !(th.alpha > 0.0 && th.alpha < 1.0 && th.quantile.is_finite()) {
                        return Err(Error::config(
                            format!("{name}.conformal.{}", f.score),
                            format!(
                                "alpha {} / quantile {}: need 0 < alpha < 1 and a finite quantile. Re-run `pvera \
                                 calibrate`",
                                th.alpha, th.quantile
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Pretty JSON (2-space indent) with a final newline.
    pub fn to_json(&self) -> Result<String> {
        let mut s = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Model(format!("cannot serialise {CALIBRATION_FILE}: {e}")))?;
        s.push('\n');
        Ok(s)
    }

    /// Parses and validates a file's contents; `path` names it in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let parse_error = |e: serde_json::Error| Error::ConfigParse {
            path: path.display().to_string(),
            reason: format!(
                "{e}; the file is damaged or was not written by `pvera calibrate`: re-run it, or turn calibration off \
                 (`--no-calibration`)"
            ),
        };
        let f: CalibrationFile =
            serde_json::from_value(parse_json_exact(text).map_err(parse_error)?).map_err(parse_error)?;
        f.validate().map_err(|e| match e {
            Error::InvalidConfig { field, reason } => {
                Error::InvalidConfig { field, reason: format!("{reason} (in {})", path.display()) }
            }
            other => other,
        })?;
        Ok(f)
    }

    /// Reads and validates `path`.
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, path)
    }

    /// Reads `dir/calibration.json` if it exists.
    pub fn read_beside(dir: &Path) -> Result<Option<Self>> {
        let p = dir.join(CALIBRATION_FILE);
        if !p.exists() {
            return Ok(None);
        }
        Self::read(&p).map(Some)
    }

    /// Writes atomically (temp file, fsync, rename).
    pub fn write(&self, path: &Path) -> Result<()> {
        self.validate()?;
        write_atomic(path, self.to_json()?.as_bytes())
    }
}
