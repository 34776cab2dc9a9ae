//! Histogram plots (SVG or PNG) with plotters: one panel per exit kind, one line per VMM,
//! latency on a log axis, share of samples per histogram bucket on the other.

use std::fs::File;
use std::io::BufWriter;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use kiln_testguest::hist::{bucket_high, bucket_low, BUCKETS};

use crate::report::RunResult;

/// Fonts tried for labels (plotters needs one to lay out text; Debian: fonts-dejavu-core).
const FONTS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> Result<(), String> {
    for f in FONTS {
        if let Ok(bytes) = std::fs::read(f) {
            // plotters keeps the font for the life of the process.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            return plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
                .map_err(|_| format!("{f}: not a usable TrueType font"));
        }
    }
    Err(format!(
        "drawing histograms needs a TrueType font for labels; none of {} exists (apt install fonts-dejavu-core)",
        FONTS.join(", ")
    ))
}

const COLOURS: [RGBColor; 5] = [
    RGBColor(0xd6, 0x4f, 0x1e), // kiln
    RGBColor(0x44, 0x44, 0x44), // floor
    RGBColor(0x1f, 0x77, 0xb4), // qemu
    RGBColor(0x2c, 0xa0, 0x2c), // firecracker
    RGBColor(0x94, 0x67, 0xbd),
];

/// Image formats [`histograms`] can write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Scalable vector graphics (plotters' SVG backend).
    Svg,
    /// A PNG bitmap (plotters' bitmap backend, encoded with the `png` crate).
    Png,
}

impl Format {
    /// The format a file name asks for, by its extension (case-insensitive).
    pub fn from_path(path: &Path) -> Result<Self, String> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            Some("svg") => Ok(Format::Svg),
            Some("png") => Ok(Format::Png),
            _ => Err(format!(
                "{}: the file name must end in .svg or .png",
                path.display()
            )),
        }
    }
}

const COLS: usize = 3;
const PANEL_W: u32 = 400;
const PANEL_H: u32 = 300;

/// Draws every kind that at least one run has into `path`, as `format`.
pub fn histograms(
    path: &Path,
    format: Format,
    runs: &[(String, RunResult)],
    kinds: &[&str],
) -> Result<(), String> {
    register_font()?;
    let kinds: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| runs.iter().any(|(_, r)| r.kinds.contains_key(*k)))
        .collect();
    if kinds.is_empty() {
        return Err("no results to plot".into());
    }
    let rows = u32::try_from(kinds.len().div_ceil(COLS)).map_err(|e| e.to_string())?;
    let size = (PANEL_W * COLS as u32, PANEL_H * rows);
    match format {
        Format::Svg => draw(
            SVGBackend::new(path, size).into_drawing_area(),
            runs,
            &kinds,
        ),
        Format::Png => {
            let mut rgb = vec![0u8; size.0 as usize * size.1 as usize * 3];
            draw(
                BitMapBackend::with_buffer(&mut rgb, size).into_drawing_area(),
                runs,
                &kinds,
            )?;
            write_png(path, size, &rgb)
        }
    }
}

/// Encodes an 8-bit RGB buffer as a PNG file.
fn write_png(path: &Path, (w, h): (u32, u32), rgb: &[u8]) -> Result<(), String> {
    let file = File::create(path).map_err(|e| e.to_string())?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(rgb).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())
}

