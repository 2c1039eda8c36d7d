//! The guest's root file system: busybox, iproute2, the client tools the suites run, the test
//! binaries with every shared library they load, the kernel modules, and an init script that
//! runs the suites and reports; written as a newc cpio archive.

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{BufWriter, Write},
    os::unix::fs::{MetadataExt, PermissionsExt, symlink},
    path::{Component, Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use super::{
    Binaries, GUEST_DIR, find_program,
    kernel::{Kernel, MODULES},
};

/// Busybox applets the init script uses (`ip` is the real iproute2: the testbed needs
/// `ip netns` and `-batch`, which busybox's `ip` lacks). `true` and `sleep` are for suites
/// that spawn them.
const APPLETS: &[&str] = &[
    "sh", "mount", "mkdir", "ln", "cat", "echo", "insmod", "poweroff", "uname", "tail", "ls",
    "sleep", "true", "false",
];
/// The real client programs the suites run against the mesh (the inbound and mTLS suites
/// probe it with curl, socat, openssl s_client, tcpdump on the wire, ss inside a pod through
/// nsenter; the DNS suite asks with dig and the C library's getent, in a mount namespace of
/// its own (unshare), of dnsmasq), copied from the host into the guest's /usr/bin with their
/// libraries.
const TOOLS: &[&str] = &[
    "curl", "socat", "openssl", "tcpdump", "nsenter", "ss", "dig", "getent", "unshare", "dnsmasq",
];
/// Where the host keeps them (merged /usr or not).
const TOOL_DIRS: &[&str] = &["/usr/bin", "/usr/sbin", "/bin", "/sbin"];
/// Configuration the tools read (openssl's default config; absent files are skipped).
const TOOL_FILES: &[&str] = &["/usr/lib/ssl/openssl.cnf"];

/// Printed by the init script when the suite starts, and with its exit code when it ends.
pub(super) const START_MARKER: &str = "NODEMESH-VM-TEST-START";
pub(super) const EXIT_MARKER: &str = "NODEMESH-VM-TEST-EXIT=";
/// Exit code the init script reports when the guest could not be set up (mounts, modules).
pub(super) const SETUP_FAILED: i32 = 125;

/// Builds the staging tree `root` and archives it into `initramfs` (newc cpio, uncompressed).
pub(super) fn build(
    kernel: &Kernel,
    binaries: &Binaries,
    test_args: &[String],
    time_scale: u32,
    root: &Path,
    initramfs: &Path,
) -> anyhow::Result<()> {
    if root.exists() {
        fs::remove_dir_all(root).with_context(|| format!("removing {}", root.display()))?;
    }
    for dir in [
        "bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "root", "var", "modules",
        "usr/bin",
    ] {
        create_dir(&root.join(dir))?;
    }
    create_dir(&root.join(GUEST_DIR.trim_start_matches('/')))?;
    // iproute2 keeps named network namespaces in /var/run/netns.
    make_symlink(Path::new("../run"), &root.join("var/run"))?;
    // Debian's tcpdump drops to the user `tcpdump` once it has opened its capture.
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\ntcpdump:x:100:100::/nonexistent:/bin/false\n",
    )
    .context("writing etc/passwd")?;
    fs::write(root.join("etc/group"), "root:x:0:\ntcpdump:x:100:\n")
        .context("writing etc/group")?;
    // The DNS suite binds a pod's resolv.conf over it.
    fs::write(root.join("etc/resolv.conf"), "").context("writing etc/resolv.conf")?;

    // Programs, with every shared library they load.
    let busybox = find_program("busybox", &["/bin", "/usr/bin"])?;
    let ip = find_program("ip", &["/usr/sbin", "/sbin", "/usr/bin", "/bin"])?;
    let mut programs = vec![
        (busybox, root.join("bin/busybox")),
        (ip, root.join("sbin/ip")),
    ];
    let guest_dir = root.join(GUEST_DIR.trim_start_matches('/'));
    programs.push((binaries.nodemesh.clone(), guest_dir.join("nodemesh")));
    programs.push((
        binaries.workload.clone(),
        guest_dir.join("nodemesh-workload"),
    ));
    for (suite, path) in &binaries.suites {
        programs.push((path.clone(), guest_dir.join(suite)));
    }
    for tool in TOOLS {
        let host = find_program(tool, TOOL_DIRS)?;
        programs.push((host, root.join("usr/bin").join(tool)));
    }
    let mut libraries = BTreeSet::new();
    for (host, guest) in &programs {
        copy_stripped(host, guest)?;
        libraries.extend(shared_libraries(host)?);
    }
    for library in &libraries {
        install_host_path(root, library)?;
    }
    for file in TOOL_FILES
        .iter()
        .map(Path::new)
        .filter(|file| file.exists())
    {
        install_host_path(root, file)?;
    }
    for applet in APPLETS {
        make_symlink(Path::new("busybox"), &root.join("bin").join(applet))?;
    }

    // Modules, decompressed (busybox insmod reads plain .ko files).
    let modules = kernel.modules_to_load(MODULES)?;
    for (name, path) in &modules {
        decompress_module(path, &root.join("modules").join(format!("{name}.ko")))?;
    }
    let names: Vec<&str> = modules.iter().map(|(name, _)| name.as_str()).collect();
    let suites: Vec<&str> = binaries
        .suites
        .iter()
        .map(|(suite, _)| suite.as_str())
        .collect();
    let init = init_script(&suites, &names, test_args, time_scale);
    let init_path = root.join("init");
    fs::write(&init_path, init).context("writing the init script")?;
    fs::set_permissions(&init_path, fs::Permissions::from_mode(0o755))
        .context("making the init script executable")?;

    write_cpio(root, initramfs)
}

