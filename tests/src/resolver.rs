//! A real resolver for the DNS tests and bench: dnsmasq in a pod, answering only what it is
//! told (`--address=/name/ip`), logging every query it gets.

use std::{path::Path, process::Command};

use crate::{Pod, Result};

impl crate::Testbed {
    /// Starts dnsmasq on `pod`'s IPv4 address, port 53, with no upstream and no hosts file,
    /// logging every query to `query_log`, with `options` besides (its `--address=` records);
    /// returns once it listens.
    pub fn start_dnsmasq(&self, pod: &Pod, query_log: &Path, options: &[&str]) -> Result<()> {
        let mut dnsmasq = Command::new("dnsmasq");
        dnsmasq
            .args([
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--user=root",
                "--pid-file=",
                "--log-queries",
            ])
            .arg(format!("--log-facility={}", query_log.display()))
            .arg(format!("--listen-address={}", pod.ipv4()))
            .args(options);
        self.spawn_in_pod(pod, dnsmasq)?.detach();
        self.wait_listening(pod, 53)
    }
}
