//! Helpers shared by the CLI test binaries (`mod common;` in each).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}
pub fn fixtures() -> PathBuf {
    root().join("crates/pvera/tests/fixtures")
}
pub fn pvera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pvera")).args(args).output().expect("run pvera")
}
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
pub fn show(o: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

pub fn spam_jsonl(dir: &Path) -> PathBuf {
    let p = dir.join("mails.jsonl");
    let rows = [
        ("win free money now", "spam"),
        ("meeting tomorrow at noon", "ham"),
        ("click here for a free prize", "spam"),
        ("see the attached report", "ham"),
        ("free money click now", "spam"),
        ("lunch with the team tomorrow", "ham"),
        ("cheap prize win win", "spam"),
        ("notes from the meeting", "ham"),
    ];
    let text: String =
        rows.iter().map(|(t, l)| serde_json::json!({"text": t, "label": l}).to_string() + "\n").collect();
    std::fs::write(&p, text).unwrap();
    p
}

/// A scratch directory with the spam set, plus the tiny BERT fixture and its tokenizer.
pub struct TinyBert {
    pub tmp: tempfile::TempDir,
    pub data: PathBuf,
    pub out: PathBuf,
    pub model: PathBuf,
    pub tok: PathBuf,
}

pub fn tiny_bert() -> TinyBert {
    let tmp = tempfile::tempdir().unwrap();
    let data = spam_jsonl(tmp.path());
    let out = tmp.path().join("out");
    TinyBert {
        tmp,
        data,
        out,
        model: fixtures().join("models/bert_tiny/model"),
        tok: fixtures().join("data/tokenizer.json"),
    }
}

/// `pvera train`: a text classifier (r 8 on query,value) on the tiny BERT and the spam set, into
/// `t.out`; `extra` adds the run's own flags.
pub fn train_tiny_bert(t: &TinyBert, extra: &[&str]) -> Output {
    let mut args = vec![
        "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&t.data), "--task",
        "text-classification", "--output", s(&t.out), "--r", "8", "--target-modules", "query,value",
    ];
    args.extend_from_slice(extra);
    pvera(&args)
}
