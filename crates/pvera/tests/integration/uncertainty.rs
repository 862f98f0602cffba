//! `pvera::uncertainty` against PEFT's own Monte Carlo passes and against scipy / scikit-learn /
//! torchmetrics (fixtures from tools/make_uncertainty_fixtures.py).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use pvera::state::{Mode, Sampling};
use pvera::uncertainty::{auroc, calibration, input_stats, mc_predict, output_stats, McConfig, McMode, McOutput};
use pvera::PeftModel;
use serde_json::Value;

use crate::common::{build_base_from, fixtures, TestModel};

fn dir() -> PathBuf {
    fixtures().join("uncertainty")
}

fn io() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("mc_peft/io.safetensors"), &Device::Cpu).unwrap()
}

fn load(adapter: &str) -> PeftModel<TestModel> {
    let d = dir().join("mc_peft");
    let (m, reg, info) = build_base_from(&d.join("base_model.safetensors"), DType::F32, false);
    PeftModel::from_pretrained(m, reg, info, &d.join(adapter), "default", false).unwrap()
}

fn run(pm: &PeftModel<TestModel>, x: &Tensor, cfg: &McConfig) -> McOutput {
    mc_predict(pm, x, cfg, |x: &Tensor| pm.model().forward(x)).unwrap()
}

fn flat_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn seq(seed: u64) -> McConfig {
    McConfig { samples: 16, mode: McMode::Sequential, seed: Some(seed), ..Default::default() }
}

#[test]
fn sequential_mc_reproduces_peft_sampled_passes() {
    let io = io();
    for adapter in ["adapter_seeded", "adapter_global"] {
        for input in ["x", "x3"] {
            let pm = load(adapter);
            let out = run(&pm, &io[input], &seq(11));
            assert_eq!((out.samples, out.forwards, out.classes), (16, 16, 2));
            let want = flat_f64(&io[&format!("{adapter}_{input}")]);
            let d = max_diff(&out.probs, &want);
            assert!(d < 1e-6, "{adapter}/{input}: sampled probabilities differ from PEFT's by {d}");
            let mean = flat_f64(&io[&format!("{adapter}_{input}_mean")]);
            let d = max_diff(out.mean_mode.as_ref().unwrap(), &mean);
            assert!(d < 1e-6, "{adapter}/{input}: mean-mode probabilities differ from PEFT's by {d}");
            // the samples really vary (the test would be void otherwise): sample 0 vs 1 of input 0
            let b = io[input].dims()[0];
            assert!(max_diff(&out.probs[..2], &out.probs[2 * b..2 * b + 2]) > 1e-3);
        }
    }
}

#[test]
fn batched_mc_equals_peft_when_layer_generators_and_rows_align() {
    // adapter_seeded: every layer has its own generator; x: B*r = 4*8 = 32, a multiple of 16.
    let io = io();
    let pm = load("adapter_seeded");
    for max_rows in [64, 12, 4] {
        let cfg = McConfig { max_rows, ..seq(11) };
        let cfg = McConfig { mode: McMode::Batched, ..cfg };
        let out = run(&pm, &io["x"], &cfg);
        assert_eq!(out.forwards, 16usize.div_ceil((max_rows / 4).max(1)));
        let d = max_diff(&out.probs, &flat_f64(&io["adapter_seeded_x"]));
        assert!(d < 1e-6, "max_rows {max_rows}: batched MC differs from PEFT's sequential passes by {d}");
    }
}

