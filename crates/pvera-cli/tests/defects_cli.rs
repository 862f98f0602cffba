//! Issue 16 through the binary: nothing a user does destroys data or returns a silently wrong
//! answer. One test (or more) per row of the issue; each failed on the code before the fix.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

mod common;
use common::{fixtures, pvera, s, show, tiny_bert, train_tiny_bert, TinyBert};

fn code(o: &Output) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    // Killed by a signal: what a shell reports (128 + signal), e.g. 141 for SIGPIPE.
    o.status.code().unwrap_or_else(|| 128 + o.status.signal().unwrap_or(0))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A trained tiny text classifier (1 epoch, max length 6) in `t.out`.
fn trained(extra: &[&str]) -> TinyBert {
    let t = tiny_bert();
    let mut args = vec!["--epochs", "1", "--batch-size", "4", "--threads", "1", "--max-length", "6"];
    args.extend_from_slice(extra);
    let o = train_tiny_bert(&t, &args);
    assert!(o.status.success(), "{}", show(&o));
    t
}

fn predict_json(t: &TinyBert, adapter: &Path, extra: &[&str]) -> (Output, serde_json::Value) {
    let mut args = vec![
        "predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(adapter), "--samples", "3", "--json",
        "--threads", "1",
    ];
    args.extend_from_slice(extra);
    args.push("win free money now please click here for a prize today");
    let o = pvera(&args);
    let v = if o.status.success() { serde_json::from_slice(&o.stdout).unwrap() } else { serde_json::Value::Null };
    (o, v)
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
}

fn tree_digest(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut v: Vec<(PathBuf, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    v.sort();
    v
}

/// Row 3: every adapter folder `train` writes carries what predicting with it needs; shipped
/// alone it predicts exactly as inside its run; stripped of it, a warning names what was assumed.
#[test]
fn row3_adapter_folders_carry_their_task_metadata() {
    let t = trained(&[]);
    for d in ["best", "last"] {
        let meta: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(t.out.join(d).join("pvera_task.json")).unwrap()).unwrap();
        assert_eq!(meta["max_length"], 6, "{d}: {meta}");
        assert_eq!(meta["labels"], serde_json::json!(["ham", "spam"]));
        assert_eq!(meta["pooling"], "mean");
        assert!(t.out.join(d).join("labels.json").is_file());
    }
    let (o, in_run) = predict_json(&t, &t.out.join("best"), &[]);
    assert!(o.status.success(), "{}", show(&o));
    let shipped = t.tmp.path().join("shipped/adapter");
    copy_dir(&t.out.join("best"), &shipped);
    let (o, alone) = predict_json(&t, &shipped, &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(!stderr(&o).contains("warning"), "{}", show(&o));
    assert_eq!(in_run["predictions"], alone["predictions"]);
    // Without the metadata: a warning names the assumption (and the text is read at the
    // tokenizer's own length, so the answer may differ).
    std::fs::remove_file(shipped.join("pvera_task.json")).unwrap();
    let (o, _) = predict_json(&t, &shipped, &["--labels", "ham,spam"]);
    assert!(o.status.success(), "{}", show(&o));
    let err = stderr(&o);
    assert!(err.contains("maximum text length") && err.contains("--max-length"), "{err}");
    assert!(err.contains("pooling"), "{err}");
    assert_eq!(err.matches("maximum text length").count(), 1, "warnings printed once: {err}");
}

/// Row 4: `--modules-to-save X` adds to the classifier head instead of replacing it.
#[test]
fn row4_modules_to_save_adds_to_the_classifier_head() {
    let t = trained(&["--modules-to-save", "pooler.dense"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.out.join("best/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier", "pooler.dense"]), "{cfg}");
    let (o, v) = predict_json(&t, &t.out.join("best"), &[]);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(v["predictions"].as_array().unwrap().len(), 1);
}

/// Row 5: `eval --held-out-of` checks the data's identity, not only its size.
#[test]
fn row5_held_out_of_refuses_a_shuffled_copy_of_the_training_data() {
    let t = trained(&["--train-size", "5"]);
    let split: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(t.out.join("split.json")).unwrap()).unwrap();
    assert_eq!(split["data_sha256"].as_str().unwrap().len(), 64, "{split}");
    let text = std::fs::read_to_string(&t.data).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    lines.reverse();
    let shuffled = t.tmp.path().join("shuffled.jsonl");
    std::fs::write(&shuffled, lines.join("\n") + "\n").unwrap();
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&t.out.join("best")), "--data",
        s(&shuffled), "--held-out-of", s(&t.out), "--samples", "2", "--output", s(&t.tmp.path().join("ev")),
    ]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("contents differ"), "{}", show(&o));
    // The very file passes.
    let o = pvera(&[
        "eval", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&t.out.join("best")), "--data",
        s(&t.data), "--held-out-of", s(&t.out), "--samples", "2", "--output", s(&t.tmp.path().join("ev")),
    ]);
    assert!(o.status.success(), "{}", show(&o));
}

