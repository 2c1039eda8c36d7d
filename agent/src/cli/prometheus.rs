//! The Prometheus text format (0.0.4, and OpenMetrics' `# EOF`), enough to read the agent's
//! own `/metrics`: samples with their labels, histograms as their `_bucket`/`_sum`/`_count`
//! samples. `nodemesh top` reads it, and so do the testbed's tests (one parser for both).
//!
//! Ours rather than the `prometheus-parse` crate: that one splits labels on `,` and `=` and
//! cuts them at the first `}`, so a label value with a comma, an equals sign, a brace or an
//! escaped quote (a request path, an error) comes out wrong; ours follows the format's
//! escaping (`\\`, `\"`, `\n`). It is one small function, tested below.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    /// Whether the sample carries every one of `wanted` (it may carry others).
    pub fn has_labels(&self, wanted: &[(&str, &str)]) -> bool {
        wanted
            .iter()
            .all(|(key, value)| self.labels.get(*key).map(String::as_str) == Some(*value))
    }
}

/// Every sample in `text`; comment lines (`# HELP`, `# TYPE`, `# EOF`) and lines that do not
/// parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
        .filter_map(parse_line)
        .collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, used) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, &line[open + 1 + used..])
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, BTreeMap::new(), rest)
        }
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value: rest.split_whitespace().next()?.parse().ok()?,
    })
}

/// `a="x",b="y"}`: the labels and how many bytes they took, the closing brace included.
fn parse_labels(text: &str) -> Option<(BTreeMap<String, String>, usize)> {
    let bytes = text.as_bytes();
    let mut labels = BTreeMap::new();
    let mut i = 0;
    loop {
        match *bytes.get(i)? {
            b'}' => return Some((labels, i + 1)),
            b',' => i += 1,
            _ => {
                let eq = text[i..].find('=')? + i;
                let key = text[i..eq].to_owned();
                i = eq + 1;
                if *bytes.get(i)? != b'"' {
                    return None;
                }
                i += 1;
                let mut value = Vec::new();
                loop {
                    let byte = *bytes.get(i)?;
                    i += 1;
                    match byte {
                        b'\\' => {
                            let escaped = *bytes.get(i)?;
                            i += 1;
                            value.push(if escaped == b'n' { b'\n' } else { escaped });
                        }
                        b'"' => break,
                        other => value.push(other),
                    }
                }
                labels.insert(key, String::from_utf8_lossy(&value).into_owned());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_with_and_without_labels() {
        let text = "# HELP x y\nistio_requests_total{reporter=\"source\",path=\"a\\\"b\"} 12\nnodemesh_enrolled_pods 3\nbad line\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 2);
        assert_eq!(samples[0].name, "istio_requests_total");
        assert_eq!(samples[0].labels["reporter"], "source");
        assert_eq!(samples[0].labels["path"], "a\"b");
        assert_eq!(samples[0].value, 12.0);
        assert_eq!(
            (samples[1].name.as_str(), samples[1].value),
            ("nodemesh_enrolled_pods", 3.0)
        );
    }

    #[test]
    fn histograms_escapes_and_the_openmetrics_end() {
        let text = concat!(
            "# TYPE d histogram\n",
            "d_bucket{path=\"/a,b=c}\",le=\"5.0\"} 2\n",
            "d_bucket{path=\"/a,b=c}\",le=\"+Inf\"} 3\n",
            "d_sum{path=\"/a,b=c}\"} 7.5\n",
            "e{error=\"back\\\\slash\\nnext\"} 1 1700000000000\n",
            "# EOF\n",
        );
        let samples = parse(text);
        let names: Vec<&str> = samples.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["d_bucket", "d_bucket", "d_sum", "e"]);
        assert!(samples[0].has_labels(&[("path", "/a,b=c}"), ("le", "5.0")]));
        assert!(!samples[0].has_labels(&[("le", "+Inf")]));
        assert_eq!(samples[1].labels["le"], "+Inf");
        assert_eq!(samples[2].value, 7.5);
        assert_eq!(samples[3].labels["error"], "back\\slash\nnext");
        assert_eq!(samples[3].value, 1.0);
    }
}
