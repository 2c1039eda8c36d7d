//! The nodemesh agent as a library: the `nodemesh` binary (src/main.rs) is its command line,
//! and the fuzz targets (fuzz/) call its parsers directly.

pub mod admin;
pub mod agent;
pub mod bounds;
pub mod ca;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod dns;
pub mod identity;
pub mod k8s;
pub mod lifecycle;
pub mod netns;
pub mod peer;
pub mod pods;
pub mod proxy;
pub mod serving;
pub mod state;
pub mod telemetry;