fn create_dir(path: &Path) -> anyhow::Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))
}

fn make_symlink(target: &Path, link: &Path) -> anyhow::Result<()> {
    if let Some(parent) = link.parent() {
        create_dir(parent)?;
    }
    symlink(target, link).with_context(|| format!("creating symlink {}", link.display()))
}

/// Copies a program without its debug info (a tenth of the size; symbols stay for backtraces).
fn copy_stripped(host: &Path, guest: &Path) -> anyhow::Result<()> {
    let stripped = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(guest)
        .arg(host)
        .status()
        .is_ok_and(|status| status.success());
    if !stripped {
        // Not an ELF strip understands (or no binutils): the whole file will do.
        fs::copy(host, guest)
            .with_context(|| format!("copying {} to {}", host.display(), guest.display()))?;
    }
    Ok(())
}

/// The shared libraries (and the dynamic loader) a program needs, as `ldd` resolves them.
fn shared_libraries(program: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let output = Command::new("ldd")
        .arg(program)
        .output()
        .context("running ldd (Debian package libc-bin)")?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // ldd says "not a dynamic executable" (exit 1) for static programs such as busybox-static.
        if String::from_utf8_lossy(&output.stderr).contains("not a dynamic executable")
            || text.contains("not a dynamic executable")
            || text.contains("statically linked")
        {
            return Ok(Vec::new());
        }
        bail!(
            "ldd {} failed: {}",
            program.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let mut libraries = Vec::new();
    for line in text.lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let path = rest.split_whitespace().next().unwrap_or_default();
                if path == "not" {
                    bail!(
                        "{} needs {} which is not installed",
                        program.display(),
                        name.trim()
                    );
                }
                path
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// Copies a host file to the same path under `root`, recreating the symlinks on the way
/// (`/lib` -> `usr/lib` on merged-/usr Debian), so the guest resolves it like the host.
fn install_host_path(root: &Path, host: &Path) -> anyhow::Result<()> {
    let mut path = host.to_path_buf();
    for _ in 0..40 {
        let mut real = PathBuf::from("/");
        let mut resolved = None;
        let components: Vec<Component> = path.components().collect();
        for (i, component) in components.iter().enumerate().skip(1) {
            let next = real.join(component);
            let meta = fs::symlink_metadata(&next)
                .with_context(|| format!("reading {}", next.display()))?;
            let guest = root.join(next.strip_prefix("/").unwrap_or(&next));
            if meta.file_type().is_symlink() {
                let target =
                    fs::read_link(&next).with_context(|| format!("reading {}", next.display()))?;
                if fs::symlink_metadata(&guest).is_err() {
                    make_symlink(&target, &guest)?;
                }
                let mut continued = normalize(&real.join(&target));
                for rest in &components[i + 1..] {
                    continued.push(rest);
                }
                resolved = Some(continued);
                break;
            } else if meta.is_dir() {
                create_dir(&guest)?;
            } else if fs::symlink_metadata(&guest).is_err() {
                fs::copy(&next, &guest)
                    .with_context(|| format!("copying {} into the initramfs", next.display()))?;
            }
            real = next;
        }
        match resolved {
            Some(next) => path = next,
            None => return Ok(()),
        }
    }
    bail!("too many symbolic links resolving {}", host.display())
}

/// Removes `.` and `..` lexically (valid here: the prefix has no symlinks left).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(part) => out.push(part),
            _ => {}
        }
    }
    out
}

