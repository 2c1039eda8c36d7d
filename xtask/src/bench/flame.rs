//! Flame graphs of folded stacks (`frame;frame;... weight`), as `--heap-profile` (bytes
//! held at the peak) and `--cpu-profile` (samples) draw them: inferno, with Rust's names
//! demangled.

use std::{fs, path::Path};

use anyhow::Context;
use inferno::flamegraph;

/// One folded line with each frame's Rust name demangled, without hashes or source file.
pub(super) fn demangled(line: &str) -> Option<String> {
    let (stack, weight) = line.rsplit_once(' ')?;
    let frames: Vec<String> = stack
        .split(';')
        .map(|frame| {
            let name = frame.split(" (").next().unwrap_or(frame);
            format!("{:#}", rustc_demangle::demangle(name)).replace(';', ",")
        })
        .collect();
    Some(format!("{} {weight}", frames.join(";")))
}

/// Draws demangled folded `lines` into `svg`, weighed in `count_name`.
pub(super) fn render(
    lines: &[String],
    svg: &Path,
    title: &str,
    count_name: &str,
) -> anyhow::Result<()> {
    let mut options = flamegraph::Options::default();
    options.title = title.to_owned();
    options.count_name = count_name.to_owned();
    options.colors = flamegraph::Palette::Multi(flamegraph::color::MultiPalette::Rust);
    let out = fs::File::create(svg)?;
    flamegraph::from_lines(&mut options, lines.iter().map(String::as_str), out)
        .with_context(|| format!("rendering {}", svg.display()))
}

#[cfg(test)]
mod tests {
    #[test]
    fn folded_frames_are_demangled_and_keep_their_weight() {
        let line = "main (main.c);_RNvNtCs1C1lLj4PWSY_5alloc5alloc5alloc (alloc.rs) 4096";
        assert_eq!(
            super::demangled(line).unwrap(),
            "main;alloc::alloc::alloc 4096"
        );
    }
}