#[test]
fn seeded_runs_reproduce_and_unseeded_runs_continue_the_streams() {
    let io = io();
    for adapter in ["adapter_seeded", "adapter_global"] {
        let pm = load(adapter);
        let batched = McConfig { samples: 8, seed: Some(5), ..Default::default() };
        let a = run(&pm, &io["x3"], &batched);
        let b = run(&pm, &io["x3"], &batched);
        assert_eq!(a.probs, b.probs, "{adapter}: the same seed must give the same samples");
        let c = run(&pm, &io["x3"], &McConfig { seed: Some(6), ..batched.clone() });
        if adapter == "adapter_seeded" {
            // every layer draws from its own generator_seed: the run seed seeds only the global
            // generator, which this adapter does not use
            assert_eq!(a.probs, c.probs, "{adapter}: generator_seed fixes the noise");
        } else {
            assert_ne!(a.probs, c.probs, "{adapter}: another seed must give other samples");
        }
        let unseeded = McConfig { seed: None, ..batched };
        let d = run(&pm, &io["x3"], &unseeded);
        let e = run(&pm, &io["x3"], &unseeded);
        assert_ne!(d.probs, e.probs, "{adapter}: without a seed the generators continue (PEFT's behaviour)");
    }
}

#[test]
fn mc_restores_the_run_state_and_refuses_merged_adapters() {
    let io = io();
    let mut pm = load("adapter_seeded");
    pm.train().unwrap();
    pm.state().set_sampling(Sampling::Never).unwrap();
    run(&pm, &io["x"], &McConfig::default());
    assert_eq!(pm.state().mode(), Mode::Train);
    assert_eq!(pm.state().sampling(), Sampling::Never);
    pm.eval().unwrap();
    pm.merge_adapter(None, false).unwrap();
    let err = mc_predict(&pm, &io["x"], &McConfig::default(), |x: &Tensor| pm.model().forward(x)).unwrap_err();
    assert!(err.to_string().contains("unmerge_adapter"), "{err}");
    pm.unmerge_adapter().unwrap();
    let bad = McConfig { samples: 0, ..Default::default() };
    assert!(mc_predict(&pm, &io["x"], &bad, |x: &Tensor| pm.model().forward(x)).is_err());
}

#[test]
fn per_layer_sampling_switch_is_honoured_at_run_time() {
    let io = io();
    let pm = load("adapter_seeded");
    let from_config = McConfig { sampling: Sampling::FromConfig, samples: 4, ..Default::default() };
    // every layer off: FromConfig draws nothing, all samples equal the mean mode
    let switched = pm.set_sample_at_inference("default", None, false).unwrap();
    assert_eq!(switched, vec!["lin1".to_string(), "lin2".to_string()]);
    let out = run(&pm, &io["x"], &from_config);
    let mean = out.mean_mode.clone().unwrap();
    // (the stacked batch of 16 rows may round differently from the 4-row mean forward)
    for s in 0..4 {
        let d = max_diff(&out.probs[s * 8..(s + 1) * 8], &mean);
        assert!(d < 1e-6, "sample {s} should be the mean path, differs by {d}");
    }
    // Sampling::Always overrides the per-layer flags
    let always = run(&pm, &io["x"], &McConfig { samples: 4, ..Default::default() });
    assert!(max_diff(&always.probs[..8], &mean) > 1e-4);
    // only lin2 on: samples vary, and differ from sampling both layers
    pm.set_sample_at_inference("default", Some(&["lin2"]), true).unwrap();
    let only2 = run(&pm, &io["x"], &from_config);
    assert!(max_diff(&only2.probs[..8], &mean) > 1e-4);
    assert!(max_diff(&only2.probs, &always.probs) > 1e-4);
    // a module no layer has is an error, and changes nothing
    let err = pm.set_sample_at_inference("default", Some(&["lin2", "nope"]), false).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    // the message lists the adapted layers, not every linear layer of the model (issue 16 row 9)
    let msg = err.to_string();
    assert!(msg.contains("[\"lin1\", \"lin2\"]") && !msg.contains("lin0") && !msg.contains("lin3"), "{msg}");
    let again = run(&pm, &io["x"], &from_config);
    assert_eq!(again.probs, only2.probs);
    assert!(pm.set_sample_at_inference("other", None, true).is_err());
}

