//! `pvera inspect DIR`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pvera::checkpoint::{self, AdapterFiles, PROJ_A_KEY, PROJ_B_KEY};
use pvera::peft_model::{format_trainable_line, group_thousands};
use pvera::projection::generate_raw;
use pvera::TorchKernel;
use serde_json::{json, Value};

/// Arguments of `pvera inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors). Adapters
    /// saved under other names live in sub-directories; they are listed and inspected too.
    pub dir: PathBuf,
    /// Regenerate pvera_A / pvera_B from projection_prng_key and compare them bit for bit with
    /// the stored ones: exit 0 when identical, 3 when not.
    #[arg(long)]
    pub verify_projections: bool,
    /// Number of base-model parameters, to print PEFT's full print_trainable_parameters line.
    #[arg(long)]
    pub base_params: Option<usize>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

struct Verify {
    stored: bool,
    fma_diff: usize,
    default_diff: usize,
    total: usize,
}

fn inspect_one(dir: &Path, args: &Args) -> Result<(Value, Option<Verify>)> {
    let files: AdapterFiles = checkpoint::read_adapter_dir(dir, &candle_core::Device::Cpu)
        .with_context(|| format!("reading adapter directory {}", dir.display()))?;
    let cfg = &files.config;
    let mut tensors = Vec::new();
    let mut trainable = 0usize;
    for (k, t) in &files.tensors {
        let n: usize = t.tensor.dims().iter().product();
        if k != PROJ_A_KEY && k != PROJ_B_KEY {
            trainable += n;
        }
        tensors.push(json!({"name": k, "dtype": t.file_dtype, "shape": t.tensor.dims()}));
    }
    let verify = if args.verify_projections { Some(verify(&files)?) } else { None };
    let mut v = json!({
        "dir": dir.display().to_string(),
        "config": serde_json::from_str::<Value>(&cfg.to_json_string())?,
        "metadata": files.metadata,
        "tensors": tensors,
        "trainable_params": trainable,
        "warnings": cfg.save_warnings(),
    });
    if let Some(b) = args.base_params {
        v["print_trainable_parameters"] = json!(format_trainable_line(trainable, b + trainable));
    }
    if let Some(ver) = &verify {
        v["verify_projections"] = json!({
            "stored_projections": ver.stored,
            "elements": ver.total,
            "differ_fma_kernel": ver.fma_diff,
            "differ_two_rounding_kernel": ver.default_diff,
            "identical": ver.stored && ver.fma_diff == 0,
            "two_rounding_kernel_matches": ver.stored && ver.default_diff == 0,
        });
    }
    Ok((v, verify))
}

fn verify(files: &AdapterFiles) -> Result<Verify> {
    let (Some(a), Some(b)) = (files.tensors.get(PROJ_A_KEY), files.tensors.get(PROJ_B_KEY)) else {
        return Ok(Verify { stored: false, fma_diff: 0, default_diff: 0, total: 0 });
    };
    let a_dims = a.tensor.dims().to_vec();
    let b_dims = b.tensor.dims().to_vec();
    anyhow::ensure!(
        a_dims.len() == 2 && b_dims.len() == 2 && a_dims[0] == 2 * b_dims[1],
        "{}: pvera_A {:?} and pvera_B {:?} are not (2r, in) and (out, r)",
        files.weights_path.display(),
        a_dims,
        b_dims
    );
    let (r, in_max, out_max) = (b_dims[1], a_dims[1], b_dims[0]);
    let key = files.config.projection_seed();
    let stored_a = to_f32(&a.tensor)?;
    let stored_b = to_f32(&b.tensor)?;
    let diff = |kernel| {
        let (ga, gb) = generate_raw(key, r, in_max, out_max, kernel);
        bit_diff(&stored_a, &ga) + bit_diff(&stored_b, &gb)
    };
    Ok(Verify {
        stored: true,
        fma_diff: diff(TorchKernel::Avx2),
        default_diff: diff(TorchKernel::Default),
        total: stored_a.len() + stored_b.len(),
    })
}

