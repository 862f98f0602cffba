//! Reader and writer for the JSON dialect of Python's `json` module, as PEFT uses it for
//! `adapter_config.json`: NaN / Infinity, integers beyond 64 bits, key order kept, and
//! `json.dumps(..., indent=2, sort_keys=True)` output byte for byte ([`write`] over entries the
//! caller sorted). [`crate::config`] builds [`PveraConfig`](crate::PveraConfig) on it.

use std::collections::HashMap;

/// Nesting limit of the reader (Python's own limit is its recursion limit, about 1000).
const MAX_JSON_DEPTH: usize = 512;

/// An integer as Python holds it: 128-bit, or the decimal text of a larger one.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PyInt {
    Small(i128),
    Big(String),
}

impl PyInt {
    pub(crate) fn text(&self) -> String {
        match self {
            PyInt::Small(i) => i.to_string(),
            PyInt::Big(s) => s.clone(),
        }
    }
}

/// A JSON value as Python's `json` module reads it (NaN/Infinity, unbounded integers, ordered dicts).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PyJson {
    Null,
    Bool(bool),
    Int(PyInt),
    Float(f64),
    Str(String),
    List(Vec<PyJson>),
    Dict(Vec<(String, PyJson)>),
}

impl PyJson {
    pub(crate) fn from_serde(v: &serde_json::Value) -> PyJson {
        use serde_json::Value;
        match v {
            Value::Null => PyJson::Null,
            Value::Bool(b) => PyJson::Bool(*b),
            Value::Number(n) => {
                if let Some(i) = n.as_i64() {
                    PyJson::Int(PyInt::Small(i as i128))
                } else if let Some(u) = n.as_u64() {
                    PyJson::Int(PyInt::Small(u as i128))
                } else {
                    PyJson::Float(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => PyJson::Str(s.clone()),
            Value::Array(a) => PyJson::List(a.iter().map(PyJson::from_serde).collect()),
            Value::Object(o) => PyJson::Dict(o.iter().map(|(k, v)| (k.clone(), PyJson::from_serde(v))).collect()),
        }
    }

    /// Converts to `serde_json`, warning (with `what`) where `serde_json` cannot hold the value.
    pub(crate) fn to_serde(&self, what: &str) -> serde_json::Value {
        use serde_json::{Number, Value};
        match self {
            PyJson::Null => Value::Null,
            PyJson::Bool(b) => Value::Bool(*b),
            PyJson::Int(PyInt::Small(i)) => {
                if let Ok(v) = i64::try_from(*i) {
                    Value::Number(v.into())
                } else if let Ok(v) = u64::try_from(*i) {
                    Value::Number(v.into())
                } else {
                    tracing::warn!("{what}: integer {i} does not fit in 64 bits and is kept as a float");
                    Number::from_f64(*i as f64).map_or(Value::Null, Value::Number)
                }
            }
            PyJson::Int(PyInt::Big(s)) => {
                tracing::warn!("{what}: integer {s} does not fit in 64 bits and is kept as a float");
                s.parse::<f64>().ok().and_then(Number::from_f64).map_or(Value::Null, Value::Number)
            }
            PyJson::Float(f) => match Number::from_f64(*f) {
                Some(n) => Value::Number(n),
                None => {
                    tracing::warn!("{what}: {} cannot be kept and becomes null", float_repr(*f));
                    Value::Null
                }
            },
            PyJson::Str(s) => Value::String(s.clone()),
            PyJson::List(items) => Value::Array(items.iter().map(|v| v.to_serde(what)).collect()),
            PyJson::Dict(entries) => {
                let mut m = serde_json::Map::new();
                for (k, v) in entries {
                    m.insert(k.clone(), v.to_serde(what));
                }
                Value::Object(m)
            }
        }
    }
}



/// Python's `repr(float)`: shortest round-trip digits, exponent form when the decimal exponent is
/// below -4 or at least 16, `NaN`/`Infinity` as `json.dumps` writes them.
pub(crate) fn float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0".into() } else { "0.0".into() };
    }
    // Rust's `{:e}` gives the shortest round-trip digits, e.g. "-1.2345e-5".
    let s = format!("{:e}", x);
    let (mant, exp) = s.split_once('e').unwrap_or((&s, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (neg, mant) = match mant.strip_prefix('-') {
        Some(m) => (true, m),
        None => (false, mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    let n = digits.len() as i32;
    let decpt = exp + 1; // value = 0.DIGITS * 10^decpt
    let mut out = String::new();
    if neg {
        out.push('-');
    }
    if decpt <= -4 || decpt > 16 {
        out.push_str(&digits[..1]);
        if n > 1 {
            out.push('.');
            out.push_str(&digits[1..]);
        }
        out.push('e');
        out.push(if exp < 0 { '-' } else { '+' });
        out.push_str(&format!("{:02}", exp.abs()));
    } else if decpt <= 0 {
        out.push_str("0.");
        for _ in 0..(-decpt) {
            out.push('0');
        }
        out.push_str(&digits);
    } else if decpt >= n {
        out.push_str(&digits);
        for _ in 0..(decpt - n) {
            out.push('0');
        }
        out.push_str(".0");
    } else {
        out.push_str(&digits[..decpt as usize]);
        out.push('.');
        out.push_str(&digits[decpt as usize..]);
    }
    out
}

/// `json.dumps(s, ensure_ascii=True)`.
pub(crate) fn write_str(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{:04x}", unit));
                }
            }
        }
    }
    out.push('"');
}

/// `json.dumps(value, indent=2, sort_keys=True)` at nesting `level`.
pub(crate) fn write(v: &PyJson, level: usize, out: &mut String) {
    match v {
        PyJson::Null => out.push_str("null"),
        PyJson::Bool(true) => out.push_str("true"),
        PyJson::Bool(false) => out.push_str("false"),
        PyJson::Int(i) => out.push_str(&i.text()),
        PyJson::Float(f) => out.push_str(&float_repr(*f)),
        PyJson::Str(s) => write_str(s, out),
        PyJson::List(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(level + 1, out);
                write(item, level + 1, out);
            }
            newline(level, out);
            out.push(']');
        }
        PyJson::Dict(entries) => {
            if entries.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut sorted: Vec<&(String, PyJson)> = entries.iter().collect();
            sorted.sort_by(|a, b| a.0.cmp(&b.0));
            out.push('{');
            for (i, (k, item)) in sorted.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(level + 1, out);
                write_str(k, out);
                out.push_str(": ");
                write(item, level + 1, out);
            }
            newline(level, out);
            out.push('}');
        }
    }
}

