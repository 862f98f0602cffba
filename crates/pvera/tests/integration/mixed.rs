//! Mixed-adapter batches and per-input noise (issue 12, part 1): rows of one batch go through
//! different adapters (and the base model), with each row's noise from its own seed; the result
//! equals running each adapter's rows alone, in mean mode and sampled. VeRA adapters (issue 17)
//! ride in the same batch: their own projection group, never sampled.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use pvera::checkpoint;
use pvera::models::loader::ModelDir;
use pvera::models::{AnyModel, ModelInputs};
use pvera::state::RowPlan;
use pvera::{PeftModel, RunState, Sampling};

use crate::common::fixtures;

const CASE: &str = "models/bert_tiny";

fn inputs(io: &BTreeMap<String, Tensor>) -> ModelInputs {
    ModelInputs {
        input_ids: Some(io["input_ids"].clone()),
        attention_mask: Some(io["attention_mask"].clone()),
        token_type_ids: Some(io["token_type_ids"].clone()),
        pixel_values: None,
    }
}

/// The committed VeRA adapter on the same tiny BERT (`tools/make_vera_fixtures.py`).
const VERA_ADAPTER: &str = "vera/families/bert/adapter";

/// A copy of the fixture adapter with its λ's (and, with `new_projections`, its stored A and B)
/// changed, so it is a different adapter (in another projection group).
fn variant(dst: &Path, scale: f64, new_projections: bool) {
    variant_of(&fixtures().join(CASE).join("adapter"), dst, scale, new_projections)
}

fn variant_of(src: &Path, dst: &Path, scale: f64, new_projections: bool) {
    std::fs::create_dir_all(dst).unwrap();
    std::fs::copy(src.join("adapter_config.json"), dst.join("adapter_config.json")).unwrap();
    let (ts, _) = checkpoint::read_safetensors(&src.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut out = BTreeMap::new();
    for (k, v) in ts {
        let t = v.tensor;
        let t = if k.ends_with("lambda_b") || k.ends_with("lambda_d") {
            (t * scale).unwrap()
        } else if new_projections && (k == checkpoint::PROJ_A_KEY || k == checkpoint::PROJ_B_KEY) {
            // The rows reversed and scaled: other projections, equally sized.
            let n = t.dims()[0];
            let rev: Vec<u32> = (0..n as u32).rev().collect();
            (t.index_select(&Tensor::new(rev.as_slice(), &Device::Cpu).unwrap(), 0).unwrap() * 0.9).unwrap()
        } else {
            t
        };
        out.insert(k, t);
    }
    let bytes = checkpoint::serialize_safetensors(&out, Some(checkpoint::pt_metadata())).unwrap();
    std::fs::write(dst.join("adapter_model.safetensors"), bytes).unwrap();
}

fn model_with_adapters(tmp: &Path) -> PeftModel<AnyModel> {
    let dir = ModelDir::open(&fixtures().join(CASE).join("model")).unwrap();
    let (model, registry, info) = AnyModel::load(&dir, None, &Device::Cpu, Arc::new(RunState::new(0))).unwrap();
    let mut pm = PeftModel::from_parts(model, registry, info);
    pm.load_adapter(&fixtures().join(CASE).join("adapter"), "a", false).unwrap();
    variant(&tmp.join("b"), 1.7, false);
    variant(&tmp.join("c"), 0.6, true);
    pm.load_adapter(&tmp.join("b"), "b", false).unwrap();
    pm.load_adapter(&tmp.join("c"), "c", false).unwrap();
    // Two VeRA adapters: the PEFT-written one and a variant of it (same VeRA projections).
    pm.load_adapter(&fixtures().join(VERA_ADAPTER), "v", false).unwrap();
    variant_of(&fixtures().join(VERA_ADAPTER), &tmp.join("w"), -1.3, false);
    pm.load_adapter(&tmp.join("w"), "w", false).unwrap();
    pm.eval().unwrap();
    pm.state().set_grad_enabled(false).unwrap();
    // a and b share the model's projections; c keeps the ones its file carries (another group).
    let site = pm.registry().sites().iter().find(|l| l.site().has_adapter("c").unwrap()).unwrap().site().clone();
    let proj = |n: &str| site.with_slot(n, |s| Arc::as_ptr(s.projections()) as usize).unwrap();
    assert_eq!(proj("a"), proj("b"));
    assert_ne!(proj("a"), proj("c"));
    // The VeRA adapters share their own projections, apart from every PVeRA group.
    assert_eq!(proj("v"), proj("w"));
    assert_ne!(proj("v"), proj("a"));
    assert_ne!(proj("v"), proj("c"));
    pm
}

/// Rows `rows` of every input tensor.
fn pick(x: &ModelInputs, rows: &[usize]) -> ModelInputs {
    let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>().as_slice(), &Device::Cpu).unwrap();
    let sel = |t: &Option<Tensor>| t.as_ref().map(|t| t.index_select(&idx, 0).unwrap());
    ModelInputs {
        input_ids: sel(&x.input_ids),
        attention_mask: sel(&x.attention_mask),
        token_type_ids: sel(&x.token_type_ids),
        pixel_values: sel(&x.pixel_values),
    }
}

