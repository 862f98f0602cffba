//! `pvera inspect DIR`: the adapter's config, tensors and counts, and every problem that would
//! keep it from loading (the checks are `pvera::validate`'s; this file only renders them).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pvera::checkpoint::{self, proj_a_key, proj_a_name, proj_b_key, proj_b_name};
use pvera::models::loader::{resolve_model_dir, ModelDir};
use pvera::peft_model::{format_trainable_line, group_thousands};
use pvera::validate::{self, AdapterReport, Problem, Severity};
use serde_json::{json, Value};

/// Arguments of `pvera inspect`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors). Adapters
    /// saved under other names live in sub-directories; they are listed and inspected too.
    pub dir: PathBuf,
    /// Regenerate pvera_A / pvera_B (VeRA: vera_A / vera_B) from projection_prng_key and compare them bit for bit with
    /// the stored ones: exit 0 when identical, 3 when not (unless the adapter has errors).
    #[arg(long)]
    pub verify_projections: bool,
    /// Also load the adapter onto this model (a Hugging Face model directory or a cached hub id)
    /// and report the load's error: targets the model lacks, λ's that do not fit its layers.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Number of base-model parameters, to print PEFT's full print_trainable_parameters line.
    #[arg(long)]
    pub base_params: Option<usize>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// One problem as printed: the library's finding with the exit code it maps to.
struct Rendered {
    severity: Severity,
    class: &'static str,
    message: String,
    exit_code: u8,
}

fn render(p: Problem) -> Rendered {
    let (severity, class, message) = (p.severity(), p.class(), p.message());
    let exit_code = match p {
        Problem::Error(e) => crate::exit_code_for(&anyhow::Error::new(e)),
        Problem::Warning(_) | Problem::Info(_) => 0,
    };
    Rendered { severity, class, message, exit_code }
}

