//! The image `cargo xtask image` builds, as the tests get it: the OCI archive and the
//! values file that pins it in the chart.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::error::{IoContext, Result, TestbedError};

/// An image archive and what its values file says about it.
#[derive(Clone, Debug)]
pub struct ImageArchive {
    /// The OCI archive (`ctr images import`, `skopeo copy oci-archive:`).
    pub archive: PathBuf,
    /// The chart values that pin it (`helm install -f`).
    pub values: PathBuf,
    /// The image repository, e.g. `ghcr.io/nodemesh/nodemesh`.
    pub repository: String,
    /// The tag the archive carries.
    pub tag: String,
    /// `sha256:...` of the image's manifest.
    pub digest: String,
}

impl ImageArchive {
    /// `repository@digest`: what the chart's containers run when the digest is set.
    pub fn pinned_reference(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }

    /// Runs `cargo xtask image --output-dir <dir>` (the musl build is incremental) and reads
    /// what it wrote.
    pub fn build(dir: &Path) -> Result<ImageArchive> {
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let output = Command::new(env!("CARGO"))
            .current_dir(&workspace)
            .args(["xtask", "image", "--output-dir"])
            .arg(dir)
            .output()
            .io_context(|| "running cargo xtask image".into())?;
        if !output.status.success() {
            return Err(TestbedError::Command {
                command: "cargo xtask image".into(),
                status: output.status.to_string(),
                stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            });
        }
        let values_path = dir.join("image-values.yaml");
        let text = std::fs::read_to_string(&values_path)
            .io_context(|| format!("reading {}", values_path.display()))?;
        let values: serde_yaml::Value =
            serde_yaml::from_str(&text).map_err(|source| TestbedError::Yaml {
                what: values_path.display().to_string(),
                source,
            })?;
        let field = |name: &str| {
            values["image"][name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| {
                    TestbedError::Other(format!("{}: no image.{name}", values_path.display()))
                })
        };
        Ok(ImageArchive {
            archive: dir.join("nodemesh.oci.tar"),
            values: values_path.clone(),
            repository: field("repository")?,
            tag: field("tag")?,
            digest: field("digest")?,
        })
    }
}