#[test]
fn intervals_equal_the_peft_example_on_peft_samples() {
    let io = io();
    for adapter in ["adapter_seeded", "adapter_global"] {
        for input in ["x", "x3"] {
            let samples = flat_f64(&io[&format!("{adapter}_{input}")]);
            let b = io[input].dims()[0];
            let out = McOutput { samples: 16, inputs: b, classes: 2, probs: samples, mean_mode: None, forwards: 16 };
            let stats = output_stats(&out, 0.95).unwrap();
            let want = flat_f64(&io[&format!("{adapter}_{input}_interval")]);
            // The example computes in float32 (NumPy 2 keeps `1.0 * float32_array` in float32),
            // pvera in float64: agreement to float32 precision.
            for (k, st) in stats.iter().enumerate() {
                let (lo, hi) = st.interval.unwrap();
                assert!(
                    (lo - want[2 * k]).abs() < 1e-6 && (hi - want[2 * k + 1]).abs() < 1e-6,
                    "{adapter}/{input}[{k}]: interval ({lo}, {hi}) vs PEFT's ({}, {})",
                    want[2 * k],
                    want[2 * k + 1]
                );
            }
        }
    }
}

fn stats_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("stats.json")).unwrap()).unwrap()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

fn close(got: f64, want: f64, tol: f64, what: &str) {
    assert!((got - want).abs() <= tol * (1.0 + want.abs()), "{what}: got {got}, scipy/sklearn say {want}");
}

