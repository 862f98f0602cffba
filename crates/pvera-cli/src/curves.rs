//! The training run's record files: `metrics.csv`, `metrics.json` and `training_curve.svg`
//! (loss and validation accuracy per epoch, a hand-written SVG), written atomically.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::Result;
use pvera::checkpoint::write_atomic;
use pvera::train::EpochMetrics;

pub fn write_curves(out: &Path, epochs: &[EpochMetrics]) -> Result<()> {
    let mut csv = String::from(
        "epoch,step,train_loss,train_kl,train_accuracy,val_loss,val_accuracy,lr,seconds,examples_per_sec,is_best\n",
    );
    let o = |v: Option<f64>| v.map_or(String::new(), |x| format!("{x}"));
    for m in epochs {
        let _ = writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{},{}",
            m.epoch,
            m.step,
            m.train_loss,
            o(m.train_kl),
            o(m.train_accuracy),
            o(m.val_loss),
            o(m.val_accuracy),
            m.lr,
            m.seconds,
            m.examples_per_sec,
            m.is_best
        );
    }
    write_atomic(&out.join("metrics.csv"), csv.as_bytes())?;
    write_atomic(&out.join("training_curve.svg"), training_curve_svg(epochs).as_bytes())?;
    let json = serde_json::json!({ "epochs": epochs });
    write_atomic(&out.join("metrics.json"), (serde_json::to_string_pretty(&json)? + "\n").as_bytes())?;
    Ok(())
}

/// A hand-written SVG: train / validation loss (left axis) and validation accuracy (right axis,
/// 0..1) per epoch.
pub fn training_curve_svg(epochs: &[EpochMetrics]) -> String {
    let (w, h) = (720.0f64, 400.0f64);
    let (l, r, t, b) = (70.0, 70.0, 40.0, 50.0);
    let pw = w - l - r;
    let ph = h - t - b;
    let n = epochs.len().max(1);
    let x_of = |e: usize| if n == 1 { l + pw / 2.0 } else { l + pw * (e as f64 - 1.0) / (n as f64 - 1.0) };
    let losses: Vec<f64> = epochs
        .iter()
        .flat_map(|m| [Some(m.train_loss), m.val_loss])
        .flatten()
        .filter(|v| v.is_finite())
        .collect();
    let lmax = losses.iter().copied().fold(0.0f64, f64::max).max(1e-6) * 1.05;
    let y_loss = |v: f64| t + ph * (1.0 - v / lmax);
    let y_acc = |v: f64| t + ph * (1.0 - v);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">pvera train: loss and validation accuracy</text>"#, w / 2.0);
    let _ = writeln!(s, r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    for k in 0..=4 {
        let f = k as f64 / 4.0;
        let y = t + ph * (1.0 - f);
        let _ = writeln!(s, r##"<line x1="{l}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/>"##, l + pw);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{:.3}</text>"#, l - 6.0, y + 4.0, lmax * f);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}">{:.2}</text>"#, l + pw + 6.0, y + 4.0, f);
    }
    for m in epochs {
        let x = x_of(m.epoch.saturating_sub(epochs[0].epoch) + 1);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{}</text>"#, t + ph + 18.0, m.epoch);
    }
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">epoch</text>"#, l + pw / 2.0, h - 8.0);
    let _ = writeln!(s, r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">loss</text>"#, t + ph / 2.0, t + ph / 2.0);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle" transform="rotate(90 {} {})">accuracy</text>"#, w - 14.0, t + ph / 2.0, w - 14.0, t + ph / 2.0);
    let series: [(&str, &str, &str, Box<dyn Fn(&EpochMetrics) -> Option<f64>>, bool); 3] = [
        ("train loss", "#1f77b4", "", Box::new(|m| Some(m.train_loss)), false),
        ("val loss", "#ff7f0e", "", Box::new(|m| m.val_loss), false),
        ("val accuracy", "#2ca02c", r#" stroke-dasharray="6 4""#, Box::new(|m| m.val_accuracy), true),
    ];
    for (i, (name, color, dash, get, acc)) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = epochs
            .iter()
            .filter_map(|m| {
                let v = get(m)?;
                v.is_finite().then(|| {
                    (x_of(m.epoch.saturating_sub(epochs[0].epoch) + 1), if *acc { y_acc(v) } else { y_loss(v) })
                })
            })
            .collect();
        if pts.is_empty() {
            continue;
        }
        let p: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"{dash}/>"#, p.join(" "));
        for (x, y) in &pts {
            let _ = writeln!(s, r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{color}"/>"#);
        }
        let ly = t + 14.0 + 16.0 * i as f64;
        let lx = l + 10.0;
        let _ = writeln!(s, r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/>"#, lx + 22.0);
        let _ = writeln!(s, r#"<text x="{}" y="{}">{name}</text>"#, lx + 28.0, ly + 4.0);
    }
    s.push_str("</svg>\n");
    s
}
