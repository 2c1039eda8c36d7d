//! `handoff-probe`: asks an agent's listener handoff socket for the pods' listening sockets
//! as a successor would (docs/lifecycle.md: `Hello`, then one `Listener` message with a
//! descriptor per socket, then `End`), and leaves without taking over. It prints what it
//! got, with its own uid and effective capabilities, so a test can run it as a process the
//! agent must refuse and as one it must not.

use std::{
    io::{IoSlice, IoSliceMut},
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    path::Path,
};

use anyhow::Context;
use nix::sys::{
    socket::{
        self, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockType, UnixAddr, sockopt,
    },
    time::TimeVal,
};
use serde_json::{Value, json};

#[derive(clap::Args)]
pub struct HandoffProbeArgs {
    #[arg(long)]
    socket: std::path::PathBuf,
}

/// The handoff protocol version of the agent this speaks to.
const VERSION: u32 = 1;

/// What the agent answered.
#[derive(Default)]
struct Answer {
    /// `listeners`: it handed its sockets over; `refused`: it said no; `closed`: it hung up.
    outcome: &'static str,
    reason: Option<String>,
    listeners: usize,
    descriptors: usize,
}

pub fn run(args: &HandoffProbeArgs) -> anyhow::Result<()> {
    let path: &Path = &args.socket;
    let status = std::fs::read_to_string("/proc/self/status").context("reading my status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or_default().to_owned())
    };
    let connection = socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .context("creating a socket")?;
    socket::setsockopt(&connection, sockopt::ReceiveTimeout, &TimeVal::new(10, 0))
        .context("setting a receive timeout")?;
    let address = UnixAddr::new(path).context("naming the socket")?;
    let connected = socket::connect(connection.as_raw_fd(), &address);
    let answer = match connected {
        Ok(()) => converse(&connection)?,
        Err(errno) => Answer {
            outcome: "unreachable",
            reason: Some(errno.to_string()),
            ..Answer::default()
        },
    };
    println!(
        "{}",
        json!({
            "outcome": answer.outcome,
            "reason": answer.reason,
            "listeners": answer.listeners,
            "descriptors": answer.descriptors,
            "uid": field("Uid:"),
            "cap_eff": field("CapEff:"),
        })
    );
    Ok(())
}

fn converse(connection: &OwnedFd) -> anyhow::Result<Answer> {
    let hello = serde_json::to_vec(&json!({"type": "hello", "version": VERSION}))?;
    // A refusal may close the connection before the hello is sent: read why anyway.
    let _ = socket::sendmsg::<UnixAddr>(
        connection.as_raw_fd(),
        &[IoSlice::new(&hello)],
        &[],
        MsgFlags::MSG_NOSIGNAL,
        None,
    );
    let mut answer = Answer::default();
    loop {
        let Some((message, fds)) = receive(connection)? else {
            answer.outcome = if answer.listeners > 0 {
                "listeners"
            } else {
                "closed"
            };
            return Ok(answer);
        };
        answer.descriptors += fds;
        match message["type"].as_str() {
            Some("listener") => answer.listeners += 1,
            Some("end") => {
                answer.outcome = "listeners";
                return Ok(answer);
            }
            Some("refused") => {
                answer.outcome = "refused";
                answer.reason = message["reason"].as_str().map(str::to_owned);
                return Ok(answer);
            }
            _ => anyhow::bail!("unexpected message {message}"),
        }
    }
}

/// One message and how many descriptors came with it (closed at once); `None` at EOF.
fn receive(connection: &OwnedFd) -> anyhow::Result<Option<(Value, usize)>> {
    let mut buffer = vec![0u8; 16 * 1024];
    let mut control = nix::cmsg_space!([RawFd; 4]);
    let mut iov = [IoSliceMut::new(&mut buffer)];
    // An agent that closed with our hello unread is reported as a reset first, and what it
    // sent before closing (a refusal, say) can be read after that.
    let mut reset_seen = false;
    let received = loop {
        match socket::recvmsg::<UnixAddr>(
            connection.as_raw_fd(),
            &mut iov,
            Some(&mut control),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(received) => break received,
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::ECONNRESET) if !reset_seen => reset_seen = true,
            Err(errno) => return Err(errno).context("receiving"),
        }
    };
    let mut descriptors = 0;
    for message in received.cmsgs().context("reading the descriptors")? {
        if let ControlMessageOwned::ScmRights(fds) = message {
            descriptors += fds.len();
            for fd in fds {
                // SAFETY: SCM_RIGHTS installed this descriptor for us alone; closing it.
                drop(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    let length = received.bytes;
    if length == 0 {
        return Ok(None);
    }
    let message = serde_json::from_slice(&buffer[..length]).context("decoding a message")?;
    Ok(Some((message, descriptors)))
}
