//! The examples the docs show, read from the docs themselves so that what users copy is what
//! the tests and the demo apply: a fenced `yaml` block whose first line is
//! `# example: <name>`.

use std::path::PathBuf;

use crate::{Result, TestbedError};

/// The example `name` of `docs/<doc>`, parsed.
pub fn example(doc: &str, name: &str) -> Result<serde_yaml::Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../docs")
        .join(doc);
    let text = std::fs::read_to_string(&path)
        .map_err(|error| TestbedError::Other(format!("reading {}: {error}", path.display())))?;
    let marker = format!("```yaml\n# example: {name}\n");
    let start = text
        .find(&marker)
        .ok_or_else(|| TestbedError::Other(format!("docs/{doc} has no example {name:?}")))?
        + "```yaml\n".len();
    let end = start
        + text[start..].find("```").ok_or_else(|| {
            TestbedError::Other(format!("docs/{doc}: example {name:?} is not closed"))
        })?;
    serde_yaml::from_str(&text[start..end]).map_err(|source| TestbedError::Yaml {
        what: format!("docs/{doc} example {name:?}"),
        source,
    })
}
