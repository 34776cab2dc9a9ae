//! Histogram plots (SVG) with plotters: one panel per exit kind, one line per VMM, latency on
//! a log axis, share of samples per histogram bucket on the other.

use std::path::Path;

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
        "--svg needs a TrueType font for labels; none of {} exists (apt install fonts-dejavu-core)",
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

/// Draws every kind that at least one run has into `path`.
pub fn svg(path: &Path, runs: &[(String, RunResult)], kinds: &[&str]) -> Result<(), String> {
    register_font()?;
    let kinds: Vec<&str> = kinds
        .iter()
        .copied()
        .filter(|k| runs.iter().any(|(_, r)| r.kinds.contains_key(*k)))
        .collect();
    if kinds.is_empty() {
        return Err("no results to plot".into());
    }
    let cols = 3usize;
    let rows = kinds.len().div_ceil(cols);
    let root = SVGBackend::new(path, (1200, 300 * rows as u32)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<std::io::Error>| e.to_string();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((rows, cols));
    for (panel, kind) in panels.iter().zip(&kinds) {
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

    #[test]
    fn draws_an_svg_with_every_kind_and_vmm() {
        if register_font().is_err() {
            eprintln!("SKIPPED draws_an_svg_with_every_kind_and_vmm: no DejaVu font installed");
            return;
        }
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
                    },
                );
            }
            r
        };
        let runs = vec![
            ("kiln".to_string(), run(8000)),
            ("floor".to_string(), run(7000)),
        ];
        let dir = std::env::temp_dir().join(format!("kiln-bench-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("h.svg");
        svg(&p, &runs, &["pio-out", "cpuid", "ipi"]).unwrap();
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
