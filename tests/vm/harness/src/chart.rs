//! The demo table drawn as a PNG: a title, then one horizontal bar panel per
//! measure ("MB sent", "downtime (ms)", "total migration time (ms)"), one bar
//! per migration setup with its label on the left and its value at the end.
//!
//! Text is rasterised by plotters' pure-Rust `ab_glyph` backend, which has no
//! font of its own: DejaVu Sans (Debian package `fonts-dejavu-core`) is read
//! from a few well-known paths and registered once per process.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ab_glyph::{Font, FontRef, ScaleFont};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

/// One bar group of the chart: a migration setup.
#[derive(Clone, Debug)]
pub struct ChartRow {
    /// The setup, e.g. "freehint.ko + QEMU hints".
    pub label: String,
    /// Megabytes the migration sent; `None` while pending.
    pub mb_sent: Option<f64>,
    /// Downtime in milliseconds; `None` while pending.
    pub downtime_ms: Option<f64>,
    /// Total migration time in milliseconds; `None` while pending.
    pub total_ms: Option<f64>,
    /// Whether the guest's memory checked out after migrating; `None` if unchecked.
    pub integrity_ok: Option<bool>,
}

/// Why the chart could not be drawn.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ChartError {
    /// No DejaVu Sans in any of the looked-at paths.
    #[error("font DejaVu Sans not found (looked in: {tried}); install the Debian package fonts-dejavu-core")]
    FontNotFound {
        /// The paths looked at, comma-separated.
        tried: String,
    },
    /// The font file is there but is not a usable TrueType font.
    #[error("{0} is not a usable TrueType font (reinstall fonts-dejavu-core)")]
    BadFont(PathBuf),
    /// The output path does not end in `.png`.
    #[error("{0}: the chart is a PNG, the file name must end in .png")]
    NotPng(PathBuf),
    /// plotters failed while drawing or writing the picture.
    #[error("drawing the chart to {path}: {reason}")]
    Draw {
        /// The output file.
        path: PathBuf,
        /// plotters' error.
        reason: String,
    },
}

/// Where DejaVu Sans lives on common distributions (Debian first).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// The family name the font is registered under with plotters.
const FAMILY: &str = "sans-serif";
/// Picture width in pixels.
const WIDTH: u32 = 1200;
/// Height of the title strip.
const TITLE_H: u32 = 64;
/// Height of a panel's heading.
const HEADING_H: u32 = 40;
/// Height of one row in a panel.
const ROW_H: u32 = 32;
/// Height of a bar.
const BAR_H: u32 = 20;
/// Space below each panel.
const PANEL_GAP: u32 = 16;
/// Where the bars start (labels end just left of it).
const BAR_X: i32 = 520;
/// The longest bar; right of it go the value and the failure mark.
const BAR_MAX: f64 = 400.0;
/// Font sizes in pixels.
const TITLE_SIZE: f32 = 24.0;
const HEADING_SIZE: f32 = 20.0;
const LABEL_SIZE: f32 = 16.0;
const GREY: RGBColor = RGBColor(120, 120, 120);
const FAIL_RED: RGBColor = RGBColor(210, 0, 0);

/// One measure, drawn as one panel.
struct Panel {
    heading: &'static str,
    unit: &'static str,
    colour: RGBColor,
    value: fn(&ChartRow) -> Option<f64>,
}

const PANELS: [Panel; 3] = [
    Panel {
        heading: "MB sent",
        unit: "MB",
        colour: RGBColor(52, 101, 164),
        value: |r| r.mb_sent,
    },
    Panel {
        heading: "downtime (ms)",
        unit: "ms",
        colour: RGBColor(230, 126, 34),
        value: |r| r.downtime_ms,
    },
    Panel {
        heading: "total migration time (ms)",
        unit: "ms",
        colour: RGBColor(90, 150, 90),
        value: |r| r.total_ms,
    },
];

