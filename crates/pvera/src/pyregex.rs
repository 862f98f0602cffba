//! Python's `re` syntax on the `regex` crate, for the patterns PEFT builds from config values.
//!
//! PEFT feeds several config values to Python's `re`: a string `target_modules` (with `re.fullmatch`),
//! every `modules_to_save` entry and every `layers_pattern` entry (both pasted **unescaped** into a
//! larger pattern). [`translate_python_regex`] converts Python syntax to the `regex` crate's syntax,
//! keeping Python's meaning (`\d` is Python's set of decimal digits, `\Z` is end of text, a `{` that
//! does not start a valid repetition is a literal, `[` inside a class is a literal, ...). Constructs the
//! `regex` crate cannot run (look-around, back-references, possessive quantifiers, atomic groups,
//! conditionals, the `a`/`L`/`x` flags) give [`Error::InvalidConfig`] naming the pattern and the
//! reason. Patterns Python rejects are rejected too. Known remaining differences, none of which can
//! occur in real module names: Python's `$` also matches before a final `"\n"`; `\s`, `\w` and `\b`
//! follow the `regex` crate's Unicode tables.
//!
//! [`crate::config`] compiles these patterns to validate a config; [`crate::targets`] matches
//! module names with them. Nothing here panics, whatever the input.

use std::sync::LazyLock;

use regex::{Regex, RegexBuilder};

use crate::error::{Error, Result};

/// First code point of every run of ten decimal digits (Unicode category Nd) known to Python 3.11
/// (Unicode 14.0), which is what `\d` matches in Python's `re` and what `int()` accepts.
const PY_DIGIT_ZEROS: [u32; 66] = [
    0x30, 0x660, 0x6f0, 0x7c0, 0x966, 0x9e6, 0xa66, 0xae6, 0xb66, 0xbe6, 0xc66, 0xce6, 0xd66, 0xde6, 0xe50, 0xed0,
    0xf20, 0x1040, 0x1090, 0x17e0, 0x1810, 0x1946, 0x19d0, 0x1a80, 0x1a90, 0x1b50, 0x1bb0, 0x1c40, 0x1c50, 0xa620,
    0xa8d0, 0xa900, 0xa9d0, 0xa9f0, 0xaa50, 0xabf0, 0xff10, 0x104a0, 0x10d30, 0x11066, 0x110f0, 0x11136, 0x111d0,
    0x112f0, 0x11450, 0x114d0, 0x11650, 0x116c0, 0x11730, 0x118e0, 0x11950, 0x11c50, 0x11d50, 0x11da0, 0x16a60,
    0x16ac0, 0x16b50, 0x1d7ce, 0x1d7d8, 0x1d7e2, 0x1d7ec, 0x1d7f6, 0x1e140, 0x1e2f0, 0x1e950, 0x1fbf0,
];

/// The value of a decimal digit as Python's `int()` reads it.
pub(crate) fn py_digit_value(c: char) -> Option<u32> {
    let cp = c as u32;
    PY_DIGIT_ZEROS.iter().find(|z| cp >= **z && cp < **z + 10).map(|z| cp - z)
}

/// The items of a `regex` class equal to Python's `\d`.
static DIGIT_ITEMS: LazyLock<String> =
    LazyLock::new(|| PY_DIGIT_ZEROS.iter().map(|z| format!("\\x{{{:X}}}-\\x{{{:X}}}", z, z + 9)).collect());

#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev {
    /// Start of the pattern (or only global flags so far).
    Start,
    /// After `(` or `|`.
    Open,
    /// After `^`, `$`, `\A`, `\Z`, `\b`, `\B` (Python cannot repeat these).
    Assert,
    /// After something repeatable.
    Atom,
    /// After a quantifier.
    Quant,
}

enum ClassItem {
    Lit(u32),
    Set(String),
}

