//! `cargo xtask image`: the OCI image of the `nodemesh` binary (the agent and the CA), as an
//! OCI archive with a values file that pins it in the chart.
//!
//! The binary is built static (musl) and is the image's only content, on no base. The layout
//! and its JSON are written by umoci (Debian's package); GNU tar packs the layout into the
//! archive. Everything that could vary between two builds of the same commit is fixed: every
//! timestamp is the commit's (`SOURCE_DATE_EPOCH`), entries are sorted, owners are 0, so the
//! same commit and toolchain give the same digest (`tests::the_same_input_gives_the_same_digest`).

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context, bail};
use serde_json::Value;

/// The target the image's binary is built for: static, no libc needed at run time.
const TARGET: &str = "x86_64-unknown-linux-musl";
/// The cargo profile of that build (Cargo.toml: release without debug info, stripped).
const PROFILE: &str = "image";
/// Where the binary lives in the image (on the image's PATH, for `kubectl exec ... nodemesh status`).
const BINARY_IN_IMAGE: &str = "/usr/local/bin/nodemesh";
/// The archive's file name in the output directory.
pub const ARCHIVE: &str = "nodemesh.oci.tar";
/// The values file's name in the output directory.
pub const VALUES: &str = "image-values.yaml";

#[derive(clap::Args)]
pub struct ImageArgs {
    /// Directory for the archive and the values file (default: target/oci).
    #[arg(long)]
    output_dir: Option<PathBuf>,
}

/// Where a built image's files are, and what it is.
pub struct BuiltImage {
    pub archive: PathBuf,
    pub values: PathBuf,
    pub reference: String,
    pub digest: String,
    /// Layers and config as a registry stores them (gzip-compressed layers).
    pub compressed_bytes: u64,
}

/// What identifies the source: the commit, its time, the version.
#[derive(Clone, Debug)]
struct Provenance {
    revision: String,
    epoch: u64,
    version: String,
    source: String,
}

pub fn run(args: &ImageArgs) -> anyhow::Result<()> {
    let root = crate::workspace_root();
    let output = args
        .output_dir
        .clone()
        .unwrap_or_else(|| crate::target_dir().join("oci"));
    let provenance = Provenance::of_checkout(&root)?;
    let started = std::time::Instant::now();
    let binary = build_static_binary(&root)?;
    let (repository, tag) = chart_image(&root)?;
    if tag != provenance.version {
        bail!(
            "deploy/helm/nodemesh/values.yaml names tag {tag}, the workspace is version {}",
            provenance.version
        );
    }
    let image = assemble(&binary, &provenance, &repository, &output)?;
    println!("image   {}", image.reference);
    println!("digest  {}", image.digest);
    println!(
        "archive {} ({:.1} MB; layers and config {:.1} MB compressed)",
        image.archive.display(),
        megabytes(std::fs::metadata(&image.archive)?.len()),
        megabytes(image.compressed_bytes)
    );
    println!(
        "values  {} (helm install ... -f {VALUES} pins the digest)",
        image.values.display()
    );
    println!(
        "revision {} (SOURCE_DATE_EPOCH {}); built in {:.0?}",
        provenance.revision,
        provenance.epoch,
        started.elapsed()
    );
    Ok(())
}

