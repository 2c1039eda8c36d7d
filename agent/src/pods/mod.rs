//! Local pods as the node sees them: their cgroups, their network namespaces, and the
//! enrolment that ties a meshed pod to the datapath and the proxy.

pub mod addresses;
pub mod cgroup;
pub mod enrolment;
mod failure;
mod listeners;
mod pending;
pub mod routing;