fn lit_cp(cp: u32) -> std::result::Result<String, String> {
    match char::from_u32(cp) {
        Some(_) => Ok(format!("\\x{{{cp:X}}}")),
        None => Err(format!("code point U+{cp:04X} is a surrogate, which the Rust regex engine cannot match")),
    }
}

/// `\xhh`, `\uhhhh` or `\Uhhhhhhhh` (by `letter`) at `s[i]`: the code point and the index after it.
fn hex_escape(s: &[char], i: usize, letter: char) -> std::result::Result<(u32, usize), String> {
    let len = match letter {
        'x' => 2,
        'u' => 4,
        _ => 8,
    };
    let mut v: u32 = 0;
    for k in 0..len {
        match s.get(i + 2 + k).and_then(|c| c.to_digit(16)) {
            Some(d) => v = v * 16 + d,
            None => return Err(format!("incomplete escape \\{letter}")),
        }
    }
    if v > 0x10ffff {
        return Err(format!("bad escape \\{letter}"));
    }
    Ok((v, i + 2 + len))
}

fn is_oct(c: Option<&char>) -> bool {
    matches!(c, Some('0'..='7'))
}

/// An escape outside a class, starting at `s[i] == '\\'`.
fn escape_outside(s: &[char], i: usize) -> std::result::Result<(String, Prev, usize), String> {
    let Some(&c) = s.get(i + 1) else {
        return Err("bad escape (end of pattern)".into());
    };
    let simple = |cp: u32| lit_cp(cp).map(|t| (t, Prev::Atom, i + 2));
    match c {
        'A' => Ok(("\\A".into(), Prev::Assert, i + 2)),
        'Z' => Ok(("\\z".into(), Prev::Assert, i + 2)),
        'b' => Ok(("\\b".into(), Prev::Assert, i + 2)),
        'B' => Ok(("\\B".into(), Prev::Assert, i + 2)),
        'd' => Ok((format!("[{}]", *DIGIT_ITEMS), Prev::Atom, i + 2)),
        'D' => Ok((format!("[^{}]", *DIGIT_ITEMS), Prev::Atom, i + 2)),
        's' | 'S' | 'w' | 'W' => Ok((format!("\\{c}"), Prev::Atom, i + 2)),
        'a' => simple(0x07),
        'f' => simple(0x0c),
        'n' => simple(0x0a),
        'r' => simple(0x0d),
        't' => simple(0x09),
        'v' => simple(0x0b),
        'x' | 'u' | 'U' => {
            let (v, next) = hex_escape(s, i, c)?;
            Ok((lit_cp(v)?, Prev::Atom, next))
        }
        'N' => Err("named character escapes (\\N{...}) are not supported".into()),
        '0' => {
            let mut v = 0u32;
            let mut j = i + 2;
            while j < i + 4 && is_oct(s.get(j)) {
                v = v * 8 + s[j].to_digit(8).unwrap_or(0);
                j += 1;
            }
            Ok((lit_cp(v)?, Prev::Atom, j))
        }
        '1'..='9' => {
            if is_oct(Some(&c)) && is_oct(s.get(i + 2)) && is_oct(s.get(i + 3)) {
                let v = (c.to_digit(8).unwrap_or(0) * 64)
                    + s[i + 2].to_digit(8).unwrap_or(0) * 8
                    + s[i + 3].to_digit(8).unwrap_or(0);
                if v > 0o377 {
                    return Err(format!("octal escape value \\{c}{}{} outside of range 0-0o377", s[i + 2], s[i + 3]));
                }
                return Ok((lit_cp(v)?, Prev::Atom, i + 4));
            }
            Err("back-references (\\1, ...) are not supported by the Rust regex engine".into())
        }
        c if c.is_ascii_alphabetic() => Err(format!("bad escape \\{c}")),
        c => Ok((regex::escape(&c.to_string()), Prev::Atom, i + 2)),
    }
}

