//! Attaching the programs to the pod cgroup root through pinned bpf links.
//!
//! Links are pinned as `links/<program>-<generation>` (bpffs refuses dots in names). A
//! starting agent attaches its programs next to the ones already there (bpf links always
//! coexist on a cgroup, which is why the attach mode is the plain one: the kernel rejects
//! flags on link creation), and unpins every other link only once it is in charge and has
//! filled its maps ([`retire_other_links`]), so capture never has a gap, also when its maps
//! are new ones of another layout. While both run, the second connect hook sees the loopback
//! address the first one wrote and leaves it alone.

use std::{
    fs::File,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use aya::{
    Ebpf,
    programs::{
        CgroupAttachMode, CgroupSockAddr, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use nodemesh_common::program_names;

use super::DatapathError;

/// Loads a cgroup program, attaches it to the cgroup through a bpf link and hands the link
/// over as an `FdLink` ready to pin. A macro because aya's program types share these methods
/// without sharing a trait.
macro_rules! attach_pinned {
    ($program:expr, $name:expr, $cgroup:expr) => {{
        let program = $program;
        let name = $name;
        let program_error = |source| DatapathError::Program { name, source };
        program.load().map_err(program_error)?;
        let link_id = program
            .attach($cgroup, CgroupAttachMode::Single)
            .map_err(program_error)?;
        let link = program.take_link(link_id).map_err(program_error)?;
        FdLink::try_from(link).map_err(|source| DatapathError::Program {
            name,
            source: aya::programs::ProgramError::from(source),
        })?
    }};
}

/// Attaches every cgroup program (with `dns`, the DNS ones too) and pins its link; returns
/// the pins, this agent's links.
pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    link_dir: &Path,
    dns: bool,
) -> Result<Vec<PathBuf>, DatapathError> {
    let cgroup_file = File::open(cgroup).map_err(|source| DatapathError::OpenCgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);

    let mut pins = Vec::new();
    let dns: &[&str] = if dns { &program_names::CGROUP_DNS } else { &[] };
    for name in program_names::CGROUP.into_iter().chain(dns.iter().copied()) {
        let link = if name == program_names::SOCK_OPS {
            attach_pinned!(program_mut::<SockOps>(ebpf, name)?, name, &cgroup_file)
        } else {
            attach_pinned!(
                program_mut::<CgroupSockAddr>(ebpf, name)?,
                name,
                &cgroup_file
            )
        };
        pins.push(pin(name, link, link_dir, generation)?);
    }
    tracing::info!(cgroup = %cgroup.display(), "eBPF programs attached");
    Ok(pins)
}

/// Loads the inbound sk_lookup program; it is attached per pod by [`attach_inbound`].
pub(super) fn load_inbound(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let name = program_names::INBOUND_LOOKUP;
    program_mut::<SkLookup>(ebpf, name)?
        .load()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Attaches the inbound program to a pod's network namespace and pins the link at `pin`,
/// atomically replacing (and so detaching) a link pinned there before: plaintext capture
/// of the pod has no gap when an agent re-enrols it.
pub(super) fn attach_inbound(
    ebpf: &mut Ebpf,
    netns: &File,
    pin: &Path,
) -> Result<(), DatapathError> {
    let name = program_names::INBOUND_LOOKUP;
    let program_error = |source| DatapathError::Program { name, source };
    let program = program_mut::<SkLookup>(ebpf, name)?;
    let link_id = program.attach(netns).map_err(program_error)?;
    let link = program.take_link(link_id).map_err(program_error)?;
    let link = FdLink::from(link);
    let staging = pin.with_file_name(format!(
        "{}-new",
        pin.file_name().and_then(|n| n.to_str()).unwrap_or("link")
    ));
    let _ = std::fs::remove_file(&staging);
    let pinned = link
        .pin(&staging)
        .map_err(|source| DatapathError::PinLink {
            name,
            path: staging.clone(),
            source,
        })?;
    std::fs::rename(&staging, pin).map_err(|source| DatapathError::Remove {
        path: staging.clone(),
        source,
    })?;
    drop(pinned);
    Ok(())
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, DatapathError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let program = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram(name))?;
    program
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Pins a new link at `links/<program>-<generation>`.
fn pin(
    name: &'static str,
    link: FdLink,
    link_dir: &Path,
    generation: u128,
) -> Result<PathBuf, DatapathError> {
    let path = link_dir.join(format!("{name}-{generation}"));
    let pinned: PinnedLink = link.pin(&path).map_err(|source| DatapathError::PinLink {
        name,
        path: path.clone(),
        source,
    })?;
    // Dropping the PinnedLink closes our fd; the pin keeps the program attached.
    drop(pinned);
    Ok(path)
}

/// Unpins (and so detaches) every cgroup link in `link_dir` but `ours`: the previous
/// agent's, and links of other agent versions whatever their program is called. The
/// per-pod inbound links live in a directory of their own and stay.
pub(super) fn retire_other_links(link_dir: &Path, ours: &[PathBuf]) -> usize {
    super::unpin_others(
        link_dir,
        |name| {
            ours.iter()
                .any(|own| own.file_name().is_some_and(|n| n == name))
        },
        "unpinned the link of another agent (its program is detached)",
    )
}
