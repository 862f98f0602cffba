//! A minimal RGB raster canvas for the PNG plots: filled rectangles (with opacity), thick and
//! dashed lines, filled circles and text in a 5x7 bitmap font (printable ASCII; anything else is
//! drawn as `?`), encoded as PNG with the `image` crate. Enough to draw a reliability diagram
//! without a font or SVG renderer dependency.

use crate::error::{Error, Result};

/// An RGB colour.
pub type Rgb = [u8; 3];

/// `#rrggbb` to RGB (black for anything else).
pub fn rgb(hex: &str) -> Rgb {
    let h = hex.trim_start_matches('#');
    let c = |i: usize| h.get(i..i + 2).and_then(|x| u8::from_str_radix(x, 16).ok()).unwrap_or(0);
    if h.len() == 6 {
        [c(0), c(2), c(4)]
    } else {
        [0, 0, 0]
    }
}

/// Horizontal placement of a text relative to its `x`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Anchor {
    /// `x` is the left edge.
    Start,
    /// `x` is the centre.
    Middle,
    /// `x` is the right edge.
    End,
}

/// An RGB image in memory.
#[derive(Clone, Debug)]
pub struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    /// A `w x h` canvas filled with `bg`.
    pub fn new(w: usize, h: usize, bg: Rgb) -> Canvas {
        let mut px = Vec::with_capacity(w * h * 3);
        for _ in 0..w * h {
            px.extend_from_slice(&bg);
        }
        Canvas { w, h, px }
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.w
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.h
    }

    /// The colour at `(x, y)`.
    pub fn pixel(&self, x: usize, y: usize) -> Option<Rgb> {
        (x < self.w && y < self.h).then(|| {
            let i = (y * self.w + x) * 3;
            [self.px[i], self.px[i + 1], self.px[i + 2]]
        })
    }

    /// Blends `c` into pixel `(x, y)` with opacity `a` (ignored outside the canvas).
    pub fn blend(&mut self, x: i64, y: i64, c: Rgb, a: f64) {
        if x < 0 || y < 0 || x as usize >= self.w || y as usize >= self.h {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        for k in 0..3 {
            let old = f64::from(self.px[i + k]);
            self.px[i + k] = (old + (f64::from(c[k]) - old) * a.clamp(0.0, 1.0)).round() as u8;
        }
    }

    /// Fills the rectangle `[x0, x1) x [y0, y1)` (pixel centres inside it).
    pub fn fill_rect(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb, a: f64) {
        let (xa, xb) = (x0.min(x1).round() as i64, x0.max(x1).round() as i64);
        let (ya, yb) = (y0.min(y1).round() as i64, y0.max(y1).round() as i64);
        for y in ya..yb {
            for x in xa..xb {
                self.blend(x, y, c, a);
            }
        }
    }

    /// The outline of a rectangle, `width` pixels wide.
    pub fn stroke_rect(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb, width: f64) {
        self.line(x0, y0, x1, y0, c, width);
        self.line(x1, y0, x1, y1, c, width);
        self.line(x1, y1, x0, y1, c, width);
        self.line(x0, y1, x0, y0, c, width);
    }

    /// A filled disc of radius `r` centred at `(cx, cy)`.
    pub fn disc(&mut self, cx: f64, cy: f64, r: f64, c: Rgb) {
        let (xa, xb) = ((cx - r).floor() as i64, (cx + r).ceil() as i64);
        let (ya, yb) = ((cy - r).floor() as i64, (cy + r).ceil() as i64);
        for y in ya..=yb {
            for x in xa..=xb {
                let (dx, dy) = (x as f64 + 0.5 - cx, y as f64 + 0.5 - cy);
                if dx * dx + dy * dy <= r * r {
                    self.blend(x, y, c, 1.0);
                }
            }
        }
    }

    /// A line `width` pixels wide (discs stamped every half pixel along it).
    pub fn line(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb, width: f64) {
        self.dashed(x0, y0, x1, y1, c, width, None);
    }

    /// A line drawn `on` pixels, skipped `off` pixels, repeatedly (`None`: solid).
    #[allow(clippy::too_many_arguments)]
    pub fn dashed(&mut self, x0: f64, y0: f64, x1: f64, y1: f64, c: Rgb, width: f64, dash: Option<(f64, f64)>) {
        let len = ((x1 - x0).powi(2) + (y1 - y0).powi(2)).sqrt();
        let steps = (len * 2.0).ceil().max(1.0) as usize;
        let r = (width / 2.0).max(0.5);
        for k in 0..=steps {
            let t = k as f64 / steps as f64;
            if let Some((on, off)) = dash {
                if (t * len) % (on + off) >= on {
                    continue;
                }
            }
            let (x, y) = (x0 + (x1 - x0) * t, y0 + (y1 - y0) * t);
            if r <= 0.75 {
                self.blend(x.floor() as i64, y.floor() as i64, c, 1.0);
            } else {
                self.disc(x, y, r, c);
            }
        }
    }

    /// Width in pixels of `text` at `scale`.
    pub fn text_width(text: &str, scale: usize) -> usize {
        text.chars().count() * 6 * scale
    }

    /// Text at `scale` (5x7 glyphs in 6x8 cells), baseline-ish at `y` (the glyph's bottom row),
    /// placed by `anchor`.
    pub fn text(&mut self, x: f64, y: f64, text: &str, c: Rgb, scale: usize, anchor: Anchor) {
        let w = Self::text_width(text, scale) as f64;
        let left = match anchor {
            Anchor::Start => x,
            Anchor::Middle => x - w / 2.0,
            Anchor::End => x - w,
        };
        let top = y - 7.0 * scale as f64;
        for (i, ch) in text.chars().enumerate() {
            let g = glyph(ch);
            for (col, bits) in g.iter().enumerate() {
                for row in 0..7 {
                    if bits >> row & 1 == 1 {
                        let gx = left + ((i * 6 + col) * scale) as f64;
                        let gy = top + (row * scale) as f64;
                        self.fill_rect(gx, gy, gx + scale as f64, gy + scale as f64, c, 1.0);
                    }
                }
            }
        }
    }

    /// Text rotated 90° counter-clockwise (reading upwards), centred on `(x, y)`.
    pub fn text_up(&mut self, x: f64, y: f64, text: &str, c: Rgb, scale: usize) {
        let w = Self::text_width(text, scale) as f64;
        let bottom = y + w / 2.0;
        let left = x - 3.5 * scale as f64;
        for (i, ch) in text.chars().enumerate() {
            let g = glyph(ch);
            for (col, bits) in g.iter().enumerate() {
                for row in 0..7 {
                    if bits >> row & 1 == 1 {
                        // glyph column -> up the canvas, glyph row -> right
                        let gy = bottom - ((i * 6 + col + 1) * scale) as f64;
                        let gx = left + (row * scale) as f64;
                        self.fill_rect(gx, gy, gx + scale as f64, gy + scale as f64, c, 1.0);
                    }
                }
            }
        }
    }

    /// The canvas as PNG bytes.
    pub fn to_png(&self) -> Result<Vec<u8>> {
        let img = image::RgbImage::from_raw(self.w as u32, self.h as u32, self.px.clone())
            .ok_or_else(|| Error::Model("raster: pixel buffer does not match the canvas size".into()))?;
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).map_err(|e| Error::Model(format!("encoding PNG: {e}")))?;
        Ok(out.into_inner())
    }
}

