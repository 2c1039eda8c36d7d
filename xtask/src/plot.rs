//! The benchmark's plots: drawn as SVG (plain text, reviewable in a diff) and rendered to PNG
//! with `rsvg-convert` (librsvg, installed by scripts/setup.sh).

use std::{fmt::Write as _, path::Path, process::Command};

use anyhow::{Context, bail};

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLOURS: [&str; 4] = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a"];

/// One curve: its name and its points (for a CDF: latency µs, fraction of requests at or
/// below it).
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// A latency CDF, x from 0 to the largest latency shown, y from 0 to 1.
pub fn cdf(title: &str, x_label: &str, curves: &[Curve]) -> String {
    xy(title, x_label, "fraction of requests", 1.0, curves)
}

/// Measurements against a size: x and y from 0 to round numbers above the largest values,
/// each measured point marked.
pub fn lines(title: &str, x_label: &str, y_label: &str, curves: &[Curve]) -> String {
    let y_max = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.1))
        .fold(1.0, f64::max);
    let mut svg = xy(title, x_label, y_label, nice_ceiling(y_max), curves);
    svg.truncate(svg.len() - "</svg>\n".len());
    let (x_max, y_max) = (
        nice_ceiling(
            curves
                .iter()
                .flat_map(|c| c.points.iter().map(|p| p.0))
                .fold(1.0, f64::max),
        ),
        nice_ceiling(y_max),
    );
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    for (curve, colour) in curves.iter().zip(COLOURS.iter().cycle()) {
        for &(x, y) in &curve.points {
            let _ = write!(
                svg,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"/>"#,
                LEFT + x / x_max * plot_w,
                TOP + (1.0 - y / y_max) * plot_h,
            );
        }
    }
    svg.push_str("</svg>\n");
    svg
}

/// Curves on axes from 0 to the largest x shown and from 0 to `y_max`.
fn xy(title: &str, x_label: &str, y_label: &str, y_max: f64, curves: &[Curve]) -> String {
    let x_max = curves
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold(1.0, f64::max);
    let x_max = nice_ceiling(x_max);
    let (plot_w, plot_h) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
    let x = |v: f64| LEFT + v / x_max * plot_w;
    let y = |v: f64| TOP + (1.0 - v / y_max) * plot_h;
    let y_decimals = if y_max > 10.0 { 0 } else { 1 };
    let mut svg = header(title);
    for tick in 0..=5 {
        let value = x_max * f64::from(tick) / 5.0;
        let level = y_max * f64::from(tick) / 5.0;
        let _ = write!(
            svg,
            r##"<line x1="{x0}" y1="{top}" x2="{x0}" y2="{bottom}" stroke="#ddd"/><text x="{x0}" y="{label_y}" text-anchor="middle">{value:.0}</text><line x1="{LEFT}" y1="{y0}" x2="{right}" y2="{y0}" stroke="#ddd"/><text x="{ylx}" y="{yly}" text-anchor="end">{level:.y_decimals$}</text>"##,
            x0 = x(value),
            top = TOP,
            bottom = TOP + plot_h,
            label_y = TOP + plot_h + 18.0,
            y0 = y(level),
            right = LEFT + plot_w,
            ylx = LEFT - 6.0,
            yly = y(level) + 4.0,
        );
    }
    for (curve, colour) in curves.iter().zip(COLOURS.iter().cycle()) {
        let path: Vec<String> = curve
            .points
            .iter()
            .map(|&(v, f)| format!("{:.1},{:.1}", x(v), y(f)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{}"/>"#,
            path.join(" ")
        );
    }
    legend(&mut svg, curves.iter().map(|c| c.name.as_str()));
    axes(&mut svg, x_label, y_label);
    svg.push_str("</svg>\n");
    svg
}

/// Horizontal bars of ratios to direct traffic, with a line at 1.
pub fn ratio_bars(title: &str, bars: &[(String, f64)]) -> String {
    let x_max = nice_ceiling(bars.iter().map(|b| b.1).fold(1.0, f64::max));
    let label_w = 330.0;
    let plot_w = WIDTH - label_w - RIGHT - 50.0;
    let bar_h = 26.0;
    let height = TOP + bars.len() as f64 * (bar_h + 10.0) + BOTTOM;
    let x = |v: f64| label_w + v / x_max * plot_w;
    let mut svg = header_sized(title, height);
    for (index, ((name, ratio), colour)) in bars.iter().zip(COLOURS.iter().cycle()).enumerate() {
        let top = TOP + index as f64 * (bar_h + 10.0);
        let _ = write!(
            svg,
            r#"<text x="{lx}" y="{ty}" text-anchor="end">{name}</text><rect x="{label_w}" y="{top}" width="{w:.1}" height="{bar_h}" fill="{colour}"/><text x="{vx:.1}" y="{ty}">{ratio:.2}</text>"#,
            lx = label_w - 8.0,
            ty = top + bar_h * 0.7,
            w = x(*ratio) - label_w,
            vx = x(*ratio) + 6.0,
            name = escape(name),
        );
    }
    let _ = write!(
        svg,
        r##"<line x1="{one}" y1="{TOP}" x2="{one}" y2="{bottom}" stroke="#333" stroke-dasharray="4 3"/><text x="{one}" y="{label}" text-anchor="middle">1.0 = direct</text>"##,
        one = x(1.0),
        bottom = height - BOTTOM + 5.0,
        label = height - BOTTOM + 22.0,
    );
    svg.push_str("</svg>\n");
    svg
}

/// Writes `svg` next to its PNG rendering: `<stem>.svg` and `<stem>.png` in `dir`.
pub fn write(dir: &Path, stem: &str, svg: &str) -> anyhow::Result<()> {
    let svg_path = dir.join(format!("{stem}.svg"));
    let png_path = dir.join(format!("{stem}.png"));
    std::fs::write(&svg_path, svg).with_context(|| format!("writing {}", svg_path.display()))?;
    let status = Command::new("rsvg-convert")
        .arg("--background-color=white")
        .arg("-o")
        .arg(&png_path)
        .arg(&svg_path)
        .status()
        .context("running rsvg-convert (apt librsvg2-bin; scripts/setup.sh installs it)")?;
    if !status.success() {
        bail!("rsvg-convert {} failed: {status}", svg_path.display());
    }
    Ok(())
}

fn header(title: &str) -> String {
    header_sized(title, HEIGHT)
}

fn header_sized(title: &str, height: f64) -> String {
    format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="DejaVu Sans, sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{cx}" y="22" text-anchor="middle" font-size="15">{}</text>"#,
        escape(title),
        cx = WIDTH / 2.0,
    )
}