fn megabytes(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

impl Provenance {
    /// HEAD of the checkout, its commit time (or `SOURCE_DATE_EPOCH` if set), the version.
    fn of_checkout(root: &Path) -> anyhow::Result<Provenance> {
        let revision = git(root, &["rev-parse", "HEAD"])?;
        let epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(value) => value
                .parse()
                .with_context(|| format!("SOURCE_DATE_EPOCH={value} is not a number"))?,
            Err(_) => git(root, &["log", "-1", "--format=%ct", "HEAD"])?
                .parse()
                .context("the commit time of HEAD")?,
        };
        if !git(root, &["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
            eprintln!(
                "warning: uncommitted changes: the image is labelled {revision} but is not \
                 what that commit builds"
            );
        }
        Ok(Provenance {
            revision,
            epoch,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            source: env!("CARGO_PKG_REPOSITORY").to_owned(),
        })
    }

    fn created(&self) -> anyhow::Result<String> {
        let time = time::OffsetDateTime::from_unix_timestamp(i64::try_from(self.epoch)?)?;
        Ok(time.format(&time::format_description::well_known::Rfc3339)?)
    }

    /// The standard `org.opencontainers.image.*` annotations, also the config's labels.
    fn labels(&self) -> anyhow::Result<Vec<(&'static str, String)>> {
        Ok(vec![
            ("org.opencontainers.image.created", self.created()?),
            (
                "org.opencontainers.image.description",
                "nodemesh: the node agent (DaemonSet) and the certificate authority".to_owned(),
            ),
            ("org.opencontainers.image.licenses", "Apache-2.0".to_owned()),
            ("org.opencontainers.image.revision", self.revision.clone()),
            ("org.opencontainers.image.source", self.source.clone()),
            ("org.opencontainers.image.title", "nodemesh".to_owned()),
            ("org.opencontainers.image.version", self.version.clone()),
        ])
    }
}

fn git(root: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new("git")
        .args(args)
        .current_dir(root)
        .output()
        .context("running git")?;
    if !output.status.success() {
        bail!(
            "git {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8(output.stdout)?.trim().to_owned())
}

/// `cargo build` of the agent for musl with the image profile; returns the binary.
fn build_static_binary(root: &Path) -> anyhow::Result<PathBuf> {
    crate::run(
        Command::new(env!("CARGO"))
            .current_dir(root)
            .args(["build", "--package", "nodemesh", "--bin", "nodemesh"])
            .args(["--profile", PROFILE, "--target", TARGET]),
    )
    .with_context(|| {
        format!("building the static binary (scripts/setup.sh installs the {TARGET} target and musl-tools)")
    })?;
    Ok(crate::target_dir()
        .join(TARGET)
        .join(PROFILE)
        .join("nodemesh"))
}

/// The chart's default image repository and tag (deploy/helm/nodemesh/values.yaml).
fn chart_image(root: &Path) -> anyhow::Result<(String, String)> {
    let path = root.join("deploy/helm/nodemesh/values.yaml");
    let values: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?,
    )
    .with_context(|| format!("parsing {}", path.display()))?;
    let field = |name: &str| {
        values["image"][name]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("{}: no image.{name}", path.display()))
    };
    Ok((field("repository")?, field("tag")?))
}

/// Lays the image out with umoci in `output`, packs it into the archive and writes the values
/// file; deterministic for the same binary and provenance.
fn assemble(
    binary: &Path,
    provenance: &Provenance,
    repository: &str,
    output: &Path,
) -> anyhow::Result<BuiltImage> {
    let work = output.join("work");
    let _ = std::fs::remove_dir_all(&work);
    let layout = work.join("layout");
    let rootfs = work.join("rootfs");
    let in_rootfs = rootfs.join(BINARY_IN_IMAGE.trim_start_matches('/'));
    std::fs::create_dir_all(in_rootfs.parent().context("binary path")?)?;
    std::fs::copy(binary, &in_rootfs).with_context(|| format!("copying {}", binary.display()))?;
    set_permissions_and_times(&rootfs, provenance.epoch)?;

    let tag = &provenance.version;
    let image = format!("{}:{tag}", layout.display());
    let created = provenance.created()?;
    umoci(&["init", "--layout", &layout.display().to_string()])?;
    umoci(&["new", "--image", &image])?;
    // The rootfs's `usr` tree is the one layer (umoci adds the directories and the file).
    umoci(&[
        "insert",
        "--rootless",
        "--image",
        &image,
        &format!("--history.created={created}"),
        "--history.created_by=cargo xtask image",
        &rootfs.join("usr").display().to_string(),
        "/usr",
    ])?;
    let mut config = vec![
        "config".to_owned(),
        "--image".to_owned(),
        image.clone(),
        "--no-history".to_owned(),
        format!("--created={created}"),
        "--architecture=amd64".to_owned(),
        "--os=linux".to_owned(),
        format!("--config.entrypoint={BINARY_IN_IMAGE}"),
        "--config.env=PATH=/usr/local/bin".to_owned(),
    ];
    for (key, value) in provenance.labels()? {
        config.push(format!("--config.label={key}={value}"));
        config.push(format!("--manifest.annotation={key}={value}"));
    }
    umoci(&config.iter().map(String::as_str).collect::<Vec<_>>())?;
    umoci(&["gc", "--layout", &layout.display().to_string()])?;

    let archive = output.join(ARCHIVE);
    pack(&layout, &archive, provenance.epoch)?;
    let (digest, compressed_bytes) = manifest_digest(&layout, tag)?;
    let values = output.join(VALUES);
    write_values(&values, repository, tag, &digest, provenance)?;
    std::fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    Ok(BuiltImage {
        archive,
        values,
        reference: format!("{repository}:{tag}@{digest}"),
        digest,
        compressed_bytes,
    })
}

/// Modes and times that do not depend on the umask or the clock: 0755 for directories and the
/// binary, every time the commit's.
fn set_permissions_and_times(dir: &Path, epoch: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let time = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch);
    let mut entries = vec![dir.to_owned()];
    let mut index = 0;
    while index < entries.len() {
        if entries[index].is_dir() {
            for entry in std::fs::read_dir(&entries[index])? {
                entries.push(entry?.path());
            }
        }
        index += 1;
    }
    for path in entries {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
        std::fs::File::open(&path)
            .and_then(|file| file.set_modified(time))
            .with_context(|| format!("setting the time of {}", path.display()))?;
    }
    Ok(())
}

