//! The library predictor (`pvera::Predictor`): task metadata resolution and heads, checked
//! against PEFT's own task model (fixtures of `tools/make_model_fixtures_bert.py`).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use pvera::checkpoint::read_safetensors;
use pvera::models::heads::Pooling;
use pvera::models::ModelInputs;
use pvera::predictor::meta::{Source, TaskMeta, TaskKind};
use pvera::predictor::{PredictConfig, PredictorOptions, TaskOverrides};
use pvera::Predictor;

use crate::common::fixtures;

fn io(case: &str) -> std::collections::BTreeMap<String, Tensor> {
    let (t, _) = read_safetensors(&fixtures().join(format!("models/{case}/io.safetensors")), &Device::Cpu).unwrap();
    t.into_iter().map(|(k, v)| (k, v.tensor)).collect()
}

fn softmax_rows(logits: &Tensor) -> Vec<Vec<f64>> {
    let v: Vec<Vec<f32>> = logits.to_dtype(DType::F32).unwrap().to_vec2().unwrap();
    v.into_iter()
        .map(|row| {
            let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|x| x / z).collect()
        })
        .collect()
}

/// A copy of a fixture model directory without tokenizer requirements: the predictor needs a
/// tokenizer.json for text models, so one from the data fixtures is placed beside it.
fn model_with_tokenizer(case: &str, tmp: &Path) -> std::path::PathBuf {
    let src = fixtures().join(format!("models/{case}/model"));
    let dst = tmp.join("model");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    std::fs::copy(fixtures().join("data/tokenizer.json"), dst.join("tokenizer.json")).unwrap();
    dst
}

/// Issue 16 row 2: a PEFT adapter trained on `BertForSequenceClassification` (`task_type:
/// SEQ_CLS`) is predicted with the pooler, as PEFT's task model does, without any flag; the
/// probabilities equal PEFT's.
#[test]
fn peft_seq_cls_adapters_pool_like_their_task_class_and_match_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer("bert_seq_cls", tmp.path());
    let adapter = fixtures().join("models/bert_seq_cls/adapter");
    let mut p =
        Predictor::open_with_adapter(&model, &adapter, &PredictorOptions::default(), &TaskOverrides::default()).unwrap();
    let task = p.adapter("default").unwrap().task.clone();
    assert_eq!(task.pooling, Pooling::Pooler);
    assert_eq!(task.pooling_source, Source::AdapterConfig);
    assert_eq!(p.adapter("default").unwrap().head.origin, "adapter");
    let t = io("bert_seq_cls");
    let inputs = ModelInputs {
        input_ids: Some(t["input_ids"].clone()),
        attention_mask: Some(t["attention_mask"].clone()),
        token_type_ids: Some(t["token_type_ids"].clone()),
        pixel_values: None,
    };
    let want = softmax_rows(&t["task_eval.logits"]);
    let got = p.predict("default", &inputs, &PredictConfig { samples: 1, ..PredictConfig::default() }).unwrap();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert!(g.mc.is_none());
        for (a, b) in g.mean_mode.iter().zip(w) {
            assert!((a - b).abs() < 1e-5, "{:?} vs PEFT {:?}", g.mean_mode, w);
        }
    }
    // The pre-fix behaviour (mean pooling) would be far off: the choice matters on this fixture.
    let mut mean = Predictor::open_with_adapter(
        &model,
        &adapter,
        &PredictorOptions::default(),
        &TaskOverrides { pooling: Some(Pooling::Mean), ..TaskOverrides::default() },
    )
    .unwrap();
    let m = mean.predict("default", &inputs, &PredictConfig { samples: 1, ..PredictConfig::default() }).unwrap();
    let far = m.iter().zip(&want).any(|(g, w)| g.mean_mode.iter().zip(w).any(|(a, b)| (a - b).abs() > 1e-2));
    assert!(far, "mean pooling should not reproduce PEFT's task model here");
}

