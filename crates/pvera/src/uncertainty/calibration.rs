//! Calibration of class probabilities over a labelled set: accuracy, NLL, Brier score, expected
//! (and maximum) calibration error over equal-width confidence bins, and a reliability diagram.
//!
//! Definitions (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
//! - prediction = argmax of the probabilities (first index on ties), confidence = its probability;
//! - `nll = −mean ln p[y]`, with `p[y]` floored at `1e-12` so one confident mistake cannot make it
//!   infinite (the floor is reported in the JSON); `brier = mean Σ_c (p_c − 1[c = y])²` (the
//!   multi-class form, in [0, 2]);
//! - bins: `n_bins` equal-width intervals of confidence, `(k/n, (k+1)/n]` (a confidence of exactly
//!   0 falls in the first bin); `ece = Σ_k |B_k|/N · |acc(B_k) − conf(B_k)|`, `mce = max_k` of the
//!   same gap over non-empty bins.

use std::fmt::Write as _;

use crate::error::{Error, Result};
use crate::uncertainty::stats::argmax;

/// Floor of `p[y]` in the NLL.
pub const NLL_FLOOR: f64 = 1e-12;

/// One confidence bin of a reliability diagram.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ReliabilityBin {
    /// Lower edge (exclusive, except for the first bin).
    pub low: f64,
    /// Upper edge (inclusive).
    pub high: f64,
    /// Examples whose confidence falls in the bin.
    pub count: usize,
    /// Mean confidence in the bin (NaN when empty).
    pub confidence: f64,
    /// Accuracy in the bin (NaN when empty).
    pub accuracy: f64,
}

/// Calibration figures of one set of predictions (see the module docs).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Calibration {
    /// Number of examples.
    pub examples: usize,
    /// Share of correct argmax predictions.
    pub accuracy: f64,
    /// Mean negative log-likelihood of the true class (nats).
    pub nll: f64,
    /// Multi-class Brier score.
    pub brier: f64,
    /// Expected calibration error.
    pub ece: f64,
    /// Maximum calibration error over non-empty bins.
    pub mce: f64,
    /// Mean confidence.
    pub mean_confidence: f64,
    /// The bins.
    pub bins: Vec<ReliabilityBin>,
}

/// Calibration of `probs[i][c]` against class ids `labels[i]` with `n_bins` bins.
pub fn calibration(probs: &[Vec<f64>], labels: &[usize], n_bins: usize) -> Result<Calibration> {
    if n_bins == 0 {
        return Err(Error::config("bins", "the reliability diagram needs at least 1 bin; use e.g. 15"));
    }
    if probs.len() != labels.len() {
        return Err(Error::Model(format!("calibration: {} probability rows but {} labels", probs.len(), labels.len())));
    }
    if probs.is_empty() {
        return Err(Error::Model("calibration: no examples".into()));
    }
    let n = probs.len();
    let mut counts = vec![0usize; n_bins];
    let mut conf_sum = vec![0.0f64; n_bins];
    let mut correct_sum = vec![0usize; n_bins];
    let (mut correct, mut nll, mut brier, mut conf_total) = (0usize, 0.0f64, 0.0f64, 0.0f64);
    for (i, (p, &y)) in probs.iter().zip(labels).enumerate() {
        if y >= p.len() {
            return Err(Error::Model(format!(
                "calibration: example {i} has label {y} but only {} class probabilities",
                p.len()
            )));
        }
        if let Some(v) = p.iter().find(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: format!("calibration: probabilities of example {i}"),
                count: p.iter().filter(|v| !v.is_finite()).count(),
                hint: format!(" (first bad value {v})"),
            });
        }
        let pred = argmax(p);
        let conf = p[pred];
        let ok = pred == y;
        correct += ok as usize;
        nll -= p[y].max(NLL_FLOOR).ln();
        brier += p.iter().enumerate().map(|(c, &v)| if c == y { (v - 1.0).powi(2) } else { v * v }).sum::<f64>();
        conf_total += conf;
        // (k/n, (k+1)/n]: ceil(conf * n) - 1, with 0 in the first bin.
        let k = ((conf * n_bins as f64).ceil() as usize).saturating_sub(1).min(n_bins - 1);
        counts[k] += 1;
        conf_sum[k] += conf;
        correct_sum[k] += ok as usize;
    }
    let nf = n as f64;
    let mut ece = 0.0;
    let mut mce = 0.0f64;
    let bins = (0..n_bins)
        .map(|k| {
            let (conf, acc) = if counts[k] == 0 {
                (f64::NAN, f64::NAN)
            } else {
                let c = counts[k] as f64;
                (conf_sum[k] / c, correct_sum[k] as f64 / c)
            };
            if counts[k] > 0 {
                let gap = (acc - conf).abs();
                ece += counts[k] as f64 / nf * gap;
                mce = mce.max(gap);
            }
            ReliabilityBin {
                low: k as f64 / n_bins as f64,
                high: (k + 1) as f64 / n_bins as f64,
                count: counts[k],
                confidence: conf,
                accuracy: acc,
            }
        })
        .collect();
    Ok(Calibration {
        examples: n,
        accuracy: correct as f64 / nf,
        nll: nll / nf,
        brier: brier / nf,
        ece,
        mce,
        mean_confidence: conf_total / nf,
        bins,
    })
}