fn newline(level: usize, out: &mut String) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("  ");
    }
}

/// Parses like `json.loads`: NaN/Infinity/-Infinity, unbounded integers, duplicate keys (last value
/// wins, first position kept), strict strings. Errors say where (line, column) and what to fix.
pub(crate) fn parse(text: &str) -> Result<PyJson, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut p = Parser { s: &chars, i: 0 };
    if p.s.first() == Some(&'\u{feff}') {
        return Err("the file starts with a UTF-8 byte order mark, which Python's json (and so PEFT) \
                    rejects too; save it as UTF-8 without BOM"
            .into());
    }
    p.ws();
    let v = p.value(0)?;
    p.ws();
    if p.i < p.s.len() {
        return Err(p.err("extra data after the JSON value"));
    }
    Ok(v)
}

struct Parser<'a> {
    s: &'a [char],
    i: usize,
}

impl Parser<'_> {
    fn err(&self, what: &str) -> String {
        let upto = &self.s[..self.i.min(self.s.len())];
        let line = upto.iter().filter(|c| **c == '\n').count() + 1;
        let col = match upto.iter().rposition(|c| *c == '\n') {
            Some(p) => self.i - p,
            None => self.i + 1,
        };
        let truncated =
            if self.i >= self.s.len() { " (unexpected end of input: the file looks truncated)" } else { "" };
        format!("invalid JSON: {what} at line {line} column {col} (char {}){truncated}", self.i)
    }

    fn peek(&self) -> Option<char> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(' ' | '\t' | '\n' | '\r')) {
            self.i += 1;
        }
    }

    fn lit(&mut self, word: &str) -> bool {
        let w: Vec<char> = word.chars().collect();
        if self.s.len() >= self.i + w.len() && self.s[self.i..self.i + w.len()] == w[..] {
            self.i += w.len();
            true
        } else {
            false
        }
    }

    fn value(&mut self, depth: usize) -> Result<PyJson, String> {
        if depth > MAX_JSON_DEPTH {
            return Err(self.err(&format!("nesting deeper than {MAX_JSON_DEPTH} levels")));
        }
        match self.peek() {
            None => Err(self.err("expecting a value")),
            Some('"') => Ok(PyJson::Str(self.string()?)),
            Some('{') => self.object(depth),
            Some('[') => self.array(depth),
            Some('n') if self.lit("null") => Ok(PyJson::Null),
            Some('t') if self.lit("true") => Ok(PyJson::Bool(true)),
            Some('f') if self.lit("false") => Ok(PyJson::Bool(false)),
            Some('N') if self.lit("NaN") => Ok(PyJson::Float(f64::NAN)),
            Some('I') if self.lit("Infinity") => Ok(PyJson::Float(f64::INFINITY)),
            Some('-') if self.lit("-Infinity") => Ok(PyJson::Float(f64::NEG_INFINITY)),
            Some(c) if c == '-' || c.is_ascii_digit() => self.number(),
            Some(_) => Err(self.err("expecting a value")),
        }
    }

    fn number(&mut self) -> Result<PyJson, String> {
        let start = self.i;
        if self.peek() == Some('-') {
            self.i += 1;
        }
        match self.peek() {
            Some('0') => self.i += 1,
            Some(c) if c.is_ascii_digit() => {
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
            }
            _ => {
                self.i = start;
                return Err(self.err("expecting a value"));
            }
        }
        let int_end = self.i;
        let mut is_float = false;
        if self.peek() == Some('.') && self.s.get(self.i + 1).is_some_and(|c| c.is_ascii_digit()) {
            is_float = true;
            self.i += 1;
            while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                self.i += 1;
            }
        }
        if matches!(self.peek(), Some('e' | 'E')) {
            let save = self.i;
            self.i += 1;
            if matches!(self.peek(), Some('+' | '-')) {
                self.i += 1;
            }
            if self.peek().is_some_and(|c| c.is_ascii_digit()) {
                is_float = true;
                while self.peek().is_some_and(|c| c.is_ascii_digit()) {
                    self.i += 1;
                }
            } else {
                self.i = save;
            }
        }
        let text: String = self.s[start..self.i].iter().collect();
        if is_float {
            text.parse::<f64>().map(PyJson::Float).map_err(|_| self.err("invalid number"))
        } else {
            let int_text: String = self.s[start..int_end].iter().collect();
            Ok(PyJson::Int(match int_text.parse::<i128>() {
                Ok(i) => PyInt::Small(i),
                Err(_) => PyInt::Big(int_text),
            }))
        }
    }

    fn hex4(&mut self) -> Result<u32, String> {
        let mut v = 0u32;
        for _ in 0..4 {
            let d = self.peek().and_then(|c| c.to_digit(16)).ok_or_else(|| self.err("invalid \\uXXXX escape"))?;
            v = v * 16 + d;
            self.i += 1;
        }
        Ok(v)
    }

    fn string(&mut self) -> Result<String, String> {
        let start = self.i;
        self.i += 1; // opening quote
        let mut out = String::new();
        loop {
            let Some(c) = self.peek() else {
                self.i = start;
                let mut e = self.err("unterminated string starting");
                e.push_str(" (unexpected end of input: the file looks truncated)");
                return Err(e);
            };
            self.i += 1;
            match c {
                '"' => return Ok(out),
                '\\' => {
                    let Some(e) = self.peek() else {
                        return Err(self.err("unterminated string"));
                    };
                    self.i += 1;
                    match e {
                        '"' => out.push('"'),
                        '\\' => out.push('\\'),
                        '/' => out.push('/'),
                        'b' => out.push('\u{08}'),
                        'f' => out.push('\u{0c}'),
                        'n' => out.push('\n'),
                        'r' => out.push('\r'),
                        't' => out.push('\t'),
                        'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xd800..0xdc00).contains(&hi)
                                && self.s.get(self.i) == Some(&'\\')
                                && self.s.get(self.i + 1) == Some(&'u')
                            {
                                let save = self.i;
                                self.i += 2;
                                let lo = self.hex4()?;
                                if (0xdc00..0xe000).contains(&lo) {
                                    0x10000 + ((hi - 0xd800) << 10) + (lo - 0xdc00)
                                } else {
                                    self.i = save;
                                    hi
                                }
                            } else {
                                hi
                            };
                            match char::from_u32(cp) {
                                Some(ch) => out.push(ch),
                                None => {
                                    return Err(self.err(&format!(
                                        "lone surrogate \\u{cp:04x} (Python keeps it, but it is not valid \
                                         Unicode text and cannot be used here)"
                                    )))
                                }
                            }
                        }
                        _ => {
                            self.i -= 1;
                            return Err(self.err("invalid \\escape"));
                        }
                    }
                }
                c if (c as u32) < 0x20 => {
                    self.i -= 1;
                    return Err(self.err("invalid control character in a string (escape it)"));
                }
                c => out.push(c),
            }
        }
    }

    fn array(&mut self, depth: usize) -> Result<PyJson, String> {
        self.i += 1;
        let mut items = Vec::new();
        self.ws();
        if self.peek() == Some(']') {
            self.i += 1;
            return Ok(PyJson::List(items));
        }
        loop {
            self.ws();
            items.push(self.value(depth + 1)?);
            self.ws();
            match self.peek() {
                Some(',') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some(']') {
                        return Err(self.err("expecting a value (trailing comma in a list)"));
                    }
                }
                Some(']') => {
                    self.i += 1;
                    return Ok(PyJson::List(items));
                }
                _ => return Err(self.err("expecting ',' delimiter or ']'")),
            }
        }
    }

    fn object(&mut self, depth: usize) -> Result<PyJson, String> {
        self.i += 1;
        let mut entries: Vec<(String, PyJson)> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        self.ws();
        if self.peek() == Some('}') {
            self.i += 1;
            return Ok(PyJson::Dict(entries));
        }
        loop {
            self.ws();
            if self.peek() != Some('"') {
                return Err(self.err("expecting a property name enclosed in double quotes"));
            }
            let key = self.string()?;
            self.ws();
            if self.peek() != Some(':') {
                return Err(self.err("expecting ':' delimiter"));
            }
            self.i += 1;
            self.ws();
            let v = self.value(depth + 1)?;
            match index.get(&key) {
                Some(&slot) => entries[slot].1 = v,
                None => {
                    index.insert(key.clone(), entries.len());
                    entries.push((key, v));
                }
            }
            self.ws();
            match self.peek() {
                Some(',') => {
                    self.i += 1;
                    self.ws();
                    if self.peek() == Some('}') {
                        return Err(self.err("trailing comma before '}' (JSON does not allow it)"));
                    }
                }
                Some('}') => {
                    self.i += 1;
                    return Ok(PyJson::Dict(entries));
                }
                _ => return Err(self.err("expecting ',' delimiter or '}'")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_float_repr() {
        let cases: [(f64, &str); 22] = [
            (0.1, "0.1"),
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (2.5, "2.5"),
            (1e-5, "1e-05"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (0.00012345, "0.00012345"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345e16, "1.2345e+16"),
            (123456789.125, "123456789.125"),
            (1.0 / 3.0, "0.3333333333333333"),
            (5e-324, "5e-324"),
            (f64::MAX, "1.7976931348623157e+308"),
            (1e22, "1e+22"),
            (-2.5e-7, "-2.5e-07"),
            (f64::NAN, "NaN"),
            (f64::INFINITY, "Infinity"),
            (f64::NEG_INFINITY, "-Infinity"),
        ];
        for (x, want) in cases {
            assert_eq!(float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn string_escaping_is_ensure_ascii() {
        let mut out = String::new();
        write_str("a\"b\\c\n\r\t\u{8}\u{c}\u{1}\u{1f}\u{7f}é\u{1f600} ~", &mut out);
        assert_eq!(out, r#""a\"b\\c\n\r\t\b\f\u0001\u001f\u007f\u00e9\ud83d\ude00 ~""#);
    }
}