/// Draws `rows` as a PNG at `path` (which must end in `.png`): the title on
/// top, then the panels "MB sent", "downtime (ms)" and "total migration time
/// (ms)" stacked, one bar per row labelled with the row's label and its value.
/// A row whose value is `None` shows "pending" instead of a bar; a row with
/// `integrity_ok == Some(false)` is marked "INTEGRITY FAILED" in red.
pub fn draw_png(rows: &[ChartRow], title: &str, path: &Path) -> Result<(), ChartError> {
    if !path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        return Err(ChartError::NotPng(path.to_path_buf()));
    }
    let font = ensure_font()?;
    let draw_err = |e: DrawingAreaErrorKind<_>| ChartError::Draw {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let root = BitMapBackend::new(path, (WIDTH, chart_height(rows.len()))).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let (top, body) = root.split_vertically(TITLE_H);
    draw_title(&top, font, title).map_err(draw_err)?;
    for (area, panel) in body.split_evenly((PANELS.len(), 1)).iter().zip(&PANELS) {
        draw_panel(area, font, panel, rows).map_err(draw_err)?;
    }
    root.present().map_err(draw_err)
}

/// The picture's height for `n` rows.
fn chart_height(n: usize) -> u32 {
    TITLE_H + PANELS.len() as u32 * (HEADING_H + n as u32 * ROW_H + PANEL_GAP)
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult<'a> =
    Result<(), DrawingAreaErrorKind<<BitMapBackend<'a> as DrawingBackend>::ErrorType>>;

/// The title, left-aligned, with a rule under it.
fn draw_title<'a>(area: &Area<'a>, font: &'static Fnt, title: &str) -> DrawResult<'a> {
    Text::new(font, TITLE_SIZE).draw(area, title, (20, TITLE_H as i32 / 2 - 4))?;
    let y = TITLE_H as i32 - 6;
    area.draw(&PathElement::new([(20, y), (WIDTH as i32 - 20, y)], GREY))
}

/// One panel: its heading, then one bar (or "pending") per row, scaled so the
/// largest value gets the longest bar.
fn draw_panel<'a>(
    area: &Area<'a>,
    font: &'static Fnt,
    panel: &Panel,
    rows: &[ChartRow],
) -> DrawResult<'a> {
    Text::new(font, HEADING_SIZE).draw(area, panel.heading, (20, HEADING_H as i32 / 2))?;
    let max = rows.iter().filter_map(panel.value).fold(0.0, f64::max);
    let label = Text::new(font, LABEL_SIZE);
    for (i, row) in rows.iter().enumerate() {
        let mid = (HEADING_H + i as u32 * ROW_H + ROW_H / 2) as i32;
        draw_row(area, label, panel, row, mid, max)?;
    }
    Ok(())
}

/// One row, centred on `mid`: the label right-aligned left of the bars, the
/// bar and its value (or "pending"), then the integrity failure mark if any.
fn draw_row<'a>(
    area: &Area<'a>,
    label: Text,
    panel: &Panel,
    row: &ChartRow,
    mid: i32,
    max: f64,
) -> DrawResult<'a> {
    label.draw(
        area,
        &row.label,
        (BAR_X - 12 - label.width(&row.label), mid),
    )?;
    let mut x = BAR_X;
    let (shown, colour) = match (panel.value)(row) {
        Some(v) => {
            let len = if max > 0.0 {
                (v / max * BAR_MAX).round() as i32
            } else {
                0
            };
            let half = BAR_H as i32 / 2;
            let bar = [(x, mid - half), (x + len, mid + half)];
            area.draw(&Rectangle::new(bar, panel.colour.filled()))?;
            x += len + 8;
            (format!("{} {}", format_value(v), panel.unit), BLACK)
        }
        None => ("pending".to_string(), GREY),
    };
    Text { colour, ..label }.draw(area, &shown, (x, mid))?;
    if row.integrity_ok == Some(false) {
        x += label.width(&shown) + 16;
        let mark = Text {
            colour: FAIL_RED,
            ..label
        };
        mark.draw(area, "INTEGRITY FAILED", (x, mid))?;
    }
    Ok(())
}