/// Task metadata beside the adapter wins over guesses; nothing known is a warning that names the
/// assumption; a pooling the model cannot do and labels that do not fit the head are refused.
#[test]
fn task_metadata_is_read_from_the_adapter_folder_and_gaps_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer("bert_seq_cls", tmp.path());
    let adapter = tmp.path().join("adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(fixtures().join("models/bert_seq_cls/adapter").join(f), adapter.join(f)).unwrap();
    }
    let meta = TaskMeta {
        task: TaskKind::TextClassification,
        model_type: "bert".into(),
        labels: vec!["a".into(), "b".into(), "c".into()],
        pooling: Some("cls".into()),
        max_length: Some(7),
    };
    meta.write(&adapter).unwrap();
    assert_eq!(TaskMeta::read(&adapter).unwrap().unwrap(), meta);
    let mut p =
        Predictor::open_with_adapter(&model, &adapter, &PredictorOptions::default(), &TaskOverrides::default()).unwrap();
    let t = &p.adapter("default").unwrap().task;
    assert_eq!((t.pooling, t.pooling_source.clone()), (Pooling::Cls, Source::AdapterDir));
    assert_eq!(t.labels, vec!["a", "b", "c"]);
    assert_eq!(p.max_length("default").unwrap(), 7);
    assert!(p.take_warnings().is_empty());

    // Without the files: PEFT's config still says SEQ_CLS (pooler), and the max length is named
    // as assumed.
    std::fs::remove_file(adapter.join("pvera_task.json")).unwrap();
    std::fs::remove_file(adapter.join("labels.json")).unwrap();
    let mut p =
        Predictor::open_with_adapter(&model, &adapter, &PredictorOptions::default(), &TaskOverrides::default()).unwrap();
    let w = p.take_warnings().join("\n");
    assert!(w.contains("maximum text length"), "{w}");

    // A pooling that does not fit, labels that do not fit: typed request errors.
    let e = Predictor::open_with_adapter(
        &model,
        &adapter,
        &PredictorOptions::default(),
        &TaskOverrides { pooling: Some(Pooling::ClsMeanPatch), ..TaskOverrides::default() },
    )
    .unwrap_err();
    assert!(matches!(e, pvera::Error::Request(ref m) if m.contains("cls-mean-patch") && m.contains("patch")), "{e}");
    let e = Predictor::open_with_adapter(
        &model,
        &adapter,
        &PredictorOptions::default(),
        &TaskOverrides { labels: Some(vec!["x".into(), "y".into()]), ..TaskOverrides::default() },
    )
    .unwrap_err();
    assert!(matches!(e, pvera::Error::Request(ref m) if m.contains("3 outputs")), "{e}");
}

/// A copy of the SEQ_CLS fixture adapter with its λ's scaled (another adapter, same labels).
fn scaled_adapter(dst: &Path, scale: f64) {
    let src = fixtures().join("models/bert_seq_cls/adapter");
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("adapter_config.json"), dst.join("adapter_config.json")).unwrap();
    let (ts, _) = read_safetensors(&src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let out: std::collections::BTreeMap<String, Tensor> = ts
        .into_iter()
        .map(|(k, v)| {
            let t = if k.contains("pvera_lambda") { (v.tensor * scale).unwrap() } else { v.tensor };
            (k, t)
        })
        .collect();
    let bytes = pvera::checkpoint::serialize_safetensors(&out, Some(pvera::checkpoint::pt_metadata())).unwrap();
    std::fs::write(dst.join("adapter_model.safetensors"), bytes).unwrap();
}

fn seq_cls_inputs() -> ModelInputs {
    let t = io("bert_seq_cls");
    ModelInputs {
        input_ids: Some(t["input_ids"].clone()),
        attention_mask: Some(t["attention_mask"].clone()),
        token_type_ids: Some(t["token_type_ids"].clone()),
        pixel_values: None,
    }
}