fn inspect_one(report: AdapterReport, args: &Args) -> Result<(Value, Vec<Rendered>)> {
    let mut tensors = Vec::new();
    for (k, t) in &report.tensors {
        tensors.push(json!({"name": k, "dtype": t.file_dtype, "shape": t.tensor.dims()}));
    }
    let trainable = report.trainable_params();
    let config = match &report.config {
        Some(c) => serde_json::from_str::<Value>(&c.to_json_string())?,
        None => Value::Null,
    };
    let warnings = report.config.as_ref().map(|c| c.save_warnings()).unwrap_or_default();
    let method = report.method;
    let mut v = json!({
        "dir": report.dir.display().to_string(),
        "method": method.name(),
        "config": config,
        "metadata": report.metadata,
        "tensors": tensors,
        "trainable_params": trainable,
        "warnings": warnings,
    });
    if let Some(b) = args.base_params {
        v["print_trainable_parameters"] = json!(format_trainable_line(trainable, b + trainable));
    }
    if args.verify_projections {
        let stored = report.tensors.contains_key(proj_a_key(method)) && report.tensors.contains_key(proj_b_key(method));
        let names = [proj_a_name(method), proj_b_name(method)];
        let a_rows = if method.samples() { "2r" } else { "r" };
        v["verify_projections"] = match report.projections {
            Some(c) => json!({
                "stored_projections": true,
                "comparable": true,
                "elements": c.elements,
                "differ_fma_kernel": c.differ_fma_kernel,
                "differ_two_rounding_kernel": c.differ_two_rounding_kernel,
                "identical": c.differ_fma_kernel == 0,
                "two_rounding_kernel_matches": c.differ_two_rounding_kernel == 0,
                "rounded_to": c.rounded_to,
                "projections": names,
            }),
            None => json!({
                "stored_projections": stored,
                "comparable": false,
                "identical": false,
                "two_rounding_kernel_matches": false,
                "projections": names,
                "a_rows": a_rows,
            }),
        };
    }
    let problems: Vec<Rendered> = report.problems.into_iter().map(render).collect();
    v["problems"] = problems
        .iter()
        .map(|p| json!({"severity": p.severity.as_str(), "class": p.class, "message": p.message, "exit_code": p.exit_code}))
        .collect();
    v["would_load"] = json!(!problems.iter().any(|p| p.severity == Severity::Error));
    Ok((v, problems))
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

/// Runs the command; returns the exit code: the first error's (the one loading would stop at),
/// else 3 when `--verify-projections` found stored projections that differ, else 0.
pub fn run(args: Args) -> Result<u8> {
    let model = match &args.model {
        Some(m) => {
            let resolved = resolve_model_dir(m)?;
            Some(ModelDir::open(&resolved)?)
        }
        None => None,
    };
    let mut dirs = Vec::new();
    if args.dir.join(checkpoint::CONFIG_NAME).is_file() {
        dirs.push(args.dir.clone());
    }
    dirs.extend(sub_adapters(&args.dir));
    if dirs.is_empty() {
        // The checks report precisely what is missing in the top directory.
        dirs.push(args.dir.clone());
    }
    let mut reports = Vec::new();
    let mut first_error: Option<(PathBuf, Rendered, usize)> = None;
    let mut mismatch = false;
    for d in &dirs {
        let report = match &model {
            Some(m) => validate::validate_with_model(d, m)
                .with_context(|| format!("building the model of --model {}", m.path.display()))?,
            None => validate::validate_adapter_dir(d),
        };
        if report.projections.is_some_and(|c| c.differ_fma_kernel != 0) {
            mismatch = true;
        }
        let (v, problems) = inspect_one(report, &args)?;
        let n_errors = problems.iter().filter(|p| p.severity == Severity::Error).count();
        if first_error.is_none() {
            if let Some(p) = problems.into_iter().find(|p| p.severity == Severity::Error) {
                first_error = Some((d.clone(), p, n_errors));
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
    if let Some((dir, p, n)) = first_error {
        eprintln!(
            "error: {}: the adapter would not load ({n} error(s); first: {}); all problems are listed \
             above",
            dir.display(),
            p.message
        );
        return Ok(p.exit_code);
    }
    Ok(if args.verify_projections && mismatch { 3 } else { 0 })
}

fn print_human(v: &Value) {
    println!("adapter: {}", v["dir"].as_str().unwrap_or(""));
    println!("config:");
    match v["config"].as_object() {
        Some(obj) => {
            for (k, val) in obj {
                println!("  {k:<26} {val}");
            }
        }
        None => println!("  (unreadable: see the problems below)"),
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
        print_verify(ver);
    }
    match v["problems"].as_array() {
        Some(ps) if !ps.is_empty() => {
            println!("problems:");
            for p in ps {
                let sev = p["severity"].as_str().unwrap_or("");
                let class = p["class"].as_str().unwrap_or("");
                let code = match p["exit_code"].as_u64() {
                    Some(c) if c != 0 => format!(", exit {c}"),
                    _ => String::new(),
                };
                println!("  {sev} [{class}{code}]: {}", p["message"].as_str().unwrap_or(""));
            }
        }
        _ => println!("problems: none"),
    }
    println!();
}

fn print_verify(ver: &Value) {
    let name = |i: usize| ver["projections"][i].as_str().unwrap_or(if i == 0 { "pvera_A" } else { "pvera_B" }).to_string();
    let (a, b) = (name(0), name(1));
    if !ver["stored_projections"].as_bool().unwrap_or(false) {
        println!(
            "verify-projections: the file stores no {a}/{b} (save_projection=false); \
             they are regenerated from projection_prng_key on load; nothing to compare"
        );
        return;
    }
    if !ver["comparable"].as_bool().unwrap_or(false) {
        let rows = ver["a_rows"].as_str().unwrap_or("2r");
        println!(
            "verify-projections: {a}/{b} do not have the shapes ({rows}, in_max) and (out_max, r) \
             (see the problems below); nothing to compare"
        );
        return;
    }
    let total = ver["elements"].as_u64().unwrap_or(0);
    let fma = ver["differ_fma_kernel"].as_u64().unwrap_or(0);
    let dflt = ver["differ_two_rounding_kernel"].as_u64().unwrap_or(0);
    if fma == 0 {
        println!(
            "verify-projections: IDENTICAL: all {total} elements equal the projections \
             regenerated from projection_prng_key (PyTorch AVX2/FMA kernel); \
             save_projection=false is safe for this adapter"
        );
        return;
    }
    println!(
        "verify-projections: DIFFERENT: {fma} of {total} elements differ from the \
         projections regenerated with PyTorch's AVX2/FMA kernel"
    );
    if let Some(dtype) = ver["rounded_to"].as_str() {
        println!(
            "  they equal the regenerated projections rounded to {dtype}: the adapter was saved from a model in \
             {dtype} (PEFT casts the projections with the model); keep save_projection=true for \
             identical outputs"
        );
    } else if dflt == 0 {
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
