//! A minimal blocking HTTP/1.1 GET, made from inside a network namespace.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use crate::{
    error::{IoContext, Result, TestbedError},
    netns,
};

/// GETs `path` from `addr` over a socket created inside network namespace `netns_name`.
pub(crate) fn get_in_netns(
    netns_name: &str,
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    let path = path.to_owned();
    netns::in_netns(netns_name, move || {
        // The socket is created on this thread, so it lives in the namespace for good.
        let mut stream = TcpStream::connect_timeout(&addr, timeout)
            .io_context(|| format!("connecting to {addr}"))?;
        stream
            .set_read_timeout(Some(timeout))
            .and_then(|()| stream.set_write_timeout(Some(timeout)))
            .io_context(|| "setting socket timeouts".to_owned())?;
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nAccept: */*\r\n\r\n"
        );
        stream
            .write_all(request.as_bytes())
            .io_context(|| format!("sending GET {path} to {addr}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .io_context(|| format!("reading the answer to GET {path} from {addr}"))?;
        parse_response(&raw)
    })
}

/// Sends `GET path` on a kept-alive connection and reads one response (Content-Length
/// framed): (status, body).
pub fn get_on_connection(stream: &mut TcpStream, path: &str) -> Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: testbed\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .io_context(|| format!("sending GET {path}"))?;
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        stream
            .read_exact(&mut byte)
            .io_context(|| format!("reading the head of the answer to GET {path}"))?;
        raw.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&raw).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| TestbedError::Other(format!("no Content-Length in {head:?}")))?;
    let mut body = vec![0u8; length];
    stream
        .read_exact(&mut body)
        .io_context(|| format!("reading the body of the answer to GET {path}"))?;
    raw.extend_from_slice(&body);
    parse_response(&raw)
}

/// Parses a complete HTTP/1.1 response: status code and body (Content-Length or chunked).
pub(crate) fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let bad = |why: &str| TestbedError::Other(format!("malformed HTTP response: {why}"));
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(&format!("status line {status_line:?}")))?;
    let mut content_length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            if name == "content-length" {
                content_length = value.parse::<usize>().ok();
            } else if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
                chunked = true;
            }
        }
    }
    let decoded;
    if chunked {
        decoded = decode_chunked(body).ok_or_else(|| bad("bad chunked body"))?;
        body = &decoded;
    } else if let Some(length) = content_length {
        body = body
            .get(..length)
            .ok_or_else(|| bad("body shorter than Content-Length"))?;
    }
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

fn decode_chunked(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bodies() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        assert_eq!(parse_response(plain).unwrap(), (200, "hello".into()));
        let chunked =
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nnot\r\n6\r\n ready\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (503, "not ready".into()));
        let eof = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{}";
        assert_eq!(parse_response(eof).unwrap(), (200, "{}".into()));
    }
}