fn rows(x: &ModelInputs, r: &[u32]) -> ModelInputs {
    let idx = Tensor::new(r, &Device::Cpu).unwrap();
    let sel = |t: &Option<Tensor>| t.as_ref().map(|t| t.index_select(&idx, 0).unwrap());
    ModelInputs { input_ids: sel(&x.input_ids), attention_mask: sel(&x.attention_mask), token_type_ids: sel(&x.token_type_ids), pixel_values: None }
}

/// A predictor on the SEQ_CLS fixture model with two adapters: `x` (the fixture's) and `y` (its
/// λ's scaled by 2.5).
fn two_seq_cls_adapters(tmp: &Path) -> Predictor {
    let model = model_with_tokenizer("bert_seq_cls", tmp);
    scaled_adapter(&tmp.join("y"), 2.5);
    let mut p = Predictor::open(&model, &PredictorOptions::default()).unwrap();
    p.add_adapter("x", &fixtures().join("models/bert_seq_cls/adapter"), &TaskOverrides::default()).unwrap();
    p.add_adapter("y", &tmp.join("y"), &TaskOverrides::default()).unwrap();
    p
}

/// One forward for requests of two adapters equals predicting each alone (issue 12, part 1).
#[test]
fn predict_mixed_equals_each_adapter_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let mut p = two_seq_cls_adapters(tmp.path());
    let x = seq_cls_inputs();
    let (gx, gy) = (rows(&x, &[0, 2]), rows(&x, &[1, 2, 0]));
    let mean = PredictConfig { samples: 1, ..PredictConfig::default() };
    let mixed = p.predict_mixed(&[("x", &gx), ("y", &gy)], &mean).unwrap();
    let alone_x = p.predict("x", &gx, &mean).unwrap();
    let alone_y = p.predict("y", &gy, &mean).unwrap();
    for (m, a) in mixed[0].iter().zip(&alone_x).chain(mixed[1].iter().zip(&alone_y)) {
        for (u, v) in m.mean_mode.iter().zip(&a.mean_mode) {
            assert!((u - v).abs() < 1e-6, "{:?} vs {:?}", m.mean_mode, a.mean_mode);
        }
    }
    // The two adapters answer differently on the same input (row 2 of x is row 1 of y).
    let d: f64 = mixed[0][1].mean_mode.iter().zip(&mixed[1][1].mean_mode).map(|(a, b)| (a - b).abs()).sum();
    assert!(d > 1e-3, "{d}");
}

/// Monte Carlo in one mixed batch: each group (its own adapter, seed and numbering) gets the
/// samples it gets predicted alone (per-input noise), within float rounding; a VeRA-free check of
/// the sequential mode's refusal.
#[test]
fn predict_mixed_groups_samples_each_group_as_alone() {
    use pvera::predictor::MixedGroup;
    let tmp = tempfile::tempdir().unwrap();
    let mut p = two_seq_cls_adapters(tmp.path());
    let x = seq_cls_inputs();
    let (gx, gy) = (rows(&x, &[0, 2]), rows(&x, &[1, 2, 0]));
    // 5 rows, 6 samples, 8 rows per forward: one sample per chunk, so the chunking differs from
    // the groups' own (2 and 3 rows: 4 and 2 samples per forward)
    let cfg = PredictConfig { samples: 6, max_rows: 8, ..PredictConfig::default() };
    let groups = [
        MixedGroup { adapter: "x", inputs: &gx, seed: 5, first: 0 },
        MixedGroup { adapter: "y", inputs: &gy, seed: 9, first: 3 },
    ];
    let mixed = p.predict_mixed_groups(&groups, &cfg).unwrap();
    let alone_x = p.predict_from("x", &gx, &PredictConfig { seed: Some(5), ..cfg.clone() }, 0).unwrap();
    let alone_y = p.predict_from("y", &gy, &PredictConfig { seed: Some(9), ..cfg.clone() }, 3).unwrap();
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(u, v)| (u - v).abs() < 1e-6);
    for (m, a) in mixed[0].iter().zip(&alone_x).chain(mixed[1].iter().zip(&alone_y)) {
        assert!(close(&m.mean_mode, &a.mean_mode), "{:?} vs {:?}", m.mean_mode, a.mean_mode);
        assert_eq!(m.samples.len(), 6);
        for (u, v) in m.samples.iter().zip(&a.samples) {
            assert!(close(u, v), "{u:?} vs {v:?}");
        }
        assert!(m.mc.as_ref().unwrap().variance > 0.0, "the samples must differ");
    }
    // another seed for y changes y's samples and leaves x's alone
    let other = [groups[0], MixedGroup { seed: 10, ..groups[1] }];
    let again = p.predict_mixed_groups(&other, &cfg).unwrap();
    assert!(close(&again[0][0].samples[0], &mixed[0][0].samples[0]));
    assert!(!close(&again[1][0].samples[0], &mixed[1][0].samples[0]));
    let seq = PredictConfig { mode: pvera::uncertainty::McMode::Sequential, ..cfg.clone() };
    assert!(matches!(p.predict_mixed_groups(&groups, &seq), Err(pvera::Error::Request(_))));
}