/// Draws the panels of `kinds` (all of which some run has) onto `root`.
fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    runs: &[(String, RunResult)],
    kinds: &[&str],
) -> Result<(), String> {
    let rows = kinds.len().div_ceil(COLS);
    let e = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((rows, COLS));
    for (panel, kind) in panels.iter().zip(kinds) {
        let series: Vec<(&str, Vec<(f64, f64)>)> = runs
            .iter()
            .filter_map(|(name, r)| {
                let h = &r.kinds.get(*kind)?.hist;
                let n = h.count().max(1) as f64;
                let pts = (0..BUCKETS)
                    .filter(|&i| h.bucket(i) > 0)
                    .map(|i| {
                        let mid = (bucket_low(i) as f64 + bucket_high(i).min(h.max()) as f64) / 2.0;
                        (mid.max(1.0), f64::from(h.bucket(i)) / n * 100.0)
                    })
                    .collect();
                Some((name.as_str(), pts))
            })
            .collect();
        let all = series.iter().flat_map(|(_, p)| p.iter());
        let (lo, hi, top) = all.fold((f64::MAX, 1.0f64, 1.0f64), |(lo, hi, top), &(x, y)| {
            (lo.min(x), hi.max(x), top.max(y))
        });
        let mut chart = ChartBuilder::on(panel)
            .caption(*kind, ("sans-serif", 16))
            .margin(8)
            .x_label_area_size(30)
            .y_label_area_size(40)
            .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..top * 1.1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("ns")
            .y_desc("% of samples")
            // Few, whole-number labels: a log axis over a decade otherwise prints one per
            // sub-tick, overlapping.
            .x_labels(4)
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.0}"))
            .label_style(("sans-serif", 11))
            .draw()
            .map_err(e)?;
        for (i, (name, pts)) in series.into_iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            chart
                .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
                .map_err(e)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], colour));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 11))
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::KindResult;
    use kiln_testguest::hist::Histogram;

    fn runs() -> Vec<(String, RunResult)> {
        let run = |base: u64| {
            let mut r = RunResult::default();
            for kind in ["pio-out", "cpuid"] {
                let mut h = Histogram::new();
                for i in 0..100 {
                    h.record(base + i * 10);
                }
                r.kinds.insert(
                    kind.into(),
                    KindResult {
                        hist: h,
                        cpu_us: None,
                        vmm_ns: None,
                        vmm_rounds: Vec::new(),
                        vmm_typical_rounds: Vec::new(),
                    },
                );
            }
            r
        };
        vec![
            ("kiln".to_string(), run(8000)),
            ("floor".to_string(), run(7000)),
        ]
    }

    fn tmpdir(what: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("kiln-bench-{what}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn format_follows_the_extension() {
        assert_eq!(Format::from_path(Path::new("a/h.svg")), Ok(Format::Svg));
        assert_eq!(Format::from_path(Path::new("h.PNG")), Ok(Format::Png));
        for bad in ["h.jpg", "h", "svg"] {
            let err = Format::from_path(Path::new(bad)).unwrap_err();
            assert!(err.contains(".svg or .png"), "{bad}: {err}");
        }
    }

    #[test]
    fn draws_a_png_of_the_right_size() {
        if register_font().is_err() {
            eprintln!("SKIPPED draws_a_png_of_the_right_size: no DejaVu font installed");
            return;
        }
        let dir = tmpdir("png");
        let p = dir.join("h.png");
        // 4 kinds with results: 2 rows of 3 panels.
        let mut runs = runs();
        let extra = runs[0].1.kinds["cpuid"].clone();
        runs[0].1.kinds.insert("ipi".into(), extra.clone());
        runs[0].1.kinds.insert("irqfd".into(), extra);
        histograms(
            &p,
            Format::Png,
            &runs,
            &["pio-out", "cpuid", "ipi", "irqfd"],
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
        assert_eq!(&bytes[12..16], b"IHDR", "first chunk");
        let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
        assert_eq!(
            (be(16), be(20)),
            (3 * PANEL_W, 2 * PANEL_H),
            "IHDR width, height"
        );
        // A full decode checks every chunk's CRC and the image data's length.
        let mut reader = png::Decoder::new(std::io::Cursor::new(&bytes))
            .read_info()
            .unwrap();
        let mut img = vec![0u8; reader.output_buffer_size()];
        let info = reader.next_frame(&mut img).unwrap();
        assert_eq!((info.width, info.height), (1200, 600));
        assert_eq!(info.color_type, png::ColorType::Rgb);
        // Something was drawn: not every pixel is the white background.
        let px = &img[..info.buffer_size()];
        assert!(px.chunks(3).any(|p| p != [255, 255, 255]), "blank image");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn draws_an_svg_with_every_kind_and_vmm() {
        if register_font().is_err() {
            eprintln!("SKIPPED draws_an_svg_with_every_kind_and_vmm: no DejaVu font installed");
            return;
        }
        let runs = runs();
        let dir = tmpdir("svg");
        let p = dir.join("h.svg");
        histograms(&p, Format::Svg, &runs, &["pio-out", "cpuid", "ipi"]).unwrap();
        let s = std::fs::read_to_string(&p).unwrap();
        assert!(s.starts_with("<svg"));
        for needle in ["pio-out", "cpuid", "kiln", "floor"] {
            assert!(s.contains(needle), "{needle} missing");
        }
        assert!(
            !s.contains(">ipi<"),
            "a kind nobody ran must not get a panel"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