/// An escape inside a class, starting at `s[i] == '\\'`.
fn escape_in_class(s: &[char], i: usize) -> std::result::Result<(ClassItem, usize), String> {
    let Some(&c) = s.get(i + 1) else {
        return Err("unterminated character set".into());
    };
    let lit = |cp: u32| Ok((ClassItem::Lit(cp), i + 2));
    match c {
        'a' => lit(0x07),
        'b' => lit(0x08),
        'f' => lit(0x0c),
        'n' => lit(0x0a),
        'r' => lit(0x0d),
        't' => lit(0x09),
        'v' => lit(0x0b),
        'd' => Ok((ClassItem::Set(DIGIT_ITEMS.clone()), i + 2)),
        'D' => Ok((ClassItem::Set(format!("[^{}]", *DIGIT_ITEMS)), i + 2)),
        's' | 'S' | 'w' | 'W' => Ok((ClassItem::Set(format!("\\{c}")), i + 2)),
        'x' | 'u' | 'U' => {
            let (v, next) = hex_escape(s, i, c)?;
            Ok((ClassItem::Lit(v), next))
        }
        'N' => Err("named character escapes (\\N{...}) are not supported".into()),
        '0'..='7' => {
            let mut v = c.to_digit(8).unwrap_or(0);
            let mut j = i + 2;
            while j < i + 4 && is_oct(s.get(j)) {
                v = v * 8 + s[j].to_digit(8).unwrap_or(0);
                j += 1;
            }
            if v > 0o377 {
                return Err("octal escape value outside of range 0-0o377".into());
            }
            Ok((ClassItem::Lit(v), j))
        }
        '8' | '9' => Err(format!("bad escape \\{c}")),
        c if c.is_ascii_alphabetic() => Err(format!("bad escape \\{c}")),
        c => lit(c as u32),
    }
}

fn push_class_item(out: &mut String, item: &ClassItem) -> std::result::Result<(), String> {
    match item {
        ClassItem::Lit(cp) => out.push_str(&lit_cp(*cp)?),
        ClassItem::Set(s) => out.push_str(s),
    }
    Ok(())
}

/// A class starting at `s[start] == '['`.
fn class(s: &[char], start: usize) -> std::result::Result<(String, usize), String> {
    let mut i = start + 1;
    let mut out = String::from("[");
    if s.get(i) == Some(&'^') {
        out.push('^');
        i += 1;
    }
    let mut items = 0usize;
    loop {
        let Some(&c) = s.get(i) else {
            return Err("unterminated character set".into());
        };
        if c == ']' && items > 0 {
            i += 1;
            break;
        }
        let (code1, next) = if c == '\\' { escape_in_class(s, i)? } else { (ClassItem::Lit(c as u32), i + 1) };
        i = next;
        if s.get(i) == Some(&'-') {
            i += 1;
            let Some(&that) = s.get(i) else {
                return Err("unterminated character set".into());
            };
            if that == ']' {
                push_class_item(&mut out, &code1)?;
                out.push_str("\\-");
                i += 1;
                break;
            }
            let (code2, next) =
                if that == '\\' { escape_in_class(s, i)? } else { (ClassItem::Lit(that as u32), i + 1) };
            i = next;
            match (code1, code2) {
                (ClassItem::Lit(lo), ClassItem::Lit(hi)) if lo <= hi => {
                    out.push_str(&lit_cp(lo)?);
                    out.push('-');
                    out.push_str(&lit_cp(hi)?);
                }
                _ => return Err("bad character range".into()),
            }
        } else {
            push_class_item(&mut out, &code1)?;
        }
        items += 1;
    }
    out.push(']');
    Ok((out, i))
}