/// Columns of a 5x7 glyph, bit 0 = top row.
fn glyph(ch: char) -> [u8; 5] {
    let code = ch as u32;
    if (0x20..0x7f).contains(&code) {
        FONT[(code - 0x20) as usize]
    } else {
        FONT[('?' as u32 - 0x20) as usize]
    }
}

/// The classic 5x7 LCD font, printable ASCII 0x20..=0x7e, column-major.
const FONT: [[u8; 5]; 95] = [
    [0x00, 0x00, 0x00, 0x00, 0x00], // ' '
    [0x00, 0x00, 0x5f, 0x00, 0x00], // !
    [0x00, 0x07, 0x00, 0x07, 0x00], // "
    [0x14, 0x7f, 0x14, 0x7f, 0x14], // #
    [0x24, 0x2a, 0x7f, 0x2a, 0x12], // $
    [0x23, 0x13, 0x08, 0x64, 0x62], // %
    [0x36, 0x49, 0x56, 0x20, 0x50], // &
    [0x00, 0x05, 0x03, 0x00, 0x00], // '
    [0x00, 0x1c, 0x22, 0x41, 0x00], // (
    [0x00, 0x41, 0x22, 0x1c, 0x00], // )
    [0x14, 0x08, 0x3e, 0x08, 0x14], // *
    [0x08, 0x08, 0x3e, 0x08, 0x08], // +
    [0x00, 0x50, 0x30, 0x00, 0x00], // ,
    [0x08, 0x08, 0x08, 0x08, 0x08], // -
    [0x00, 0x60, 0x60, 0x00, 0x00], // .
    [0x20, 0x10, 0x08, 0x04, 0x02], // /
    [0x3e, 0x51, 0x49, 0x45, 0x3e], // 0
    [0x00, 0x42, 0x7f, 0x40, 0x00], // 1
    [0x42, 0x61, 0x51, 0x49, 0x46], // 2
    [0x21, 0x41, 0x45, 0x4b, 0x31], // 3
    [0x18, 0x14, 0x12, 0x7f, 0x10], // 4
    [0x27, 0x45, 0x45, 0x45, 0x39], // 5
    [0x3c, 0x4a, 0x49, 0x49, 0x30], // 6
    [0x01, 0x71, 0x09, 0x05, 0x03], // 7
    [0x36, 0x49, 0x49, 0x49, 0x36], // 8
    [0x06, 0x49, 0x49, 0x29, 0x1e], // 9
    [0x00, 0x36, 0x36, 0x00, 0x00], // :
    [0x00, 0x56, 0x36, 0x00, 0x00], // ;
    [0x08, 0x14, 0x22, 0x41, 0x00], // <
    [0x14, 0x14, 0x14, 0x14, 0x14], // =
    [0x00, 0x41, 0x22, 0x14, 0x08], // >
    [0x02, 0x01, 0x51, 0x09, 0x06], // ?
    [0x32, 0x49, 0x79, 0x41, 0x3e], // @
    [0x7e, 0x11, 0x11, 0x11, 0x7e], // A
    [0x7f, 0x49, 0x49, 0x49, 0x36], // B
    [0x3e, 0x41, 0x41, 0x41, 0x22], // C
    [0x7f, 0x41, 0x41, 0x22, 0x1c], // D
    [0x7f, 0x49, 0x49, 0x49, 0x41], // E
    [0x7f, 0x09, 0x09, 0x09, 0x01], // F
    [0x3e, 0x41, 0x49, 0x49, 0x7a], // G
    [0x7f, 0x08, 0x08, 0x08, 0x7f], // H
    [0x00, 0x41, 0x7f, 0x41, 0x00], // I
    [0x20, 0x40, 0x41, 0x3f, 0x01], // J
    [0x7f, 0x08, 0x14, 0x22, 0x41], // K
    [0x7f, 0x40, 0x40, 0x40, 0x40], // L
    [0x7f, 0x02, 0x0c, 0x02, 0x7f], // M
    [0x7f, 0x04, 0x08, 0x10, 0x7f], // N
    [0x3e, 0x41, 0x41, 0x41, 0x3e], // O
    [0x7f, 0x09, 0x09, 0x09, 0x06], // P
    [0x3e, 0x41, 0x51, 0x21, 0x5e], // Q
    [0x7f, 0x09, 0x19, 0x29, 0x46], // R
    [0x46, 0x49, 0x49, 0x49, 0x31], // S
    [0x01, 0x01, 0x7f, 0x01, 0x01], // T
    [0x3f, 0x40, 0x40, 0x40, 0x3f], // U
    [0x1f, 0x20, 0x40, 0x20, 0x1f], // V
    [0x3f, 0x40, 0x38, 0x40, 0x3f], // W
    [0x63, 0x14, 0x08, 0x14, 0x63], // X
    [0x07, 0x08, 0x70, 0x08, 0x07], // Y
    [0x61, 0x51, 0x49, 0x45, 0x43], // Z
    [0x00, 0x7f, 0x41, 0x41, 0x00], // [
    [0x02, 0x04, 0x08, 0x10, 0x20], // backslash
    [0x00, 0x41, 0x41, 0x7f, 0x00], // ]
    [0x04, 0x02, 0x01, 0x02, 0x04], // ^
    [0x40, 0x40, 0x40, 0x40, 0x40], // _
    [0x00, 0x01, 0x02, 0x04, 0x00], // `
    [0x20, 0x54, 0x54, 0x54, 0x78], // a
    [0x7f, 0x48, 0x44, 0x44, 0x38], // b
    [0x38, 0x44, 0x44, 0x44, 0x20], // c
    [0x38, 0x44, 0x44, 0x48, 0x7f], // d
    [0x38, 0x54, 0x54, 0x54, 0x18], // e
    [0x08, 0x7e, 0x09, 0x01, 0x02], // f
    [0x0c, 0x52, 0x52, 0x52, 0x3e], // g
    [0x7f, 0x08, 0x04, 0x04, 0x78], // h
    [0x00, 0x44, 0x7d, 0x40, 0x00], // i
    [0x20, 0x40, 0x44, 0x3d, 0x00], // j
    [0x7f, 0x10, 0x28, 0x44, 0x00], // k
    [0x00, 0x41, 0x7f, 0x40, 0x00], // l
    [0x7c, 0x04, 0x18, 0x04, 0x78], // m
    [0x7c, 0x08, 0x04, 0x04, 0x78], // n
    [0x38, 0x44, 0x44, 0x44, 0x38], // o
    [0x7c, 0x14, 0x14, 0x14, 0x08], // p
    [0x08, 0x14, 0x14, 0x18, 0x7c], // q
    [0x7c, 0x08, 0x04, 0x04, 0x08], // r
    [0x48, 0x54, 0x54, 0x54, 0x20], // s
    [0x04, 0x3f, 0x44, 0x40, 0x20], // t
    [0x3c, 0x40, 0x40, 0x20, 0x7c], // u
    [0x1c, 0x20, 0x40, 0x20, 0x1c], // v
    [0x3c, 0x40, 0x30, 0x40, 0x3c], // w
    [0x44, 0x28, 0x10, 0x28, 0x44], // x
    [0x0c, 0x50, 0x50, 0x50, 0x3c], // y
    [0x44, 0x64, 0x54, 0x4c, 0x44], // z
    [0x00, 0x08, 0x36, 0x41, 0x00], // {
    [0x00, 0x00, 0x7f, 0x00, 0x00], // |
    [0x00, 0x41, 0x36, 0x08, 0x00], // }
    [0x08, 0x04, 0x08, 0x10, 0x08], // ~
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drawing_lands_where_asked() {
        let mut c = Canvas::new(40, 20, [255, 255, 255]);
        c.fill_rect(2.0, 2.0, 6.0, 6.0, [255, 0, 0], 1.0);
        assert_eq!(c.pixel(3, 3), Some([255, 0, 0]));
        assert_eq!(c.pixel(7, 7), Some([255, 255, 255]));
        c.fill_rect(10.0, 2.0, 12.0, 4.0, [0, 0, 0], 0.5);
        assert_eq!(c.pixel(10, 2), Some([128, 128, 128]));
        c.line(0.0, 15.0, 39.0, 15.0, [0, 0, 255], 1.0);
        assert_eq!(c.pixel(20, 15), Some([0, 0, 255]));
        // "I": the middle column is a full vertical bar
        c.text(30.0, 9.0, "I", [0, 128, 0], 1, Anchor::Start);
        assert_eq!(c.pixel(32, 5), Some([0, 128, 0]));
        assert_eq!(rgb("#1f77b4"), [0x1f, 0x77, 0xb4]);
        let png = c.to_png().unwrap();
        let back = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!((back.width(), back.height()), (40, 20));
        assert_eq!(back.get_pixel(3, 3).0, [255, 0, 0]);
    }
}