fn axes(svg: &mut String, x_label: &str, y_label: &str) {
    let _ = write!(
        svg,
        r#"<text x="{cx}" y="{xy}" text-anchor="middle">{x}</text><text transform="translate(18 {cy}) rotate(-90)" text-anchor="middle">{y}</text>"#,
        cx = LEFT + (WIDTH - LEFT - RIGHT) / 2.0,
        xy = HEIGHT - 18.0,
        cy = TOP + (HEIGHT - TOP - BOTTOM) / 2.0,
        x = escape(x_label),
        y = escape(y_label),
    );
}

fn legend<'a>(svg: &mut String, names: impl Iterator<Item = &'a str>) {
    for (index, (name, colour)) in names.zip(COLOURS.iter().cycle()).enumerate() {
        // Bottom right: a CDF's curves rise from the left.
        let y = HEIGHT - BOTTOM - 60.0 + index as f64 * 18.0;
        let x = WIDTH - RIGHT - 260.0;
        let _ = write!(
            svg,
            r#"<rect x="{x}" y="{ry}" width="14" height="4" fill="{colour}"/><text x="{tx}" y="{y}">{}</text>"#,
            escape(name),
            ry = y - 6.0,
            tx = x + 20.0,
        );
    }
}

/// The smallest of 1, 2, 5 × 10^n at or above `value`.
fn nice_ceiling(value: f64) -> f64 {
    let magnitude = 10f64.powf(value.max(1e-9).log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|v| *v >= value)
        .unwrap_or(10.0 * magnitude)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_render_to_png() {
        let dir = std::env::temp_dir().join(format!("nodemesh-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let svg = ratio_bars("ratios", &[("bulk, mTLS".into(), 0.4)]);
        write(&dir, "bars", &svg).expect("rsvg-convert renders it");
        let png = std::fs::read(dir.join("bars.png")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000);
    }

    #[test]
    fn axes_end_on_round_numbers() {
        assert_eq!(nice_ceiling(0.8), 1.0);
        assert_eq!(nice_ceiling(1.3), 2.0);
        assert_eq!(nice_ceiling(430.0), 500.0);
        assert_eq!(nice_ceiling(5000.0), 5000.0);
    }

    #[test]
    fn plots_are_well_formed_svg_with_every_series() {
        let curves = [
            Curve {
                name: "direct".into(),
                points: vec![(100.0, 0.5), (300.0, 1.0)],
            },
            Curve {
                name: "L7 <mTLS>".into(),
                points: vec![(200.0, 0.5), (900.0, 1.0)],
            },
        ];
        let svg = cdf("latency", "µs", &curves);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("L7 &lt;mTLS&gt;"));
        let memory = lines("memory", "pods", "MiB", &curves);
        assert_eq!(memory.matches("<circle").count(), 4, "every point marked");
        let bars = ratio_bars("ratios", &[("bulk".into(), 0.4), ("hook".into(), 0.9)]);
        assert_eq!(bars.matches("<rect x=\"330\"").count(), 2);
    }
}
