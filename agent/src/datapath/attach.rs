//! Attaching the programs to the pod cgroup root through pinned bpf links.
//!
//! Links are pinned as `links/<program>-<generation>` (bpffs refuses dots in names). A restarted agent attaches its new
//! programs next to the old ones (multi-attach) before unpinning the old links, so capture
//! never has a gap (bpf links always coexist with other links on a cgroup, which is why the
//! attach mode is the plain one: the kernel rejects flags on link creation): while both run, the second connect hook sees the loopback address the
//! first one wrote and leaves it alone.

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

const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    program_names::CONNECT4,
    program_names::CONNECT6,
    program_names::GETPEERNAME4,
    program_names::GETPEERNAME6,
];

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

pub(super) fn attach_all(
    ebpf: &mut Ebpf,
    cgroup: &Path,
    link_dir: &Path,
) -> Result<(), DatapathError> {
    let cgroup_file = File::open(cgroup).map_err(|source| DatapathError::OpenCgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    let generation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);

    for name in SOCK_ADDR_PROGRAMS {
        let link = attach_pinned!(
            program_mut::<CgroupSockAddr>(ebpf, name)?,
            name,
            &cgroup_file
        );
        replace_pinned(name, link, link_dir, generation)?;
    }
    let name = program_names::SOCK_OPS;
    let link = attach_pinned!(program_mut::<SockOps>(ebpf, name)?, name, &cgroup_file);
    replace_pinned(name, link, link_dir, generation)?;
    tracing::info!(cgroup = %cgroup.display(), "eBPF programs attached");
    Ok(())
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

/// Pins the new link, then unpins (and so detaches) every older link of the same program.
fn replace_pinned(
    name: &'static str,
    link: FdLink,
    link_dir: &Path,
    generation: u128,
) -> Result<(), DatapathError> {
    let path = link_dir.join(format!("{name}-{generation}"));
    let pinned: PinnedLink = link.pin(&path).map_err(|source| DatapathError::PinLink {
        name,
        path: path.clone(),
        source,
    })?;
    for old in older_links(link_dir, name, &path) {
        std::fs::remove_file(&old).map_err(|source| DatapathError::Remove {
            path: old.clone(),
            source,
        })?;
        tracing::info!(link = %old.display(), "replaced the previous agent's link");
    }
    // Dropping the PinnedLink closes our fd; the pin keeps the program attached.
    drop(pinned);
    Ok(())
}

fn older_links(link_dir: &Path, name: &str, current: &Path) -> Vec<PathBuf> {
    let prefix = format!("{name}-");
    let Ok(entries) = std::fs::read_dir(link_dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path != current)
        .filter(|path| {
            path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.strip_prefix(&prefix)
                    .is_some_and(|generation| generation.parse::<u128>().is_ok())
            })
        })
        .collect()
}