fn to_f32(t: &candle_core::Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn bit_diff(x: &[f32], y: &[f32]) -> usize {
    x.iter().zip(y).filter(|(a, b)| a.to_bits() != b.to_bits()).count() + x.len().abs_diff(y.len())
}

fn sub_adapters(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir() && p.join(checkpoint::CONFIG_NAME).is_file())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Runs the command; returns the exit code.
pub fn run(args: Args) -> Result<u8> {
    let mut dirs = Vec::new();
    if args.dir.join(checkpoint::CONFIG_NAME).is_file() {
        dirs.push(args.dir.clone());
    }
    dirs.extend(sub_adapters(&args.dir));
    if dirs.is_empty() {
        // Let the library produce its precise error for the top directory.
        dirs.push(args.dir.clone());
    }
    let mut reports = Vec::new();
    let mut mismatch = false;
    for d in &dirs {
        let (v, ver) = inspect_one(d, &args)?;
        if let Some(ver) = ver {
            if ver.stored && ver.fma_diff != 0 {
                mismatch = true;
            }
        }
        reports.push(v);
    }
    if args.json {
        let out = if reports.len() == 1 { reports.remove(0) } else { json!({"adapters": reports}) };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        for v in &reports {
            print_human(v);
        }
    }
    Ok(if mismatch { 3 } else { 0 })
}

fn print_human(v: &Value) {
    println!("adapter: {}", v["dir"].as_str().unwrap_or(""));
    println!("config:");
    if let Some(obj) = v["config"].as_object() {
        for (k, val) in obj {
            println!("  {k:<26} {val}");
        }
    }
    println!("tensors:");
    if let Some(ts) = v["tensors"].as_array() {
        let w = ts.iter().filter_map(|t| t["name"].as_str()).map(str::len).max().unwrap_or(10);
        for t in ts {
            println!(
                "  {:<w$}  {:<5} {}",
                t["name"].as_str().unwrap_or(""),
                t["dtype"].as_str().unwrap_or(""),
                t["shape"],
                w = w
            );
        }
    }
    let trainable = v["trainable_params"].as_u64().unwrap_or(0) as usize;
    match v["print_trainable_parameters"].as_str() {
        Some(line) => println!("{line}"),
        None => println!(
            "trainable params: {} (pass --base-params N for PEFT's full print_trainable_parameters line)",
            group_thousands(trainable)
        ),
    }
    if let Some(ws) = v["warnings"].as_array() {
        for w in ws {
            println!("warning: {}", w.as_str().unwrap_or(""));
        }
    }
    if let Some(ver) = v.get("verify_projections") {
        if !ver["stored_projections"].as_bool().unwrap_or(false) {
            println!(
                "verify-projections: the file stores no pvera_A/pvera_B (save_projection=false); \
                 they are regenerated from projection_prng_key on load; nothing to compare"
            );
        } else {
            let total = ver["elements"].as_u64().unwrap_or(0);
            let fma = ver["differ_fma_kernel"].as_u64().unwrap_or(0);
            let dflt = ver["differ_two_rounding_kernel"].as_u64().unwrap_or(0);
            if fma == 0 {
                println!(
                    "verify-projections: IDENTICAL: all {total} elements equal the projections \
                     regenerated from projection_prng_key (PyTorch AVX2/FMA kernel); \
                     save_projection=false is safe for this adapter"
                );
            } else {
                println!(
                    "verify-projections: DIFFERENT: {fma} of {total} elements differ from the \
                     projections regenerated with PyTorch's AVX2/FMA kernel"
                );
                if dflt == 0 {
                    println!(
                        "  the two-rounding (ATEN_CPU_CAPABILITY=default) kernel reproduces them \
                         exactly: the adapter was made on a CPU without AVX2; keep \
                         save_projection=true, or load with the two-rounding kernel"
                    );
                } else {
                    println!(
                        "  the two-rounding kernel differs too ({dflt} elements): the projections \
                         were not drawn from this key (or were trained/modified); keep \
                         save_projection=true"
                    );
                }
            }
        }
    }
    println!();
}