/// The fixture case's inputs.
fn fixture_inputs() -> ModelInputs {
    let (io, _) = checkpoint::read_safetensors(&fixtures().join(CASE).join("io.safetensors"), &Device::Cpu).unwrap();
    let io: BTreeMap<String, Tensor> = io.into_iter().map(|(k, v)| (k, v.tensor)).collect();
    inputs(&io)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// The batch: the fixture's 3 inputs three times (less one), rows routed a, b, c, base, a, c, and
/// the VeRA adapters v, w, v.
fn routing() -> Vec<Option<String>> {
    ["a", "b", "c", "", "a", "c", "v", "w", "v"].iter().map(|s| (!s.is_empty()).then(|| s.to_string())).collect()
}

/// Input rows of the batch (indices into the fixture's 3 inputs).
const BATCH: [usize; 9] = [0, 1, 2, 0, 1, 2, 0, 1, 2];

fn check(sampled: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let mut pm = model_with_adapters(tmp.path());
    let x3 = fixture_inputs();
    let x = pick(&x3, &BATCH);
    let rows = routing();
    let n = rows.len();
    let seeds: Vec<u64> = (0..n as u64).map(|i| 1000 + 7 * i).collect();
    if sampled {
        pm.state().set_sampling(Sampling::Always).unwrap();
    }
    let state = pm.state().clone();
    state
        .set_rows(RowPlan { adapters: Some(Arc::new(rows.clone())), seeds: sampled.then(|| Arc::new(seeds.clone())) })
        .unwrap();
    let mixed = pm.model().forward(&x).unwrap().last_hidden_state;
    state.set_rows(RowPlan::default()).unwrap();
    // Each adapter's rows alone (same per-row seeds), and the base rows with adapters disabled.
    for name in ["a", "b", "c", "v", "w"] {
        let mine: Vec<usize> = (0..n).filter(|&i| rows[i].as_deref() == Some(name)).collect();
        pm.set_adapter(&[name]).unwrap();
        state
            .set_rows(RowPlan { adapters: None, seeds: sampled.then(|| Arc::new(mine.iter().map(|&i| seeds[i]).collect())) })
            .unwrap();
        let alone = pm.model().forward(&pick(&x, &mine)).unwrap().last_hidden_state;
        state.set_rows(RowPlan::default()).unwrap();
        let got = pick_rows(&mixed, &mine);
        let d = max_diff(&got, &alone);
        assert!(d < 1e-5, "adapter {name} (sampled {sampled}): mixed vs alone differ by {d}");
    }
    let base = pm.with_adapters_disabled(|p| p.model().forward(&pick(&x, &[3])).unwrap().last_hidden_state).unwrap();
    assert!(max_diff(&pick_rows(&mixed, &[3]), &base) < 1e-6);
    // The adapters really differ from each other (the test could not pass by accident).
    assert!(max_diff(&pick_rows(&mixed, &[0]), &pick_rows(&mixed, &[3])) > 1e-3);
    assert!(max_diff(&pick_rows(&mixed, &[2]), &pick_rows(&mixed, &[5]).clone()) > 0.0 || !sampled);
    // VeRA rows: adapted (not the base), and v and w differ on the same input.
    assert!(max_diff(&pick_rows(&mixed, &[6]), &pick_rows(&mixed, &[3])) > 1e-3);
    assert!(max_diff(&pick_rows(&mixed, &[6]), &pick_rows(&mixed, &[0])) > 1e-3);
    assert!(max_diff(&pick_rows(&mixed, &[7]), &pick_rows(&mixed, &[1])) > 1e-3);
    // A VeRA row does not sample: with sampling on, its output is v's unsampled one.
    pm.set_adapter(&["v"]).unwrap();
    let sampling = state.sampling();
    state.set_sampling(Sampling::Never).unwrap();
    let unsampled = pm.model().forward(&pick(&x, &[6])).unwrap().last_hidden_state;
    state.set_sampling(sampling).unwrap();
    assert!(max_diff(&pick_rows(&mixed, &[6]), &unsampled) < 1e-5);
}

/// A VeRA row is deterministic even when sampling is on and its seed changes; with its mean
/// output equal to the PEFT-written fixture's (`vera/families/bert`).
#[test]
fn vera_rows_of_a_sampled_mixed_batch_do_not_sample() {
    let tmp = tempfile::tempdir().unwrap();
    let pm = model_with_adapters(tmp.path());
    let x = fixture_inputs();
    pm.state().set_sampling(Sampling::Always).unwrap();
    let run = |seeds: Vec<u64>| {
        let plan = RowPlan { adapters: Some(Arc::new(vec![Some("v".to_string()); 3])), seeds: Some(Arc::new(seeds)) };
        pm.state().set_rows(plan).unwrap();
        let y = pm.model().forward(&x).unwrap().last_hidden_state;
        pm.state().set_rows(RowPlan::default()).unwrap();
        y
    };
    let (y1, y2) = (run(vec![1, 2, 3]), run(vec![9, 8, 7]));
    assert_eq!(max_diff(&y1, &y2), 0.0);
    let (want, _) =
        checkpoint::read_safetensors(&fixtures().join("vera/families/bert/io.safetensors"), &Device::Cpu).unwrap();
    let d = max_diff(&y1, &want["eval.last_hidden_state"].tensor);
    assert!(d < 2e-5, "VeRA rows vs PEFT: {d}");
}

fn pick_rows(t: &Tensor, rows: &[usize]) -> Tensor {
    let idx = Tensor::new(rows.iter().map(|&r| r as u32).collect::<Vec<_>>().as_slice(), t.device()).unwrap();
    t.index_select(&idx, 0).unwrap()
}

#[test]
fn a_mixed_batch_equals_each_adapter_alone_in_mean_mode() {
    check(false);
}

#[test]
fn a_mixed_batch_equals_each_adapter_alone_when_sampled_with_row_seeds() {
    check(true);
}

/// Per-row seeds make a row's noise independent of its batch: the same row, seed and adapter
/// give the same output alone or next to other rows; another seed gives other noise.
#[test]
fn row_seeds_make_noise_independent_of_the_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let pm = model_with_adapters(tmp.path());
    let x = fixture_inputs();
    pm.state().set_sampling(Sampling::Always).unwrap();
    let run = |rows: &[usize], seeds: Vec<u64>| {
        pm.state().set_rows(RowPlan { adapters: None, seeds: Some(Arc::new(seeds)) }).unwrap();
        let y = pm.model().forward(&pick(&x, rows)).unwrap().last_hidden_state;
        pm.state().set_rows(RowPlan::default()).unwrap();
        y
    };
    let all = run(&[0, 1, 2], vec![5, 6, 7]);
    let one = run(&[1], vec![6]);
    assert!(max_diff(&pick_rows(&all, &[1]), &one) < 1e-6);
    let other = run(&[1], vec![8]);
    assert!(max_diff(&one, &other) > 1e-4, "another seed must give other noise");
}