/// A reliability diagram (SVG) of one or more calibrations side by side in one plot: per bin,
/// accuracy against mean confidence, the diagonal of perfect calibration, and the bin counts as a
/// histogram underneath. `curves` are (label, calibration) pairs, e.g. mean mode and Monte Carlo.
pub fn reliability_svg(title: &str, curves: &[(&str, &Calibration)]) -> String {
    const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let (w, h) = (560.0f64, 560.0f64);
    let (l, t, pw, ph) = (64.0, 44.0, 440.0, 330.0);
    let (ht, hh) = (t + ph + 56.0, 90.0); // histogram panel
    let mut s = String::new();
    let esc = |x: &str| x.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ =
        writeln!(s, r#"<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>"#, l + pw / 2.0, esc(title));
    let _ = writeln!(s, r##"<rect x="{l}" y="{t}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>"##);
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (x, y) = (l + f * pw, t + ph - f * ph);
        let _ = writeln!(s, r##"<line x1="{l}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#e5e5e5"/>"##, l + pw);
        let _ = writeln!(s, r#"<text x="{}" y="{:.1}" text-anchor="end">{f:.1}</text>"#, l - 6.0, y + 4.0);
        let _ = writeln!(s, r#"<text x="{x:.1}" y="{}" text-anchor="middle">{f:.1}</text>"#, t + ph + 16.0);
    }
    let _ = writeln!(
        s,
        r##"<line x1="{l}" y1="{}" x2="{}" y2="{t}" stroke="#888" stroke-dasharray="5,4"/>"##,
        t + ph,
        l + pw
    );
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="middle">confidence</text>"#, l + pw / 2.0, t + ph + 34.0);
    let _ = writeln!(
        s,
        r#"<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">accuracy</text>"#,
        t + ph / 2.0,
        t + ph / 2.0
    );
    let max_count = curves.iter().flat_map(|(_, c)| c.bins.iter().map(|b| b.count)).max().unwrap_or(1).max(1) as f64;
    let _ = writeln!(s, r##"<rect x="{l}" y="{ht}" width="{pw}" height="{hh}" fill="none" stroke="#444"/>"##);
    let _ = writeln!(s, r#"<text x="{}" y="{}" text-anchor="end">n</text>"#, l - 6.0, ht + hh / 2.0);
    let ncur = curves.len().max(1) as f64;
    for (ci, (name, cal)) in curves.iter().enumerate() {
        let color = COLORS[ci % COLORS.len()];
        let pts: Vec<String> = cal
            .bins
            .iter()
            .filter(|b| b.count > 0)
            .map(|b| format!("{:.1},{:.1}", l + b.confidence * pw, t + ph - b.accuracy * ph))
            .collect();
        let _ = writeln!(s, r#"<polyline points="{}" fill="none" stroke="{color}" stroke-width="2"/>"#, pts.join(" "));
        for b in cal.bins.iter().filter(|b| b.count > 0) {
            let _ = writeln!(
                s,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{color}"><title>{name}: {} example(s), confidence {:.3}, accuracy {:.3}</title></circle>"#,
                l + b.confidence * pw,
                t + ph - b.accuracy * ph,
                b.count,
                b.confidence,
                b.accuracy
            );
        }
        let nb = cal.bins.len().max(1) as f64;
        for (k, b) in cal.bins.iter().enumerate() {
            let bw = pw / nb / ncur;
            let x = l + k as f64 * pw / nb + ci as f64 * bw;
            let bh = b.count as f64 / max_count * (hh - 4.0);
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{bh:.1}" fill="{color}" fill-opacity="0.6"/>"#,
                ht + hh - bh,
                (bw - 1.0).max(0.5)
            );
        }
        let (lx, ly) = (l + 12.0, t + 18.0 + ci as f64 * 18.0);
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"/>"#,
            lx + 22.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}">{}: acc {:.3}, ECE {:.3}, NLL {:.3}</text>"#,
            lx + 28.0,
            ly + 4.0,
            esc(name),
            cal.accuracy,
            cal.ece,
            cal.nll
        );
    }
    s.push_str("</svg>\n");
    s
}

/// The reliability diagram of [`reliability_svg`] as a PNG (the same layout, curves, histogram
/// and legend, drawn at twice the SVG's size into an RGB raster with a 5x7 bitmap font; text
/// outside printable ASCII is drawn as `?`).
pub fn reliability_png(title: &str, curves: &[(&str, &Calibration)]) -> Result<Vec<u8>> {
    use crate::uncertainty::raster::{rgb, Anchor, Canvas};
    const COLORS: [&str; 4] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let k = 2.0; // pixels per SVG unit
    let (w, h) = (560.0 * k, 560.0 * k);
    let (l, t, pw, ph) = (64.0 * k, 44.0 * k, 440.0 * k, 330.0 * k);
    let (ht, hh) = (t + ph + 56.0 * k, 90.0 * k);
    let (dark, grid, grey, black) = (rgb("#444444"), rgb("#e5e5e5"), rgb("#888888"), [0, 0, 0]);
    let mut c = Canvas::new(w as usize, h as usize, [255, 255, 255]);
    c.text(l + pw / 2.0, 30.0 * k, title, black, 3, Anchor::Middle);
    for i in 0..=5 {
        let f = i as f64 / 5.0;
        let (x, y) = (l + f * pw, t + ph - f * ph);
        c.line(l, y, l + pw, y, grid, 2.0);
        c.text(l - 6.0 * k, y + 7.0, &format!("{f:.1}"), black, 2, Anchor::End);
        c.text(x, t + ph + 20.0 * k, &format!("{f:.1}"), black, 2, Anchor::Middle);
    }
    c.dashed(l, t + ph, l + pw, t, grey, 2.0, Some((10.0 * k / 2.0, 8.0 * k / 2.0)));
    c.stroke_rect(l, t, l + pw, t + ph, dark, 2.0);
    c.text(l + pw / 2.0, t + ph + 38.0 * k, "confidence", black, 2, Anchor::Middle);
    c.text_up(18.0 * k, t + ph / 2.0, "accuracy", black, 2);
    let max_count = curves.iter().flat_map(|(_, c)| c.bins.iter().map(|b| b.count)).max().unwrap_or(1).max(1) as f64;
    c.text(l - 6.0 * k, ht + hh / 2.0 + 7.0, "n", black, 2, Anchor::End);
    let ncur = curves.len().max(1) as f64;
    for (ci, (name, cal)) in curves.iter().enumerate() {
        let color = rgb(COLORS[ci % COLORS.len()]);
        let nb = cal.bins.len().max(1) as f64;
        for (kb, b) in cal.bins.iter().enumerate() {
            let bw = pw / nb / ncur;
            let x = l + kb as f64 * pw / nb + ci as f64 * bw;
            let bh = b.count as f64 / max_count * (hh - 4.0 * k);
            c.fill_rect(x, ht + hh - bh, x + (bw - k).max(k / 2.0), ht + hh, color, 0.6);
        }
        let pts: Vec<(f64, f64)> = cal
            .bins
            .iter()
            .filter(|b| b.count > 0)
            .map(|b| (l + b.confidence * pw, t + ph - b.accuracy * ph))
            .collect();
        for w2 in pts.windows(2) {
            c.line(w2[0].0, w2[0].1, w2[1].0, w2[1].1, color, 2.0 * k);
        }
        for &(x, y) in &pts {
            c.disc(x, y, 3.5 * k, color);
        }
        let (lx, ly) = (l + 12.0 * k, t + 18.0 * k + ci as f64 * 18.0 * k);
        c.line(lx, ly, lx + 22.0 * k, ly, color, 2.0 * k);
        let legend = format!("{name}: acc {:.3}, ECE {:.3}, NLL {:.3}", cal.accuracy, cal.ece, cal.nll);
        c.text(lx + 28.0 * k, ly + 7.0, &legend, black, 2, Anchor::Start);
    }
    c.stroke_rect(l, ht, l + pw, ht + hh, dark, 2.0);
    c.to_png()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perfectly_confident_and_right_is_calibrated() {
        let p = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let c = calibration(&p, &[0, 1], 10).unwrap();
        assert_eq!((c.accuracy, c.ece, c.brier), (1.0, 0.0, 0.0));
        assert_eq!(c.bins[9].count, 2);
        assert!(c.nll.abs() < 1e-15);
    }

    #[test]
    fn bin_edges_are_right_closed() {
        // confidence 0.5 belongs to (0.4, 0.5] with 10 bins; 0.55 to (0.5, 0.6].
        let p = vec![vec![0.5, 0.5], vec![0.55, 0.45]];
        let c = calibration(&p, &[1, 0], 10).unwrap();
        assert_eq!(c.bins[4].count, 1);
        assert_eq!(c.bins[5].count, 1);
        // first example predicted class 0 (first on ties) but label 1.
        assert_eq!(c.bins[4].accuracy, 0.0);
        assert!((c.ece - (0.5 * 0.5 + 0.5 * 0.45)).abs() < 1e-12);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(calibration(&[vec![0.5, 0.5]], &[2], 10).is_err());
        assert!(calibration(&[vec![0.5, 0.5]], &[0, 1], 10).is_err());
        assert!(calibration(&[], &[], 10).is_err());
        assert!(calibration(&[vec![0.5, 0.5]], &[0], 0).is_err());
        assert!(calibration(&[vec![f64::NAN, 0.5]], &[0], 10).is_err());
    }

    #[test]
    fn png_decodes_and_draws_the_curves_where_the_svg_does() {
        let c = calibration(&[vec![0.9, 0.1], vec![0.3, 0.7], vec![0.6, 0.4]], &[0, 0, 0], 5).unwrap();
        let png = reliability_png("reliability: test", &[("mean", &c)]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!((img.width(), img.height()), (1120, 1120));
        // the first non-empty bin's point: x = l + conf·pw, y = t + ph − acc·ph (SVG units x 2)
        let b = c.bins.iter().find(|b| b.count > 0).unwrap();
        let (x, y) = (2.0 * (64.0 + b.confidence * 440.0), 2.0 * (44.0 + 330.0 - b.accuracy * 330.0));
        assert_eq!(img.get_pixel(x as u32, y as u32).0, [0x1f, 0x77, 0xb4]);
        // white background in a corner, the frame in dark grey
        assert_eq!(img.get_pixel(2, 2).0, [255, 255, 255]);
        assert_eq!(img.get_pixel(2 * 64 + 200, 2 * 44).0, [0x44, 0x44, 0x44]);
    }

    #[test]
    fn svg_has_one_curve_per_calibration() {
        let c = calibration(&[vec![0.9, 0.1], vec![0.3, 0.7]], &[0, 0], 5).unwrap();
        let svg = reliability_svg("t<1>", &[("mean", &c), ("mc", &c)]);
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("t&lt;1&gt;"));
    }
}
