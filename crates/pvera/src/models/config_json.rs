//! Typed reads of a model's `config.json` (transformers' `PretrainedConfig` fields), the one way
//! every model family reads its settings. An absent key and `null` both mean "not given" (the
//! default, where there is one); a value of the wrong type or range is an
//! [`Error::ConfigParse`] naming the file, the key, what was found and what is expected.

use std::path::Path;

use serde_json::Value;

use super::common::Activation;
use crate::error::{Error, Result};

/// A parsed `config.json` and the directory it came from (for messages).
#[derive(Clone, Copy, Debug)]
pub struct ConfigJson<'a> {
    value: &'a Value,
    dir: &'a Path,
}

impl<'a> ConfigJson<'a> {
    /// The config `value` read from `dir/config.json`.
    pub fn new(value: &'a Value, dir: &'a Path) -> Self {
        Self { value, dir }
    }

    /// The whole parsed file.
    pub fn value(&self) -> &'a Value {
        self.value
    }

    /// An [`Error::ConfigParse`] about this file.
    pub fn error(&self, reason: impl Into<String>) -> Error {
        Error::ConfigParse { path: self.dir.join("config.json").display().to_string(), reason: reason.into() }
    }

    /// The value of `key`; `None` when it is absent or `null`.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.value.get(key).filter(|v| !v.is_null())
    }

    /// A required positive integer, under the first of `keys` that is given (aliases such as
    /// GPT-2's `n_embd` / `hidden_size`).
    pub fn positive(&self, keys: &[&str]) -> Result<usize> {
        for k in keys {
            if let Some(v) = self.opt_positive(k)? {
                return Ok(v);
            }
        }
        Err(self.error(format!(
            "missing \"{}\" (a positive integer; transformers' save_pretrained always writes it, so the file may be \
             truncated or belong to another model type)",
            keys.join("\" or \"")
        )))
    }

    /// An optional positive integer.
    pub fn opt_positive(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64().filter(|n| *n > 0) {
                Some(n) => Ok(Some(n as usize)),
                None => Err(self.error(format!("\"{key}\" must be a positive integer, found {v}"))),
            },
        }
    }

    /// A positive integer with a default.
    pub fn positive_or(&self, key: &str, default: usize) -> Result<usize> {
        Ok(self.opt_positive(key)?.unwrap_or(default))
    }

    /// An optional non-negative integer (a count or an id that may be 0).
    pub fn opt_count(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) => Ok(Some(n as usize)),
                None => Err(self.error(format!("\"{key}\" must be a non-negative integer, found {v}"))),
            },
        }
    }

    /// A boolean with a default.
    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(v) => Err(self.error(format!("\"{key}\" must be true or false, found {v}"))),
        }
    }

    /// A finite number with a default.
    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .filter(|x| x.is_finite())
                .ok_or_else(|| self.error(format!("\"{key}\" must be a number, found {v}"))),
        }
    }

    /// A positive number with a default.
    pub fn positive_f64_or(&self, key: &str, default: f64) -> Result<f64> {
        let x = self.f64_or(key, default)?;
        if x > 0.0 {
            Ok(x)
        } else {
            Err(self.error(format!("\"{key}\" must be a positive number, found {x}")))
        }
    }

    /// A string with a default.
    pub fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.error(format!("\"{key}\" must be a string, found {v}"))),
        }
    }

    /// A positive integer or a `[height, width]` pair of them (`image_size`, `patch_size`).
    pub fn pair(&self, key: &str) -> Result<(usize, usize)> {
        let bad = |v: &Value| self.error(format!("\"{key}\" must be a positive integer or a [height, width] pair of them, found {v}"));
        let positive = |v: &Value| v.as_u64().filter(|n| *n > 0).map(|n| n as usize);
        match self.get(key) {
            None => Err(self.error(format!("missing \"{key}\" (a positive integer or a [height, width] pair)"))),
            Some(Value::Array(a)) if a.len() == 2 => match (positive(&a[0]), positive(&a[1])) {
                (Some(h), Some(w)) => Ok((h, w)),
                _ => Err(bad(&Value::Array(a.clone()))),
            },
            Some(v) => positive(v).map(|n| (n, n)).ok_or_else(|| bad(v)),
        }
    }

    /// An activation function name (`hidden_act`) with a default.
    pub fn activation(&self, key: &str, default: &str) -> Result<Activation> {
        let name = self.str_or(key, default)?;
        Activation::from_name(name).ok_or_else(|| {
            self.error(format!(
                "\"{key}\": unsupported activation {name:?}; supported: gelu, gelu_new, gelu_pytorch_tanh, gelu_fast, \
                 relu, silu, swish"
            ))
        })
    }

    /// The class names in `architectures` (empty when absent).
    pub fn architectures(&self) -> Vec<&'a str> {
        self.get("architectures").and_then(Value::as_array).map_or_else(Vec::new, |a| a.iter().filter_map(Value::as_str).collect())
    }

    /// True when `architectures` is absent or empty, or names one of `classes`.
    pub fn architectures_allow(&self, classes: &[&str]) -> bool {
        let names = self.architectures();
        names.is_empty() || names.iter().any(|n| classes.contains(n))
    }

    /// True when `architectures` names one of `classes`.
    pub fn architectures_name(&self, classes: &[&str]) -> bool {
        self.architectures().iter().any(|n| classes.contains(n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_name_the_file_the_key_and_what_was_found() {
        let v = serde_json::json!({
            "n": 3, "zero": 0, "neg": -1, "s": "x", "b": true, "f": 0.5, "nul": null, "pair": [2, 3], "bad_pair": [2, 0],
            "architectures": ["LlamaForCausalLM"]
        });
        let c = ConfigJson::new(&v, Path::new("/m"));
        assert_eq!(c.positive(&["missing", "n"]).unwrap(), 3);
        assert_eq!(c.positive_or("nul", 7).unwrap(), 7);
        assert_eq!(c.opt_count("zero").unwrap(), Some(0));
        assert_eq!(c.pair("n").unwrap(), (3, 3));
        assert_eq!(c.pair("pair").unwrap(), (2, 3));
        assert!(c.bool_or("b", false).unwrap());
        assert_eq!(c.f64_or("f", 1.0).unwrap(), 0.5);
        assert_eq!(c.str_or("s", "d").unwrap(), "x");
        assert!(c.architectures_allow(&["LlamaForCausalLM"]) && c.architectures_name(&["LlamaForCausalLM"]));
        assert!(!c.architectures_allow(&["GPT2LMHeadModel"]));
        for (e, needle) in [
            (c.positive(&["zero"]).unwrap_err(), "\"zero\" must be a positive integer, found 0"),
            (c.positive(&["a", "b2"]).unwrap_err(), "missing \"a\" or \"b2\""),
            (c.opt_count("neg").unwrap_err(), "\"neg\" must be a non-negative integer, found -1"),
            (c.bool_or("s", false).unwrap_err(), "\"s\" must be true or false, found \"x\""),
            (c.f64_or("s", 1.0).unwrap_err(), "\"s\" must be a number"),
            (c.positive_f64_or("neg", 1.0).unwrap_err(), "\"neg\" must be a positive number"),
            (c.pair("bad_pair").unwrap_err(), "\"bad_pair\" must be a positive integer or a [height, width] pair"),
            (c.activation("s", "gelu").unwrap_err(), "unsupported activation \"x\""),
        ] {
            let msg = e.to_string();
            assert!(msg.contains("/m/config.json") && msg.contains(needle), "{msg}");
        }
    }
}