fn umoci(args: &[&str]) -> anyhow::Result<()> {
    let output = Command::new("umoci")
        .args(args)
        .output()
        .context("running umoci (scripts/setup.sh installs it)")?;
    if !output.status.success() {
        bail!(
            "umoci {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// The layout as an OCI archive (what `ctr images import` and `skopeo copy oci-archive:`
/// read): sorted entries, owner 0, the commit's time, no access or change times.
fn pack(layout: &Path, archive: &Path, epoch: u64) -> anyhow::Result<()> {
    crate::run(
        Command::new("tar")
            .args([
                "--create",
                "--sort=name",
                "--format=posix",
                "--pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime",
                "--owner=0",
                "--group=0",
                "--numeric-owner",
                "--mode=a+rX,u+w,go-w",
                &format!("--mtime=@{epoch}"),
                "--file",
            ])
            .arg(archive)
            .arg("--directory")
            .arg(layout)
            .args(["oci-layout", "index.json", "blobs"]),
    )
}

/// The digest of the image's manifest (what a reference pins) and the compressed size of its
/// config and layers, from the layout umoci wrote.
fn manifest_digest(layout: &Path, tag: &str) -> anyhow::Result<(String, u64)> {
    let read = |path: PathBuf| -> anyhow::Result<Value> {
        let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_slice(&text)?)
    };
    let index = read(layout.join("index.json"))?;
    let manifests = index["manifests"]
        .as_array()
        .context("index.json: no manifests")?;
    let [manifest] = manifests.as_slice() else {
        bail!("index.json lists {} manifests, not one", manifests.len());
    };
    if manifest["annotations"]["org.opencontainers.image.ref.name"] != tag {
        bail!("index.json's manifest is not tagged {tag}: {manifest}");
    }
    let digest = manifest["digest"]
        .as_str()
        .context("index.json: no digest")?
        .to_owned();
    let hex = digest
        .strip_prefix("sha256:")
        .context("not a sha256 digest")?;
    let blob = read(layout.join("blobs/sha256").join(hex))?;
    let sizes = std::iter::once(&blob["config"])
        .chain(blob["layers"].as_array().into_iter().flatten())
        .map(|descriptor| descriptor["size"].as_u64().unwrap_or(0))
        .sum();
    Ok((digest, sizes))
}

/// Chart values that pin this image: `helm install ... -f image-values.yaml`.
fn write_values(
    path: &Path,
    repository: &str,
    tag: &str,
    digest: &str,
    provenance: &Provenance,
) -> anyhow::Result<()> {
    let values = serde_json::json!({
        "image": { "repository": repository, "tag": tag, "digest": digest }
    });
    let text = format!(
        "# Written by `cargo xtask image` for revision {}: the chart's image pinned by digest.\n{}",
        provenance.revision,
        serde_yaml::to_string(&values)?
    );
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provenance(revision: &str) -> Provenance {
        Provenance {
            revision: revision.to_owned(),
            epoch: 1_700_000_000,
            version: "0.1.0".to_owned(),
            source: "https://example.invalid/nodemesh".to_owned(),
        }
    }

    fn skopeo_inspect(archive: &Path) -> Value {
        let output = Command::new("skopeo")
            .arg("inspect")
            .arg(format!("oci-archive:{}", archive.display()))
            .output()
            .expect("skopeo (scripts/setup.sh installs it)");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("skopeo's JSON")
    }

    /// Two assemblies of the same binary and commit, at different times and in different
    /// directories, are the same bytes; another revision (a label) changes the digest.
    #[test]
    fn the_same_input_gives_the_same_digest() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("nodemesh");
        std::fs::write(&binary, b"#!/bin/false\n").unwrap();
        let build = |name: &str, revision: &str| {
            assemble(
                &binary,
                &provenance(revision),
                "example.invalid/nodemesh",
                &dir.path().join(name),
            )
            .unwrap()
        };
        let first = build("first", "abc123");
        // The clock moves on (second resolution in tar and JSON): nothing may depend on it.
        std::thread::sleep(Duration::from_millis(1100));
        let second = build("second", "abc123");
        assert_eq!(first.digest, second.digest);
        assert_eq!(
            std::fs::read(&first.archive).unwrap(),
            std::fs::read(&second.archive).unwrap(),
            "the archives are byte-identical"
        );
        let other = build("other", "def456");
        assert_ne!(
            first.digest, other.digest,
            "the revision is part of the image"
        );

        let inspected = skopeo_inspect(&first.archive);
        assert_eq!(inspected["Digest"], first.digest);
        assert_eq!(inspected["Created"], "2023-11-14T22:13:20Z");
        let labels = &inspected["Labels"];
        assert_eq!(labels["org.opencontainers.image.revision"], "abc123");
        assert_eq!(labels["org.opencontainers.image.version"], "0.1.0");
        assert_eq!(
            labels["org.opencontainers.image.source"],
            "https://example.invalid/nodemesh"
        );
        let values = std::fs::read_to_string(&first.values).unwrap();
        assert!(
            values.contains(&format!("digest: {}", first.digest)),
            "{values}"
        );
    }
}