fn decompress_module(module: &Path, guest: &Path) -> anyhow::Result<()> {
    let name = module.to_string_lossy();
    let tool = if name.ends_with(".ko.xz") {
        Some("xz")
    } else if name.ends_with(".ko.zst") {
        Some("zstd")
    } else if name.ends_with(".ko.gz") {
        Some("gzip")
    } else {
        None
    };
    let Some(tool) = tool else {
        fs::copy(module, guest).with_context(|| format!("copying {}", module.display()))?;
        return Ok(());
    };
    let output = Command::new(tool)
        .arg("-dc")
        .arg(module)
        .output()
        .with_context(|| {
            format!(
                "running {tool} to decompress {}: install it",
                module.display()
            )
        })?;
    if !output.status.success() {
        bail!(
            "{tool} -dc {} failed: {}",
            module.display(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    fs::write(guest, output.stdout).with_context(|| format!("writing {}", guest.display()))
}

/// Quotes a word for sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn init_script(suites: &[&str], modules: &[&str], test_args: &[String], time_scale: u32) -> String {
    let suites = suites.join(" ");
    let modules = modules.join(" ");
    let test_args: Vec<String> = test_args.iter().map(|a| shell_quote(a)).collect();
    let test_args = test_args.join(" ");
    format!(
        r#"#!/bin/sh
# Generated by `cargo xtask vm-test` (xtask/src/vm.rs): set up what the testbed expects, run
# the suites, report the exit code, power off. No API server runs in the guest: the testbed
# keeps its cluster state in manifests.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin HOME=/root RUST_BACKTRACE=1 NODEMESH_TEST_TIME_SCALE={time_scale}
export NODEMESH_TESTBED_CLUSTER=manifests
setup_failed() {{
    echo "NODEMESH-VM-TEST-SETUP-FAILED: $*"
    echo "{EXIT_MARKER}{SETUP_FAILED}"
    poweroff -f
}}
mount -t devtmpfs devtmpfs /dev || setup_failed "mount devtmpfs at /dev"
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc || setup_failed "mount proc"
mount -t sysfs sysfs /sys || setup_failed "mount sysfs"
mount -t cgroup2 cgroup2 /sys/fs/cgroup || setup_failed "mount cgroup2 at /sys/fs/cgroup"
mount -t bpf bpf /sys/fs/bpf || setup_failed "mount bpffs at /sys/fs/bpf"
mount -t tmpfs tmpfs /run || setup_failed "mount tmpfs at /run"
mount -t tmpfs tmpfs /tmp || setup_failed "mount tmpfs at /tmp"
for module in {modules}; do
    insmod /modules/$module.ko || setup_failed "insmod $module"
done
ip link set lo up || setup_failed "ip link set lo up"
# Keep the BPF hooks' static keys on, so the kernel does not live-patch its text under the
# tests (QEMU's multi-threaded TCG once ran a stale int3 of such a patch; docs/vm-test.md).
{GUEST_DIR}/nodemesh-workload hold-static-keys --cgroup /sys/fs/cgroup/nodemesh-vm-static-keys \
    || setup_failed "hold the BPF static keys"

echo "{START_MARKER} kernel $(uname -r)"
status=0
for suite in {suites}; do
    echo "=== $suite"
    NODEMESH_BIN={GUEST_DIR}/nodemesh NODEMESH_WORKLOAD_BIN={GUEST_DIR}/nodemesh-workload \
        {GUEST_DIR}/$suite --test-threads=1 {test_args}
    code=$?
    [ $status = 0 ] && status=$code
done
if [ $status != 0 ]; then
    # Agent logs of failed tests (the testbed keeps them after a failure).
    for log in /tmp/*-logs/*; do
        [ -f "$log" ] || continue
        echo "--- $log (last 60 lines)"
        tail -n 60 "$log"
    done
fi
echo "{EXIT_MARKER}$status"
poweroff -f
"#
    )
}

/// Writes the tree under `root` as an uncompressed newc cpio archive, plus `/dev/console`
/// (the kernel opens it for init before anything is mounted).
fn write_cpio(root: &Path, archive: &Path) -> anyhow::Result<()> {
    let file = File::create(archive).with_context(|| format!("creating {}", archive.display()))?;
    let mut out = BufWriter::new(file);
    let mut ino = 1u32;
    let mut paths = Vec::new();
    collect_tree(root, root, &mut paths)?;
    for relative in &paths {
        let host = root.join(relative);
        let meta =
            fs::symlink_metadata(&host).with_context(|| format!("reading {}", host.display()))?;
        let name = relative.to_string_lossy();
        ino += 1;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(&host)?;
            let target = target.to_string_lossy();
            cpio_entry(&mut out, ino, meta.mode(), 0, &name, target.as_bytes())?;
        } else if meta.is_dir() {
            cpio_entry(&mut out, ino, meta.mode(), 0, &name, &[])?;
        } else {
            let data = fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
            cpio_entry(&mut out, ino, meta.mode(), 0, &name, &data)?;
        }
    }
    // Character device 5:1, rw for root.
    cpio_entry(
        &mut out,
        ino + 1,
        0o020600,
        (5 << 8) | 1,
        "dev/console",
        &[],
    )?;
    cpio_entry(&mut out, 0, 0, 0, "TRAILER!!!", &[])?;
    out.flush()
        .with_context(|| format!("writing {}", archive.display()))
}

/// Every path under `dir`, relative to `root`, parents before children.
fn collect_tree(root: &Path, dir: &Path, paths: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let path = entry.path();
        paths.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        if entry.file_type()?.is_dir() {
            collect_tree(root, &path, paths)?;
        }
    }
    Ok(())
}

/// One newc entry: header, name, data, each padded to 4 bytes. `rdev` is major << 8 | minor.
fn cpio_entry(
    out: &mut impl Write,
    ino: u32,
    mode: u32,
    rdev: u32,
    name: &str,
    data: &[u8],
) -> anyhow::Result<()> {
    let name_size = name.len() + 1;
    let header = format!(
        "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{name_size:08x}{:08x}",
        0, // uid: root
        0, // gid: root
        1, // nlink
        0, // mtime: reproducible
        data.len(),
        0, // dev major
        0, // dev minor
        rdev >> 8,
        rdev & 0xff,
        0, // check
    );
    let pad = |n: usize| (4 - n % 4) % 4;
    out.write_all(header.as_bytes())?;
    out.write_all(name.as_bytes())?;
    out.write_all(&[0])?;
    out.write_all(&[0; 4][..pad(header.len() + name_size)])?;
    out.write_all(data)?;
    out.write_all(&[0; 4][..pad(data.len())])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quoting_survives_quotes() {
        assert_eq!(shell_quote("a'b"), r"'a'\''b'");
    }
}
