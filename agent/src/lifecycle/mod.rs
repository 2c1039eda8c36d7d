//! Restarts and upgrades without dropping traffic: handing the in-pod listeners to a
//! successor (`handoff`) and finishing the connections in flight (`drain`).

pub mod drain;
pub mod handoff;
