//! The Debian kernel a VM boots: its image under /boot and the modules the testbed needs from
//! /lib/modules, in load order.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};

/// Kernel modules the testbed needs (pod and node links, the node bridge); their dependencies
/// are found in `modules.dep`. Built-in ones are skipped.
pub(super) const MODULES: &[&str] = &["veth", "bridge"];

/// An installed Debian kernel: its image and its modules.
pub(super) struct Kernel {
    pub(super) version: String,
    pub(super) vmlinuz: PathBuf,
    modules: PathBuf,
}

impl Kernel {
    /// The newest installed kernel whose version is `spec` or starts with `spec.` / `spec-`,
    /// preferring the generic flavour over `-cloud-` and `-rt-`.
    pub(super) fn find(spec: &str) -> anyhow::Result<Self> {
        let advice = "run scripts/vm-setup.sh (as root) to install the 6.1 and 6.12 kernels";
        let entries = fs::read_dir("/boot").with_context(|| format!("reading /boot; {advice}"))?;
        let mut candidates: Vec<String> = entries
            .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
            .filter_map(|name| name.strip_prefix("vmlinuz-").map(str::to_owned))
            .filter(|version| {
                version == spec
                    || version.starts_with(&format!("{spec}."))
                    || version.starts_with(&format!("{spec}-"))
            })
            .collect();
        if candidates.is_empty() {
            bail!("no installed kernel matches `{spec}` (no /boot/vmlinuz-{spec}.*): {advice}");
        }
        let special = |v: &str| v.contains("-cloud-") || v.contains("-rt-");
        candidates.sort_by(|a, b| special(b).cmp(&special(a)).then_with(|| natural_cmp(a, b)));
        let version = candidates.pop().unwrap_or_default();
        let kernel = Kernel {
            vmlinuz: Path::new("/boot").join(format!("vmlinuz-{version}")),
            modules: Path::new("/lib/modules").join(&version),
            version,
        };
        if !kernel.modules.join("modules.dep").is_file() {
            bail!(
                "{} has no modules.dep: reinstall the kernel package ({advice}) or run `depmod {}`",
                kernel.modules.display(),
                kernel.version
            );
        }
        File::open(&kernel.vmlinuz).with_context(|| {
            format!(
                "reading {} (Debian installs kernel images readable by root only): run as root",
                kernel.vmlinuz.display()
            )
        })?;
        Ok(kernel)
    }

    /// The modules to load, dependencies first, as (name, path of the module file).
    pub(super) fn modules_to_load(
        &self,
        wanted: &[&str],
    ) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let dep_file = self.modules.join("modules.dep");
        let deps = fs::read_to_string(&dep_file)
            .with_context(|| format!("reading {}", dep_file.display()))?;
        // name -> (relative path, dependency paths)
        let mut table: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
        for line in deps.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let deps = rest.split_whitespace().map(str::to_owned).collect();
            table.insert(module_name(path), (path.to_owned(), deps));
        }
        let builtin_file = self.modules.join("modules.builtin");
        let builtin: BTreeSet<String> = fs::read_to_string(&builtin_file)
            .unwrap_or_default()
            .lines()
            .map(module_name)
            .collect();

        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for name in wanted {
            let name = name.replace('-', "_");
            if builtin.contains(&name) {
                continue;
            }
            let Some((path, deps)) = table.get(&name) else {
                bail!(
                    "module {name} is neither built into {} nor in {}",
                    self.version,
                    dep_file.display()
                );
            };
            // modules.dep lists every (transitive) dependency; loading them last-first works.
            for dep in deps.iter().rev().chain(std::iter::once(path)) {
                let dep_name = module_name(dep);
                if seen.insert(dep_name.clone()) {
                    order.push((dep_name, self.modules.join(dep)));
                }
            }
        }
        Ok(order)
    }
}

/// `kernel/net/bridge/bridge.ko.xz` -> `bridge` (with `-` as `_`, as the kernel names them).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// Orders version strings with their digit runs compared as numbers (6.1.0-9 < 6.1.0-10).
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn chunks(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (a, b) = (chunks(a), chunks(b));
    for ((a_digit, a), (b_digit, b)) in a.iter().zip(&b) {
        let order = if *a_digit && *b_digit {
            let trim = |s: &str| s.trim_start_matches('0').to_owned();
            let (a, b) = (trim(a), trim(b));
            a.len().cmp(&b.len()).then_with(|| a.cmp(&b))
        } else {
            a.cmp(b)
        };
        if order.is_ne() {
            return order;
        }
    }
    a.len().cmp(&b.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_naturally() {
        let mut versions = vec![
            "6.1.0-10-amd64",
            "6.1.0-9-amd64",
            "6.12.117+deb12-amd64",
            "6.12.99+deb12-amd64",
        ];
        versions.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            versions,
            [
                "6.1.0-9-amd64",
                "6.1.0-10-amd64",
                "6.12.99+deb12-amd64",
                "6.12.117+deb12-amd64"
            ]
        );
    }

    #[test]
    fn module_names_drop_directory_and_compression() {
        assert_eq!(module_name("kernel/net/bridge/bridge.ko.xz"), "bridge");
        assert_eq!(module_name("kernel/drivers/net/veth.ko"), "veth");
        assert_eq!(module_name("kernel/net/802/nf-x.ko.zst"), "nf_x");
    }
}