/// A `{m,n}` repetition at `s[i] == '{'`, or `None` when Python reads the `{` as a literal.
fn brace_quantifier(s: &[char], i: usize) -> std::result::Result<Option<(String, usize)>, String> {
    let mut j = i + 1;
    if s.get(j) == Some(&'}') {
        return Ok(None);
    }
    let digits = |j: &mut usize| {
        let st = *j;
        while s.get(*j).is_some_and(|c| c.is_ascii_digit()) {
            *j += 1;
        }
        s[st..*j].iter().collect::<String>()
    };
    let lo = digits(&mut j);
    let hi = if s.get(j) == Some(&',') {
        j += 1;
        digits(&mut j)
    } else {
        lo.clone()
    };
    if s.get(j) != Some(&'}') {
        return Ok(None);
    }
    j += 1;
    const MAXREPEAT: u64 = u32::MAX as u64;
    let parse = |t: &str| -> std::result::Result<u64, String> {
        match t.parse::<u64>() {
            Ok(v) if v < MAXREPEAT => Ok(v),
            _ => Err("the repetition number is too large".into()),
        }
    };
    let min = if lo.is_empty() { 0 } else { parse(&lo)? };
    let max = if hi.is_empty() { None } else { Some(parse(&hi)?) };
    if let Some(m) = max {
        if m < min {
            return Err("min repeat greater than max repeat".into());
        }
    }
    let q = match max {
        None => format!("{{{min},}}"),
        Some(m) => format!("{{{min},{m}}}"),
    };
    Ok(Some((q, j)))
}

fn apply_quantifier(
    out: &mut String,
    prev: &mut Prev,
    q: &str,
    s: &[char],
    next: usize,
) -> std::result::Result<usize, String> {
    match *prev {
        Prev::Start | Prev::Open | Prev::Assert => Err("nothing to repeat".into()),
        Prev::Quant => Err("multiple repeat".into()),
        Prev::Atom => {
            out.push_str(q);
            *prev = Prev::Quant;
            match s.get(next) {
                Some('?') => {
                    out.push('?');
                    Ok(next + 1)
                }
                Some('+') => Err("possessive quantifiers (`*+`, `++`, `?+`, `{m,n}+`) are not supported by the \
                                  Rust regex engine"
                    .into()),
                _ => Ok(next),
            }
        }
    }
}

/// `(?flags)` or `(?flags:` at `s[i] == '('`, `s[i+1] == '?'`. Returns (emitted text, is_global, next).
fn flag_group(s: &[char], i: usize) -> std::result::Result<(String, bool, usize), String> {
    let mut j = i + 2;
    let mut on = String::new();
    let mut off = String::new();
    while let Some(&c) = s.get(j) {
        if !"aiLmsux".contains(c) {
            break;
        }
        on.push(c);
        j += 1;
    }
    let mut has_minus = false;
    if s.get(j) == Some(&'-') {
        has_minus = true;
        j += 1;
        while let Some(&c) = s.get(j) {
            if !"imsx".contains(c) {
                break;
            }
            off.push(c);
            j += 1;
        }
        if off.is_empty() {
            return Err("missing flag".into());
        }
    }
    let global = match s.get(j) {
        Some(')') => true,
        Some(':') => false,
        None => return Err("missing -, : or )".into()),
        Some(c) => return Err(format!("unknown flag {c:?}")),
    };
    if global && has_minus {
        return Err("missing :".into());
    }
    if on.is_empty() && off.is_empty() {
        return Err("missing flag".into());
    }
    for f in on.chars().chain(off.chars()) {
        match f {
            'a' | 'L' => return Err(format!("the `{f}` flag (ASCII/locale matching) is not supported")),
            'x' => return Err("the `x` (verbose) flag is not supported".into()),
            _ => {}
        }
    }
    let on: String = on.chars().filter(|c| *c != 'u').collect();
    let text = if global {
        if on.is_empty() {
            String::new()
        } else {
            format!("(?{on})")
        }
    } else if off.is_empty() {
        if on.is_empty() {
            "(?:".to_string()
        } else {
            format!("(?{on}:")
        }
    } else {
        format!("(?{on}-{off}:")
    };
    Ok((text, global, j + 1))
}