/// Per-input noise: an input's Monte Carlo samples do not depend on the batch size, the row
/// budget or the mode; the seed and the input's position decide them.
#[test]
fn per_input_noise_is_independent_of_batching() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_with_tokenizer("bert_seq_cls", tmp.path());
    let adapter = fixtures().join("models/bert_seq_cls/adapter");
    let mut p =
        Predictor::open_with_adapter(&model, &adapter, &PredictorOptions::default(), &TaskOverrides::default()).unwrap();
    let x = seq_cls_inputs();
    let cfg = PredictConfig { samples: 6, seed: Some(11), ..PredictConfig::default() };
    let run = |p: &mut Predictor, batch: usize, cfg: &PredictConfig| {
        p.predict_all("default", 3, batch, cfg, &mut |_, c| Ok(rows(&x, &c.iter().map(|&i| i as u32).collect::<Vec<_>>())), &mut |_, _| {})
            .unwrap()
    };
    let a = run(&mut p, 3, &cfg);
    let b = run(&mut p, 1, &cfg);
    let c = run(&mut p, 2, &PredictConfig { max_rows: 1, mode: pvera::uncertainty::McMode::Sequential, ..cfg.clone() });
    for ((u, v), w) in a.iter().zip(&b).zip(&c) {
        let (u, v, w) = (u.mc.as_ref().unwrap(), v.mc.as_ref().unwrap(), w.mc.as_ref().unwrap());
        for k in 0..u.mean_probs.len() {
            let (d1, d2) = ((u.mean_probs[k] - v.mean_probs[k]).abs(), (u.mean_probs[k] - w.mean_probs[k]).abs());
            assert!(d1 < 1e-6 && d2 < 1e-6, "batch 3 vs 1: {d1}, vs sequential: {d2}");
        }
        assert!(u.variance > 0.0, "the samples must differ from each other");
    }
    let other = run(&mut p, 3, &PredictConfig { seed: Some(12), ..cfg.clone() });
    assert_ne!(other[0].mc.as_ref().unwrap().mean_probs, a[0].mc.as_ref().unwrap().mean_probs);
    // The same adapter loaded under another name draws the same noise (a server's adapter names
    // are its own; its answers equal `pvera predict`'s, which loads the adapter as "default").
    p.add_adapter("renamed", &adapter, &TaskOverrides::default()).unwrap();
    let renamed = p
        .predict_all("renamed", 3, 3, &cfg, &mut |_, c| Ok(rows(&x, &c.iter().map(|&i| i as u32).collect::<Vec<_>>())), &mut |_, _| {})
        .unwrap();
    for (u, v) in a.iter().zip(&renamed) {
        assert_eq!(u.mc.as_ref().unwrap().mean_probs, v.mc.as_ref().unwrap().mean_probs);
    }
}
