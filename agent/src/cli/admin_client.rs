//! A minimal HTTP/1.0 GET against the agent's admin API (loopback, plain text or JSON).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error(
        "cannot reach the nodemesh agent's admin API at {addr}: {source} (is the agent running on this node? --admin sets the address)"
    )]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading {path} from {addr}: {source}")]
    Io {
        addr: SocketAddr,
        path: String,
        source: std::io::Error,
    },
    #[error("{path} from {addr}: not an HTTP response")]
    Malformed { addr: SocketAddr, path: String },
}

/// GETs `path`; returns the status code and the body.
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), AdminError> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|source| AdminError::Connect { addr, source })?;
    let io = |source| AdminError::Io {
        addr,
        path: path.to_owned(),
        source,
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(io)?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(io)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(io)?;
    let text = String::from_utf8_lossy(&response);
    let malformed = || AdminError::Malformed {
        addr,
        path: path.to_owned(),
    };
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(malformed)?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(malformed)?;
    Ok((status, body.to_owned()))
}