/// Translates a Python `re` pattern into the `regex` crate's syntax with the same meaning (see the
/// module docs for what is supported). The result is not anchored; the error is a human-readable reason.
pub fn translate_python_regex(pattern: &str) -> std::result::Result<String, String> {
    let s: Vec<char> = pattern.chars().collect();
    let mut out = String::with_capacity(pattern.len() + 8);
    let mut i = 0usize;
    let mut depth = 0usize;
    let mut prev = Prev::Start;
    let mut only_flags = true;
    while i < s.len() {
        let c = s[i];
        let mut keeps_start = false;
        match c {
            '\\' => {
                let (t, kind, next) = escape_outside(&s, i)?;
                out.push_str(&t);
                prev = kind;
                i = next;
            }
            '[' => {
                let (t, next) = class(&s, i)?;
                out.push_str(&t);
                prev = Prev::Atom;
                i = next;
            }
            '(' => {
                if s.get(i + 1) != Some(&'?') {
                    out.push('(');
                    depth += 1;
                    prev = Prev::Open;
                    i += 1;
                } else {
                    match s.get(i + 2) {
                        Some(':') => {
                            out.push_str("(?:");
                            depth += 1;
                            prev = Prev::Open;
                            i += 3;
                        }
                        Some('P') => match s.get(i + 3) {
                            Some('<') => {
                                let start = i + 4;
                                let end = (start..s.len())
                                    .find(|k| s[*k] == '>')
                                    .ok_or_else(|| "missing >, unterminated name".to_string())?;
                                let name: String = s[start..end].iter().collect();
                                let mut chars = name.chars();
                                let ok = chars.next().is_some_and(|f| f == '_' || f.is_alphabetic())
                                    && chars.all(|ch| ch == '_' || ch.is_alphanumeric());
                                if !ok {
                                    return Err(format!("bad character in group name {name:?}"));
                                }
                                out.push_str(&format!("(?P<{name}>"));
                                depth += 1;
                                prev = Prev::Open;
                                i = end + 1;
                            }
                            Some('=') => {
                                return Err("named back-references ((?P=name)) are not supported by the Rust \
                                            regex engine"
                                    .into())
                            }
                            _ => return Err("unknown extension ?P".into()),
                        },
                        Some('#') => {
                            let end = (i + 3..s.len())
                                .find(|k| s[*k] == ')')
                                .ok_or_else(|| "missing ), unterminated comment".to_string())?;
                            i = end + 1;
                            keeps_start = only_flags;
                        }
                        Some('=') | Some('!') => {
                            return Err("look-ahead assertions ((?=...), (?!...)) are not supported by the Rust \
                                        regex engine"
                                .into())
                        }
                        Some('<') => {
                            return Err(match s.get(i + 3) {
                                Some('=') | Some('!') => "look-behind assertions ((?<=...), (?<!...)) are not \
                                                          supported by the Rust regex engine"
                                    .into(),
                                _ => "unknown extension ?< (Python's re spells named groups (?P<name>...))".into(),
                            })
                        }
                        Some('>') => return Err("atomic groups ((?>...)) are not supported".into()),
                        Some('(') => return Err("conditional groups ((?(id)yes|no)) are not supported".into()),
                        Some(_) => {
                            let (t, global, next) = flag_group(&s, i)?;
                            if global {
                                if !only_flags {
                                    return Err("global flags not at the start of the expression".into());
                                }
                                keeps_start = true;
                            } else {
                                depth += 1;
                                prev = Prev::Open;
                            }
                            out.push_str(&t);
                            i = next;
                        }
                        None => return Err("unexpected end of pattern".into()),
                    }
                }
            }
            ')' => {
                if depth == 0 {
                    return Err("unbalanced parenthesis".into());
                }
                depth -= 1;
                out.push(')');
                prev = Prev::Atom;
                i += 1;
            }
            '|' => {
                out.push('|');
                prev = Prev::Open;
                i += 1;
            }
            '*' | '+' | '?' => {
                i = apply_quantifier(&mut out, &mut prev, &c.to_string(), &s, i + 1)?;
            }
            '{' => match brace_quantifier(&s, i)? {
                Some((q, next)) => i = apply_quantifier(&mut out, &mut prev, &q, &s, next)?,
                None => {
                    out.push_str("\\{");
                    prev = Prev::Atom;
                    i += 1;
                }
            },
            '^' | '$' => {
                out.push(c);
                prev = Prev::Assert;
                i += 1;
            }
            '.' => {
                out.push('.');
                prev = Prev::Atom;
                i += 1;
            }
            _ => {
                out.push_str(&regex::escape(&c.to_string()));
                prev = Prev::Atom;
                i += 1;
            }
        }
        if !keeps_start {
            only_flags = false;
        }
    }
    if depth > 0 {
        return Err("missing ), unterminated subpattern".into());
    }
    Ok(out)
}