/// A value for its bar: whole numbers from 10 up, else one decimal.
fn format_value(v: f64) -> String {
    if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

type Fnt = FontRef<'static>;

/// How text is drawn: font, size in pixels, colour.
#[derive(Clone, Copy)]
struct Text {
    font: &'static Fnt,
    size: f32,
    colour: RGBColor,
}

impl Text {
    /// Black text in `font` at `size` pixels.
    fn new(font: &'static Fnt, size: f32) -> Self {
        Text {
            font,
            size,
            colour: BLACK,
        }
    }

    /// Draws `s` starting at `x`, vertically centred on `mid`, glyph by glyph:
    /// plotters' ab_glyph backend drops each glyph's left side bearing, which
    /// squeezes letters together ("INTEGRITYFAILED"), so each glyph is placed
    /// here from the font's metrics and plotters only rasterises it (its ink
    /// starting at the given x, its baseline half the size below the given y).
    fn draw<'a>(self, area: &Area<'a>, s: &str, (x, mid): (i32, i32)) -> DrawResult<'a> {
        let scaled = self.font.as_scaled(self.size);
        let baseline = mid as f32 + (scaled.ascent() + scaled.descent()) / 2.0;
        let y = (baseline - self.size / 2.0).round() as i32;
        let style = (FAMILY, f64::from(self.size))
            .into_font()
            .color(&self.colour);
        let mut pen = x as f32;
        let mut prev = None;
        for c in s.chars() {
            let id = scaled.glyph_id(c);
            pen += prev.map_or(0.0, |p| scaled.kern(p, id));
            prev = Some(id);
            let ink_x = pen.round() + scaled.h_side_bearing(id).floor();
            area.draw_text(c.encode_utf8(&mut [0; 4]), &style, (ink_x as i32, y))?;
            pen += scaled.h_advance(id);
        }
        Ok(())
    }

    /// How wide [`Text::draw`] draws `s`, in pixels.
    fn width(self, s: &str) -> i32 {
        let scaled = self.font.as_scaled(self.size);
        let mut prev = None;
        let w: f32 = s
            .chars()
            .map(|c| {
                let id = scaled.glyph_id(c);
                let kern = prev.map_or(0.0, |p| scaled.kern(p, id));
                prev = Some(id);
                kern + scaled.h_advance(id)
            })
            .sum();
        w.round() as i32
    }
}

