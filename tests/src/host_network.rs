//! What a hostNetwork pod's process can do on a node: run in the node's network namespace
//! (in a cgroup of its own, not the agent's), bind ports there, make HTTP requests there.
//! The tests use it as the attacker next to the agent.

use std::{
    io,
    net::{SocketAddr, TcpListener},
    process::{Command, Output, Stdio},
    time::Duration,
};

use crate::{
    Testbed, cgroup, error::Result, exec::Placement, http, netns, workload::collect_output,
};

impl Testbed {
    /// The cgroup of `node`'s hostNetwork processes (`<node>/hostnet`), which is not the
    /// agent's (`<node>/system`).
    pub fn host_network_cgroup(&self, node: &str) -> std::path::PathBuf {
        self.cgroup_root(node).join("hostnet")
    }

    /// Runs `command` to completion (`timeout` at most) in `node`'s network namespace and its
    /// hostNetwork cgroup, as a process of a hostNetwork pod; captures stdout and stderr.
    pub fn run_on_node(
        &self,
        node: &str,
        mut command: Command,
        timeout: Duration,
    ) -> Result<Output> {
        let cgroup = self.host_network_cgroup(node);
        cgroup::create(&cgroup)?;
        let program = command.get_program().to_string_lossy().into_owned();
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = Placement::new(&self.node(node)?.netns, &cgroup)?.spawn(&mut command)?;
        collect_output(child, &program, &format!("node {node}"), timeout)
    }

    /// Tries to bind and listen on TCP `addr` in `node`'s network namespace as a root process
    /// there would, with SO_REUSEADDR and, if `reuse_port`, SO_REUSEPORT. The outer error is
    /// the testbed's; the inner one is the bind's.
    pub fn try_bind_on_node(
        &self,
        node: &str,
        addr: SocketAddr,
        reuse_port: bool,
    ) -> Result<io::Result<TcpListener>> {
        netns::in_netns(&self.node(node)?.netns, move || {
            let bind = || -> io::Result<TcpListener> {
                let socket = socket2::Socket::new(
                    socket2::Domain::for_address(addr),
                    socket2::Type::STREAM,
                    Some(socket2::Protocol::TCP),
                )?;
                socket.set_reuse_address(true)?;
                socket.set_reuse_port(reuse_port)?;
                socket.bind(&addr.into())?;
                socket.listen(16)?;
                Ok(socket.into())
            };
            Ok(bind())
        })
    }

    /// GETs `path` from `addr` inside `node`'s network namespace: (status, body).
    pub fn get_on_node(&self, node: &str, addr: SocketAddr, path: &str) -> Result<(u16, String)> {
        http::get_in_netns(&self.node(node)?.netns, addr, path, Duration::from_secs(5))
    }
}