#[derive(Clone, Copy)]
pub(crate) enum Anchor {
    /// `re.fullmatch`.
    Full,
    /// `re.match` (anchored at the start only).
    Prefix,
}

pub(crate) fn compile_py(pattern: &str, anchor: Anchor) -> std::result::Result<Regex, String> {
    let t = translate_python_regex(pattern)?;
    let wrapped = match anchor {
        Anchor::Full => format!("\\A(?:{t})\\z"),
        Anchor::Prefix => format!("\\A(?:{t})"),
    };
    RegexBuilder::new(&wrapped).build().map_err(|e| match e {
        regex::Error::Syntax(msg) => {
            msg.lines().find_map(|l| l.strip_prefix("error: ")).unwrap_or("invalid regular expression").to_string()
        }
        regex::Error::CompiledTooBig(limit) => {
            format!("the compiled regex exceeds the size limit of {limit} bytes")
        }
        other => other.to_string(),
    })
}

/// Compiles a Python pattern for `re.fullmatch` (anchored at both ends). `field` names the config field
/// in the error.
pub fn compile_fullmatch(field: &str, pattern: &str) -> Result<Regex> {
    compile_py(pattern, Anchor::Full)
        .map_err(|reason| Error::config(field, format!("regex {pattern:?} cannot be used: {reason}")))
}

fn modules_to_save_pattern(m: &str) -> String {
    format!(r"(^|.*\.){m}($|\..*)")
}

fn layer_pattern(p: &str) -> String {
    format!(r"(?:^|.*?\.){p}\.(?P<idx>\d+)\.")
}

/// PEFT's `modules_to_save` exclusion regex for entry `m`, `(^|.*\.){m}($|\..*)` with `m` pasted in
/// unescaped, for `re.match`.
pub(crate) fn modules_to_save_regex(m: &str) -> Result<Regex> {
    compile_py(&modules_to_save_pattern(m), Anchor::Prefix).map_err(|reason| {
        Error::config(
            "modules_to_save",
            format!(
                "entry {m:?} is used by PEFT as a regex fragment in `(^|.*\\.){{m}}($|\\..*)` and cannot be \
                 used: {reason}"
            ),
        )
    })
}

/// PEFT's layer-index regex for a `layers_pattern` entry `p`, `(?:^|.*?\.){p}\.(?P<idx>\d+)\.` with `p`
/// pasted in unescaped, for `re.match`.
pub(crate) fn layers_pattern_regex(p: &str) -> Result<Regex> {
    compile_py(&layer_pattern(p), Anchor::Prefix).map_err(|reason| {
        Error::config(
            "layers_pattern",
            format!(
                "entry {p:?} is used by PEFT as a regex fragment in `(?:^|.*?\\.){{p}}\\.(?P<idx>\\d+)\\.` and \
                 cannot be used: {reason}"
            ),
        )
    })
}
