//! A minimal HTTP/1.1 keep-alive connection for the load generator: one
//! request at a time, written with one `write` and usually read back with
//! one `read`, with no pool, no per-request task and no header map. The load
//! generator shares the machine's cores with the server it measures, so
//! every microsecond it spends per request is taken from the server; the
//! SDK's hyper client costs about twice what this does.
//!
//! It understands exactly what `mls-ds` sends: a status line, headers with
//! `content-length`, and a body of that length. Anything else is an error.

use std::io;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Largest response head accepted (status line and headers).
const MAX_HEAD: usize = 16 * 1024;

/// One keep-alive connection.
pub struct LeanConn {
    stream: TcpStream,
    host: String,
    out: Vec<u8>,
    buf: Vec<u8>,
    /// Bytes in `buf` that belong to the response after the current one
    /// (none with one request at a time, kept for correctness).
    filled: usize,
    body_start: usize,
    body_end: usize,
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

impl LeanConn {
    /// Connect to `addr` (`host:port`, no scheme).
    pub async fn connect(addr: &str) -> io::Result<LeanConn> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(LeanConn {
            stream,
            host: addr.to_owned(),
            out: Vec::with_capacity(1024),
            buf: vec![0; 64 * 1024],
            filled: 0,
            body_start: 0,
            body_end: 0,
        })
    }

    /// Send one request and return the response's status and body (valid
    /// until the next request).
    pub async fn request(
        &mut self,
        method: &str,
        path_and_query: &str,
        authorization: Option<&str>,
        content_type: &str,
        body: &[u8],
    ) -> io::Result<(u16, &[u8])> {
        self.out.clear();
        let out = &mut self.out;
        for part in [
            method,
            " ",
            path_and_query,
            " HTTP/1.1\r\nhost: ",
            &self.host,
        ] {
            out.extend_from_slice(part.as_bytes());
        }
        if let Some(a) = authorization {
            out.extend_from_slice(b"\r\nauthorization: ");
            out.extend_from_slice(a.as_bytes());
        }
        if !body.is_empty() {
            out.extend_from_slice(b"\r\ncontent-type: ");
            out.extend_from_slice(content_type.as_bytes());
        }
        out.extend_from_slice(b"\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body);
        self.stream.write_all(&self.out).await?;
        let status = self.read_response().await?;
        Ok((status, &self.buf[self.body_start..self.body_end]))
    }

    async fn read_response(&mut self) -> io::Result<u16> {
        // Drop the previous response, keeping anything read past it.
        self.buf.copy_within(self.body_end..self.filled, 0);
        self.filled -= self.body_end;
        self.body_start = 0;
        self.body_end = 0;
        let head_end = loop {
            if let Some(i) = find(&self.buf[..self.filled], b"\r\n\r\n") {
                break i + 4;
            }
            if self.filled >= MAX_HEAD {
                return Err(bad("response head too large"));
            }
            self.fill().await?;
        };
        let (status, length) = parse_head(&self.buf[..head_end])?;
        let end = head_end + length;
        if end > self.buf.len() {
            self.buf.resize(end, 0);
        }
        while self.filled < end {
            self.fill().await?;
        }
        self.body_start = head_end;
        self.body_end = end;
        Ok(status)
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.filled == self.buf.len() {
            self.buf.resize(self.buf.len() * 2, 0);
        }
        let n = self.stream.read(&mut self.buf[self.filled..]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
        self.filled += n;
        Ok(())
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Status code and `content-length` of a response head.
fn parse_head(head: &[u8]) -> io::Result<(u16, usize)> {
    let text = std::str::from_utf8(head).map_err(|_| bad("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 "))
        .and_then(|l| l.get(..3))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| bad(format!("bad status line in {text:?}")))?;
    let mut length = None;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(bad("chunked responses are not supported"));
            }
        }
    }
    let length = length.ok_or_else(|| bad("response without content-length"))?;
    Ok((status, length))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_status_and_length() {
        let head = b"HTTP/1.1 201 Created\r\nContent-Type: x\r\ncontent-length: 12\r\n\r\n";
        assert_eq!(parse_head(head).unwrap(), (201, 12));
        assert!(parse_head(b"HTTP/1.1 200 OK\r\n\r\n").is_err());
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"SPDY 200\r\ncontent-length: 1\r\n\r\n").is_err());
    }
}