/// Row 6: `merge` never writes into its model or adapter folder, nor into a non-empty folder
/// without `--overwrite`; `train` does not overwrite an earlier run silently.
#[test]
fn row6_merge_and_train_never_overwrite_inputs_or_earlier_outputs() {
    let t = trained(&[]);
    let tmp = t.tmp.path();
    // A private copy of the model, so that a regression cannot touch the committed fixture.
    let model = tmp.join("model");
    copy_dir(&t.model, &model);
    let before = tree_digest(&model);
    let adapter = t.out.join("best");
    let adapter_before = tree_digest(&adapter);
    for (out, what) in [(&model, "--model"), (&adapter, "--adapter")] {
        let o = pvera(&["merge", "--model", s(&model), "--adapter", s(&adapter), "--output", s(out)]);
        assert_eq!(code(&o), 2, "{what}: {}", show(&o));
        assert!(stderr(&o).contains(what), "{}", show(&o));
        let o = pvera(&["merge", "--model", s(&model), "--adapter", s(&adapter), "--output", s(out), "--overwrite"]);
        assert_eq!(code(&o), 2, "--overwrite never allows writing into an input: {}", show(&o));
    }
    assert_eq!(tree_digest(&model), before, "the model folder changed");
    assert_eq!(tree_digest(&adapter), adapter_before, "the adapter folder changed");
    // Another adapter folder as output.
    let other = tmp.join("other-adapter");
    copy_dir(&adapter, &other);
    let o = pvera(&["merge", "--model", s(&model), "--adapter", s(&adapter), "--output", s(&other), "--overwrite"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("adapter folder"), "{}", show(&o));
    // A fresh folder works; a second merge into it needs --overwrite.
    let merged = tmp.join("merged");
    let o = pvera(&["merge", "--model", s(&model), "--adapter", s(&adapter), "--output", s(&merged)]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(stderr(&o).contains("2 adapted layer(s)") || stderr(&o).contains("4 adapted layer(s)"), "{}", show(&o));
    let o = pvera(&["merge", "--model", s(&model), "--adapter", s(&adapter), "--output", s(&merged)]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("--overwrite"), "{}", show(&o));
    let o = pvera(&["merge", "--model", s(&model), "--adapter", s(&adapter), "--output", s(&merged), "--overwrite"]);
    assert!(o.status.success(), "{}", show(&o));
    // An output that is a file.
    let file = tmp.join("afile");
    std::fs::write(&file, "x").unwrap();
    let o = pvera(&["merge", "--model", s(&model), "--adapter", s(&adapter), "--output", s(&file)]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("a file is there"), "{}", show(&o));
    // train over an earlier run: refused, then allowed with --overwrite.
    let o = train_tiny_bert(&t, &["--epochs", "1", "--threads", "1"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("not empty") && stderr(&o).contains("--overwrite"), "{}", show(&o));
    let o = train_tiny_bert(&t, &["--epochs", "1", "--threads", "1", "--overwrite"]);
    assert!(o.status.success(), "{}", show(&o));
}

/// Runs `pvera args` with stdout piped; reads `lines` lines then closes the pipe (0: the pipe is
/// closed before the command starts, so its first write finds no reader).
fn with_closed_stdout(args: &[&str], lines: usize) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_pvera"));
    cmd.args(args).stderr(Stdio::piped());
    if lines == 0 {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let o = cmd.stdout(writer).output().unwrap();
        return o;
    }
    let mut child = cmd.stdout(Stdio::piped()).spawn().unwrap();
    {
        let out = child.stdout.take().unwrap();
        let mut r = BufReader::new(out);
        for _ in 0..lines {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
        }
        // dropped here: the pipe's read end closes
    }
    let mut err = Vec::new();
    child.stderr.take().unwrap().read_to_end(&mut err).unwrap();
    let status = child.wait().unwrap();
    Output { status, stdout: Vec::new(), stderr: err }
}

/// Row 7: a closed pipe never panics; training goes on and saves; other commands stop quietly
/// with 141 (a Unix tool killed by SIGPIPE).
#[test]
fn row7_a_closed_stdout_never_panics_and_never_aborts_training() {
    let adapter = fixtures().join("peft/mlp_list/adapter");
    // The reader goes away before the output is written (as `head` does once it has its lines).
    let o = with_closed_stdout(&["inspect", s(&adapter)], 0);
    assert_eq!(code(&o), 141, "{}", show(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", show(&o));
    let t = trained(&[]);
    let o = with_closed_stdout(
        &[
            "predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&t.out.join("best")), "--json",
            "--samples", "2", "a", "b", "c", "d", "e", "f",
        ],
        0,
    );
    assert_eq!(code(&o), 141, "{}", show(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", show(&o));
    let out = t.tmp.path().join("piped");
    let o = with_closed_stdout(
        &[
            "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&t.data), "--task",
            "text-classification", "--output", s(&out), "--r", "4", "--epochs", "2", "--batch-size", "2", "--threads", "1",
        ],
        1,
    );
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert!(out.join("best/adapter_model.safetensors").is_file() && out.join("metrics.json").is_file());
}

/// Row 8: every input, path and flag combination is checked before the first forward pass, and
/// a failed run leaves no empty output folder behind.
#[test]
fn row8_bad_inputs_fail_before_any_work() {
    let t = tiny_bert();
    let tmp = t.tmp.path();
    let o = train_tiny_bert(&t, &["--eval-held-out", "3"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(!t.out.exists(), "no output folder for a run that never started");
    let o = train_tiny_bert(&t, &["--eval-data", s(&tmp.join("missing.jsonl"))]);
    assert_eq!(code(&o), 6, "{}", show(&o));
    assert!(!t.out.exists());
    let bad = tmp.join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"x\"\n").unwrap();
    let o = train_tiny_bert(&t, &["--eval-data", s(&bad)]);
    assert_eq!(code(&o), 10, "{}", show(&o));
    assert!(!t.out.join("best/adapter_model.safetensors").exists(), "training ran before the eval data was read");
    // A zero-byte image in an image folder: named before training.
    let images = tmp.join("images");
    copy_images(&fixtures().join("data/images"), &images);
    std::fs::write(images.join("cat/zero.png"), b"").unwrap();
    let out = tmp.join("vit-out");
    let o = pvera(&[
        "train", "--model", s(&fixtures().join("models/vit_task/model")), "--data", s(&images), "--task",
        "image-classification", "--output", s(&out), "--r", "4", "--epochs", "1", "--threads", "1",
    ]);
    assert_eq!(code(&o), 10, "{}", show(&o));
    assert!(stderr(&o).contains("zero.png"), "{}", show(&o));
    assert!(!out.exists(), "no folder left behind: {}", show(&o));
    // eval: a missing --ood set and an unwritable --output fail before the in-distribution pass.
    let t2 = trained(&[]);
    let best2 = t2.out.join("best");
    let ev = |extra: &[&str]| {
        let mut a = vec![
            "eval", "--model", s(&t2.model), "--tokenizer", s(&t2.tok), "--adapter", s(&best2), "--data",
            s(&t2.data), "--samples", "2", "--threads", "1",
        ];
        a.extend_from_slice(extra);
        pvera(&a)
    };
    let o = ev(&["--ood", s(&tmp.join("nope.txt")), "--output", s(&tmp.join("e1"))]);
    assert_eq!(code(&o), 6, "{}", show(&o));
    assert!(!stderr(&o).contains("eval: "), "{}", show(&o));
    let blocker = tmp.join("blocker");
    std::fs::write(&blocker, "x").unwrap();
    let o = ev(&["--output", s(&blocker.join("sub"))]);
    assert_ne!(code(&o), 0, "{}", show(&o));
    assert!(stderr(&o).contains("blocker"), "{}", show(&o));
}

fn copy_images(src: &Path, dst: &Path) {
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_dir(&e.path(), &dst.join(e.file_name()));
        }
    }
}

/// Row 9: messages name the flag at fault, once.
#[test]
fn row9_errors_blame_the_right_flag_and_say_things_once() {
    let t = tiny_bert();
    let tmp = t.tmp.path();
    let o = train_tiny_bert(&t, &["--max-length", "600"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("--max-length 600") && stderr(&o).contains("24 positions"), "{}", show(&o));
    let o = train_tiny_bert(&t, &["--pooling", "cls-mean-patch"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("--pooling cls-mean-patch"), "{}", show(&o));
    let file = tmp.join("out-file");
    std::fs::write(&file, "x").unwrap();
    let o = pvera(&[
        "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&t.data), "--task",
        "text-classification", "--output", s(&file),
    ]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("a file is there"), "{}", show(&o));
    let o = pvera(&["predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&tmp.join("nope")), "x"]);
    assert_eq!(code(&o), 6, "{}", show(&o));
    assert!(stderr(&o).contains("nope"), "{}", show(&o));
    // An OS error quoted by its wrapper is said once, not repeated by the cause chain.
    let odd = tmp.join("odd-model");
    std::fs::create_dir_all(odd.join("config.json")).unwrap();
    let o = pvera(&["predict", "--model", s(&odd), "--adapter", s(&tmp.join("nope")), "x"]);
    assert_eq!(code(&o), 6, "{}", show(&o));
    assert_eq!(stderr(&o).matches("os error 21").count(), 1, "said once: {}", show(&o));
    // --ood noise:N on a text model
    let t2 = trained(&[]);
    let o = pvera(&[
        "eval", "--model", s(&t2.model), "--tokenizer", s(&t2.tok), "--adapter", s(&t2.out.join("best")), "--data",
        s(&t2.data), "--ood", "noise:5", "--output", s(&tmp.join("ev")),
    ]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("image models"), "{}", show(&o));
    // --task in an error is spelled as on the command line
    let o = pvera(&[
        "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&t.data), "--task",
        "image-classification", "--output", s(&tmp.join("x")),
    ]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("--task image-classification"), "{}", show(&o));
}

/// Row 10: the README's exit-code table is true; every code is produced through the binary.
#[test]
fn row10_every_exit_code_of_the_table() {
    let t = tiny_bert();
    let tmp = t.tmp.path();
    // 2: bad flag values (never 4, which is for adapter_config.json files)
    for bad in [["--lr=-1"], ["--grad-accum=0"], ["--kl-weight=-5"], ["--max-length=0"], ["--r=0"], ["--dropout=2"]] {
        let o = train_tiny_bert(&t, &bad);
        assert_eq!(code(&o), 2, "{bad:?}: {}", show(&o));
        assert!(stderr(&o).contains(bad[0].split('=').next().unwrap()), "{bad:?} names its flag: {}", show(&o));
    }
    let o = pvera(&["bench", "--model", s(&t.model), "--what", "foo"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    let o = pvera(&["bench", "--model", s(&t.model), "--reps", "0"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    let o = pvera(&["bench", "--model", s(&t.model), "--mc-samples", "0"]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    let o = pvera(&["--log", "foo", "inspect", s(&fixtures().join("peft/mlp_list/adapter"))]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    // 3: projections differ (cli.rs covers it); 4: config; 5: tensor file; 6: file system
    let bad_cfg = tmp.join("badcfg");
    copy_dir(&fixtures().join("peft/mlp_list/adapter"), &bad_cfg);
    std::fs::write(bad_cfg.join("adapter_config.json"), "{\"r\": ").unwrap();
    let inputs = tmp.join("in.safetensors");
    let dev = candle_core::Device::Cpu;
    let ids = candle_core::Tensor::new(&[[2i64, 10, 11, 3]], &dev).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("input_ids".to_string(), ids)]), &inputs).unwrap();
    let infer = |adapter: &Path, inputs: &Path| {
        pvera(&["infer", "--model", s(&t.model), "--adapter", s(adapter), "--inputs", s(inputs), "--output", s(&tmp.join("y"))])
    };
    assert_eq!(code(&infer(&bad_cfg, &inputs)), 4);
    let bad_st = tmp.join("badst");
    copy_dir(&fixtures().join("peft/mlp_list/adapter"), &bad_st);
    std::fs::write(bad_st.join("adapter_model.safetensors"), b"\x08\0\0\0\0\0\0\0{}garbage").unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bad_st.join("adapter_config.json")).unwrap()).unwrap();
    cfg["target_modules"] = serde_json::json!(["query", "value"]);
    std::fs::write(bad_st.join("adapter_config.json"), cfg.to_string()).unwrap();
    assert_eq!(code(&infer(&bad_st, &inputs)), 5);
    assert_eq!(code(&infer(&tmp.join("missing"), &inputs)), 6);
    // 7: every problem with the inputs file, including a corrupt file and out-of-vocabulary ids
    let trained = trained(&[]);
    let best = trained.out.join("best");
    let garbage = tmp.join("garbage.safetensors");
    std::fs::write(&garbage, b"not safetensors").unwrap();
    let o = infer(&best, &garbage);
    assert_eq!(code(&o), 7, "{}", show(&o));
    let oov = tmp.join("oov.safetensors");
    let ids = candle_core::Tensor::new(&[[2i64, 1000, 3]], &dev).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("input_ids".to_string(), ids)]), &oov).unwrap();
    let o = infer(&best, &oov);
    assert_eq!(code(&o), 7, "{}", show(&o));
    assert!(stderr(&o).contains("vocab"), "{}", show(&o));
    let pix = tmp.join("pix.safetensors");
    let pv = candle_core::Tensor::zeros((1, 3, 8, 8), candle_core::DType::F32, &dev).unwrap();
    candle_core::safetensors::save(&std::collections::HashMap::from([("pixel_values".to_string(), pv)]), &pix).unwrap();
    let o = infer(&best, &pix);
    assert_eq!(code(&o), 7, "pixel values for a text model: {}", show(&o));
    // 9: unknown model type (predict_cli covers it); 10: data set (predict_cli covers it)
}

/// Row 11: `predict --lines FILE` alone is accepted, as help and README say.
#[test]
fn row11_predict_lines_alone() {
    let t = trained(&[]);
    let lines = t.tmp.path().join("texts.txt");
    std::fs::write(&lines, "free money now\nthe meeting notes\n").unwrap();
    let o = pvera(&[
        "predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&t.out.join("best")), "--lines",
        s(&lines), "--samples", "2", "--json",
    ]);
    assert!(o.status.success(), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["predictions"].as_array().unwrap().len(), 2);
    // A text argument that names a file is classified as text, with a warning pointing to --lines.
    let o = pvera(&[
        "predict", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--adapter", s(&t.out.join("best")), "--samples",
        "2", s(&lines),
    ]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(stderr(&o).contains("--lines"), "{}", show(&o));
}

/// Row 5 (resume side): `--resume` with another data file of the same size is refused.
#[test]
fn row5_resume_refuses_other_data_of_the_same_size() {
    let t = trained(&[]);
    let text = std::fs::read_to_string(&t.data).unwrap();
    let other = t.tmp.path().join("other.jsonl");
    std::fs::write(&other, text.replace("free", "cheap")).unwrap();
    let last = t.out.join("last");
    let o = pvera(&[
        "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&other), "--task", "text-classification",
        "--output", s(&t.out), "--r", "8", "--target-modules", "query,value", "--epochs", "2", "--batch-size", "4",
        "--max-length", "6", "--resume", s(&last), "--threads", "1",
    ]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("other data") && stderr(&o).contains("--data"), "{}", show(&o));
    // A run that already finished its epochs says so instead of "resuming at epoch 2 of 1".
    let o = pvera(&[
        "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&t.data), "--task", "text-classification",
        "--output", s(&t.out), "--r", "8", "--target-modules", "query,value", "--epochs", "1", "--batch-size", "4",
        "--max-length", "6", "--resume", s(&t.out), "--threads", "1",
    ]);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(stderr(&o).contains("1/1"), "{}", show(&o));
}

/// Row 12: SIGINT during training saves a resumable `last/`, says so and how to resume (exit
/// 130); with stdout piped, progress lines come at a steady interval; the resumed run finishes.
#[test]
fn row12_sigint_saves_and_says_how_to_resume() {
    let t = tiny_bert();
    let mut child = Command::new(env!("CARGO_BIN_EXE_pvera"))
        .env("PVERA_PROGRESS_SECS", "0")
        .args([
            "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&t.data), "--task",
            "text-classification", "--output", s(&t.out), "--r", "4", "--epochs", "100000", "--batch-size", "1",
            "--threads", "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    // Wait until training runs (an epoch line), then interrupt.
    loop {
        let mut l = String::new();
        assert!(out.read_line(&mut l).unwrap() > 0, "training ended early: {seen}");
        seen.push_str(&l);
        if l.starts_with("epoch 2/") {
            break;
        }
    }
    let pid = child.id() as i32;
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    // SAFETY: sends SIGINT to the child this test spawned.
    assert_eq!(unsafe { kill(pid, 2) }, 0);
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{err}");
    assert!(err.contains("--resume") && err.contains("last"), "{err}");
    assert!(t.out.join("last/trainer_state.safetensors").is_file(), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    // Resuming with a smaller epoch count that the run has not reached yet finishes normally.
    // Not a terminal: step lines between the epoch lines (here at every step).
    assert!(seen.lines().any(|l| l.starts_with("epoch 1/100000 step ") && l.contains("loss")), "{seen}");
    let done: usize = seen.lines().filter(|l| l.starts_with("epoch ") && l.contains("train loss")).count();
    let o = pvera(&[
        "train", "--model", s(&t.model), "--tokenizer", s(&t.tok), "--data", s(&t.data), "--task", "text-classification",
        "--output", s(&t.out), "--r", "4", "--epochs", &(done + 40).to_string(), "--batch-size", "1", "--threads", "1",
        "--resume", s(&t.out.join("last")),
    ]);
    assert!(o.status.success(), "{}", show(&o));
}

/// Row 1: `pvera merge` writes the adapter's `modules_to_save` weights into the merged model, as
/// PEFT's `merge_and_unload()` does: the merged model, run without any adapter, gives PEFT's
/// `pooler_output` (fixture: `tools/make_model_fixtures_bert.py --only bert_modules_to_save`).
#[test]
fn row1_merge_keeps_the_modules_to_save_weights() {
    let case = fixtures().join("models/bert_modules_to_save");
    let tmp = tempfile::tempdir().unwrap();
    let merged = tmp.path().join("merged");
    let o = pvera(&["merge", "--model", s(&case.join("model")), "--adapter", s(&case.join("adapter")), "--output", s(&merged)]);
    assert!(o.status.success(), "{}", show(&o));
    assert!(stderr(&o).contains("1 trained module(s)"), "{}", show(&o));
    // Inputs from the fixture, outputs of the merged model alone.
    let dev = candle_core::Device::Cpu;
    let (io, _) = pvera::checkpoint::read_safetensors(&case.join("io.safetensors"), &dev).unwrap();
    let inputs = tmp.path().join("in.safetensors");
    let map: std::collections::HashMap<String, candle_core::Tensor> = ["input_ids", "attention_mask", "token_type_ids"]
        .iter()
        .map(|k| (k.to_string(), io[*k].tensor.clone()))
        .collect();
    candle_core::safetensors::save(&map, &inputs).unwrap();
    let y = tmp.path().join("y.safetensors");
    let o = pvera(&["infer", "--model", s(&merged), "--inputs", s(&inputs), "--output", s(&y)]);
    assert!(o.status.success(), "{}", show(&o));
    let (out, _) = pvera::checkpoint::read_safetensors(&y, &dev).unwrap();
    let diff = |a: &candle_core::Tensor, b: &candle_core::Tensor| -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    };
    let want = &io["merge_and_unload.pooler_output"].tensor;
    let d = diff(&out["pooler_output"].tensor, want);
    assert!(d < 1e-5, "pooler_output differs from PEFT's merge_and_unload by {d}");
    // What the old merge wrote (the base pooler on the merged states) is far from it.
    assert!(diff(&io["base_pooler_on_merged.pooler_output"].tensor, want) > 1e-2);
    let d = diff(&out["last_hidden_state"].tensor, &io["merge_and_unload.last_hidden_state"].tensor);
    assert!(d < 1e-5, "last_hidden_state differs by {d}");
}