/// DejaVu Sans, loaded and registered with plotters once per process.
fn ensure_font() -> Result<&'static Fnt, ChartError> {
    static FONT: OnceLock<Result<Fnt, ChartError>> = OnceLock::new();
    FONT.get_or_init(|| {
        let (path, bytes) = find_font(FONT_PATHS)?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        let font = FontRef::try_from_slice(bytes).map_err(|_| ChartError::BadFont(path.clone()))?;
        register_font(FAMILY, FontStyle::Normal, bytes).map_err(|_| ChartError::BadFont(path))?;
        Ok(font)
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// The first of `candidates` that can be read, and its bytes.
fn find_font(candidates: &[&str]) -> Result<(PathBuf, Vec<u8>), ChartError> {
    candidates
        .iter()
        .find_map(|p| std::fs::read(p).ok().map(|b| (PathBuf::from(p), b)))
        .ok_or_else(|| ChartError::FontNotFound {
            tried: candidates.join(", "),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(label: &str, mb: Option<f64>, down: Option<f64>, ok: Option<bool>) -> ChartRow {
        ChartRow {
            label: label.into(),
            mb_sent: mb,
            downtime_ms: down,
            total_ms: mb.map(|m| m * 10.0),
            integrity_ok: ok,
        }
    }

    /// Four rows: one pending, one with failed integrity.
    fn demo_rows() -> Vec<ChartRow> {
        vec![
            row("no hints", Some(480.0), Some(30.0), Some(true)),
            row("stock virtio_balloon + QEMU hints", None, None, None),
            row(
                "freehint.ko + QEMU hints",
                Some(130.0),
                Some(25.0),
                Some(false),
            ),
            row(
                "freehint migrator + freehint device + freehint.ko (bitmap)",
                Some(110.0),
                Some(22.0),
                Some(true),
            ),
        ]
    }

    /// Decodes an RGB PNG into (width, height, pixels).
    fn decode(path: &Path) -> (u32, u32, Vec<[u8; 3]>) {
        let decoder = png::Decoder::new(std::fs::File::open(path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let px = buf[..info.buffer_size()]
            .chunks(3)
            .map(|c| [c[0], c[1], c[2]])
            .collect();
        (info.width, info.height, px)
    }

    #[test]
    fn chart_png_has_header_size_and_bars() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.png");
        draw_png(&demo_rows(), "freehint demo", &path).unwrap();

        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&bytes[12..16], b"IHDR");
        let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
        let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
        assert_eq!((w, h), (WIDTH, chart_height(4)));
        assert!((200 + 4 * 60..=200 + 4 * 120).contains(&h), "height {h}");

        let (dw, dh, px) = decode(&path);
        assert_eq!((dw, dh), (w, h));
        // Each panel has three bars (the pending row has none), each BAR_H
        // pixel lines high, and the longest bar is BAR_MAX pixels wide.
        for panel in &PANELS {
            let c = [panel.colour.0, panel.colour.1, panel.colour.2];
            let lines: Vec<usize> = px
                .chunks(w as usize)
                .map(|line| line.iter().filter(|&&p| p == c).count())
                .filter(|&n| n > 0)
                .collect();
            assert_eq!(lines.len(), 3 * BAR_H as usize, "{}", panel.heading);
            assert_eq!(
                lines.iter().max(),
                Some(&(BAR_MAX as usize)),
                "{}",
                panel.heading
            );
        }
        // The failed row's mark, in red in each panel; between its words a
        // gap of about 6 empty columns, which plotters alone squeezes to 3
        // (it drops each glyph's left side bearing, see `Text::draw`).
        let red = |p: &[u8; 3]| p[0] > p[1].saturating_add(40) && p[1] == p[2];
        let red_lines: Vec<(usize, Vec<usize>)> = px
            .chunks(w as usize)
            .map(|line| (0..line.len()).filter(|&x| red(&line[x])).collect())
            .enumerate()
            .filter(|(_, xs): &(usize, Vec<usize>)| !xs.is_empty())
            .collect();
        assert!(
            red_lines.len() >= PANELS.len() * 8,
            "{} lines with red",
            red_lines.len()
        );
        let top = red_lines[0].0;
        let columns: std::collections::BTreeSet<usize> = red_lines
            .iter()
            .take_while(|(y, _)| *y < top + ROW_H as usize)
            .flat_map(|(_, xs)| xs.iter().copied())
            .collect();
        let columns: Vec<usize> = columns.into_iter().collect();
        let gap = columns.windows(2).map(|c| c[1] - c[0] - 1).max().unwrap();
        assert!(gap >= 5, "widest gap in the mark: {gap} pixels");
    }

    #[test]
    fn chart_without_font_names_the_package() {
        for candidates in [&[][..], &["/nonexistent/DejaVuSans.ttf"][..]] {
            let err = find_font(candidates).unwrap_err();
            assert!(matches!(err, ChartError::FontNotFound { .. }));
            let msg = err.to_string();
            assert!(msg.contains("fonts-dejavu-core"), "{msg}");
            assert!(msg.contains(&candidates.join(", ")), "{msg}");
        }
        assert!(find_font(&["/nonexistent/x.ttf", FONT_PATHS[0]]).is_ok());
    }

    #[test]
    fn chart_refuses_a_non_png_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.bmp");
        let err = draw_png(&demo_rows(), "t", &path).unwrap_err();
        assert!(matches!(err, ChartError::NotPng(_)), "{err}");
        assert!(!path.exists());
    }
}