#[test]
fn input_stats_match_scipy() {
    let j = stats_json();
    let cases = j["intervals"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for (i, c) in cases.iter().enumerate() {
        let samples: Vec<Vec<f64>> = c["samples"].as_array().unwrap().iter().map(f64s).collect();
        let conf = c["confidence"].as_f64().unwrap();
        let st = input_stats(&samples, conf).unwrap();
        let w = |k: &str| c[k].as_f64().unwrap();
        assert_eq!(st.modal_class as u64, c["modal_class"].as_u64().unwrap(), "case {i}");
        close(st.modal_prob_mean, w("mean"), 1e-12, &format!("case {i} mean"));
        close(st.sem, w("sem"), 1e-12, &format!("case {i} sem"));
        let t = pvera::uncertainty::t_quantile(conf, (samples.len() - 1) as f64).unwrap();
        close(t, w("t"), 1e-10, &format!("case {i} t quantile"));
        let iv = f64s(&c["interval"]);
        let (lo, hi) = st.interval.unwrap();
        close(lo, iv[0], 1e-10, &format!("case {i} interval low"));
        close(hi, iv[1], 1e-10, &format!("case {i} interval high"));
        close(st.predictive_entropy, w("predictive_entropy"), 1e-12, &format!("case {i} predictive entropy"));
        close(st.expected_entropy, w("expected_entropy"), 1e-12, &format!("case {i} expected entropy"));
        close(st.mutual_information, w("mutual_information").max(0.0), 1e-12, &format!("case {i} MI"));
        close(st.variance, w("variance"), 1e-12, &format!("case {i} variance"));
        assert!(max_diff(&st.mean_probs, &f64s(&c["mean_probs"])) < 1e-14);
    }
}

#[test]
fn calibration_matches_sklearn_and_torchmetrics() {
    let j = stats_json();
    for (i, c) in j["calibration"].as_array().unwrap().iter().enumerate() {
        let probs: Vec<Vec<f64>> = c["probs"].as_array().unwrap().iter().map(f64s).collect();
        let labels: Vec<usize> = c["labels"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
        for (bins, want) in c["bins"].as_object().unwrap() {
            let cal = calibration(&probs, &labels, bins.parse().unwrap()).unwrap();
            close(cal.accuracy, c["accuracy"].as_f64().unwrap(), 0.0, &format!("case {i} accuracy"));
            close(cal.nll, c["nll"].as_f64().unwrap(), 1e-12, &format!("case {i} NLL"));
            close(cal.brier, c["brier"].as_f64().unwrap(), 1e-12, &format!("case {i} Brier"));
            // torchmetrics bins in float32: agreement to float32 precision
            close(cal.ece, want["ece"].as_f64().unwrap(), 1e-6, &format!("case {i} ECE ({bins} bins)"));
            close(cal.mce, want["mce"].as_f64().unwrap(), 1e-6, &format!("case {i} MCE ({bins} bins)"));
            assert_eq!(cal.bins.iter().map(|b| b.count).sum::<usize>(), probs.len());
        }
    }
}

#[test]
fn auroc_matches_sklearn() {
    let j = stats_json();
    for (i, c) in j["auroc"].as_array().unwrap().iter().enumerate() {
        let got = auroc(&f64s(&c["in"]), &f64s(&c["ood"])).unwrap();
        close(got, c["auroc"].as_f64().unwrap(), 1e-12, &format!("case {i} AUROC"));
    }
}

#[test]
fn no_grad_builds_no_graph_and_changes_no_output() {
    let io = io();
    let d = dir().join("mc_peft");
    let (m, reg, info) = build_base_from(&d.join("base_model.safetensors"), DType::F32, false);
    let pm = PeftModel::from_pretrained(m, reg, info, &d.join("adapter_seeded"), "default", true).unwrap();
    pm.eval().unwrap();
    pm.state().set_sampling(Sampling::Never).unwrap();
    let x = &io["x"];
    let with = pm.model().forward(x).unwrap();
    // gradients on (the default, in eval mode too, as torch): the output depends on λ
    let grads = with.sum_all().unwrap().backward().unwrap();
    let vars = pm.trainable_vars().unwrap();
    assert_eq!(vars.len(), 4, "λ_b and λ_d of lin1 and lin2");
    assert!(vars.iter().all(|v| grads.get(v.var.as_tensor()).is_some()));
    let without = pm.state().no_grad(|| pm.model().forward(x).unwrap()).unwrap();
    assert_eq!(flat_f64(&with), flat_f64(&without));
    let grads = without.sum_all().unwrap().backward().unwrap();
    assert!(vars.iter().all(|v| grads.get(v.var.as_tensor()).is_none()), "no_grad must not track λ");
    assert!(pm.state().grad_enabled(), "no_grad restores the setting");
    // mc_predict turns gradients off for its call and restores them
    run(&pm, x, &McConfig { samples: 2, ..Default::default() });
    assert!(pm.state().grad_enabled());
}

#[test]
fn logvar_overflow_is_a_named_error_and_the_mean_path_is_unaffected() {
    let io = io();
    let pm = load("adapter_seeded");
    let site = pm.registry().site("lin2").unwrap().clone();
    let (lb, ld) = site.with_slot("default", |s| (s.lambda_b().as_tensor().clone(), s.lambda_d().as_tensor().clone())).unwrap();
    // large enough that some logvar = λ_d ⊙ (A·h) exceeds 88 on these inputs
    let big: Vec<f32> = ld.to_vec1::<f32>().unwrap().iter().map(|v| v * 1e4).collect();
    site.set_lambdas("default", &lb.copy().unwrap(), &Tensor::new(big, &Device::Cpu).unwrap()).unwrap();
    pm.state().set_sampling(Sampling::Always).unwrap();
    let e = pm.model().forward(&io["x"]).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, pvera::Error::NonFinite { .. }), "{e:?}");
    assert!(msg.contains("lin2") && msg.contains("log-variance") && msg.contains("learning rate"), "{msg}");
    pm.state().set_sampling(Sampling::Never).unwrap();
    let y = pm.model().forward(&io["x"]).unwrap();
    assert!(flat_f64(&y).iter().all(|v| v.is_finite()));
    assert!(mc_predict(&pm, &io["x"], &McConfig::default(), |x: &Tensor| pm.model().forward(x)).is_err());
}
