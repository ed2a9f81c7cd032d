//! A guard under hyper's HTTP/1 parser against ambiguous request framing.
//!
//! hyper reads a request that carries both `Content-Length` and
//! `Transfer-Encoding` as chunked and closes the connection after the answer
//! (RFC 9112 §6.1 allows that), but it drops the `Content-Length` before the
//! handler runs, so the handler could not refuse such a request. A proxy in
//! front that trusts the length would disagree with the DS about where the
//! request ends: the DS refuses such requests instead, as nginx does.
//!
//! The guard follows the byte stream of a connection: request heads (held
//! back until complete, at most [`MAX_HEAD`] bytes), `Content-Length` bodies
//! and chunked bodies. When a head has both fields, it renames every
//! `Content-Length` in place to [`AMBIGUOUS_LENGTH`] (of the same length),
//! which the handler refuses with 400 and `Connection: close`. Whatever it
//! does not follow (HTTP/2, an oversized head, malformed chunks, framing
//! hyper refuses by itself) turns it into a plain pass-through, leaving hyper
//! to decide. Because a head is held back until complete, hyper cannot time
//! it out: the guard does, ending the connection when a head takes longer
//! than the read timeout (as hyper's own header timeout would).

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

/// The name a `Content-Length` gets in a request that also carries
/// `Transfer-Encoding` (exactly as long as `content-length`).
pub(crate) const AMBIGUOUS_LENGTH: &str = "x-ambiguous-cl";
/// Longest request head the guard holds back.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size or trailer line it follows.
const MAX_LINE: usize = 4096;
/// Most header fields it parses in one head (hyper allows 100).
const MAX_FIELDS: usize = 128;

/// Where in the request stream the next byte belongs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// A request head (possibly partial, held in `head`).
    Head,
    /// That many bytes of a `Content-Length` body.
    Body(u64),
    /// A chunk-size line (partial in `line`).
    ChunkSize,
    /// That many bytes of chunk data.
    ChunkData(u64),
    /// The CRLF after chunk data: how many of its two bytes are still due.
    ChunkEnd(u8),
    /// Trailer lines after the last chunk (partial in `line`).
    Trailers,
    /// Not followed any more: everything passes through.
    Passthrough,
}

/// A connection's stream with the guard on its read side.
pub(crate) struct FramingGuard<S> {
    inner: S,
    state: State,
    head: Vec<u8>,
    line: Vec<u8>,
    /// Bytes already judged, waiting for hyper to read them.
    out: Vec<u8>,
    out_pos: usize,
    /// How long a head may take to arrive, and the running deadline of the
    /// one held now.
    head_timeout: Duration,
    head_deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> FramingGuard<S> {
    /// Guard the stream `inner`; a request head must arrive within
    /// `head_timeout`.
    pub(crate) fn new(inner: S, head_timeout: Duration) -> FramingGuard<S> {
        FramingGuard {
            inner,
            state: State::Head,
            head: Vec::new(),
            line: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            head_timeout,
            head_deadline: None,
        }
    }

    /// Whether the head held back took too long (then the connection ends).
    fn head_overdue(&mut self, cx: &mut Context<'_>) -> bool {
        if self.state != State::Head || self.head.is_empty() {
            self.head_deadline = None;
            return false;
        }
        let timeout = self.head_timeout;
        self.head_deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)))
            .as_mut()
            .poll(cx)
            .is_ready()
    }

    /// Follow `data` through the stream, moving judged bytes to `out`.
    fn feed(&mut self, data: &[u8]) {
        let mut tail: Vec<u8>;
        let mut data = data;
        while !data.is_empty() {
            let used = match self.state {
                State::Passthrough => {
                    self.out.extend_from_slice(data);
                    data.len()
                }
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).map_or(data.len(), |n| n.min(data.len()));
                    self.out.extend_from_slice(&data[..take]);
                    self.counted(take as u64);
                    take
                }
                State::ChunkEnd(due) => {
                    let expected = if due == 2 { b'\r' } else { b'\n' };
                    self.out.push(data[0]);
                    self.state = match (data[0] == expected, due) {
                        (true, 2) => State::ChunkEnd(1),
                        (true, _) => State::ChunkSize,
                        (false, _) => State::Passthrough,
                    };
                    1
                }
                State::ChunkSize | State::Trailers => {
                    let end = data.iter().position(|b| *b == b'\n');
                    let used = end.map_or(data.len(), |i| i + 1);
                    self.line.extend_from_slice(&data[..used]);
                    self.out.extend_from_slice(&data[..used]);
                    if end.is_some() {
                        self.state = self.after_line();
                        self.line.clear();
                    } else if self.line.len() > MAX_LINE {
                        self.state = State::Passthrough;
                    }
                    used
                }
                State::Head => {
                    self.head.extend_from_slice(data);
                    match self.judge_head() {
                        // What followed the head: its body or the next request.
                        Some(rest) => {
                            tail = rest;
                            data = &tail;
                            continue;
                        }
                        None => data.len(),
                    }
                }
            };
            data = &data[used..];
        }
    }

    /// `n` bytes of a body or of chunk data went by.
    fn counted(&mut self, n: u64) {
        self.state = match self.state {
            State::Body(left) if left <= n => State::Head,
            State::Body(left) => State::Body(left - n),
            State::ChunkData(left) if left <= n => State::ChunkEnd(2),
            State::ChunkData(left) => State::ChunkData(left - n),
            other => other,
        };
    }

    /// The state after a complete chunk-size or trailer line.
    fn after_line(&self) -> State {
        let text = self.line.strip_suffix(b"\n").unwrap_or(&self.line);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        match self.state {
            State::ChunkSize => {
                let size = text.split(|b| *b == b';').next().unwrap_or_default();
                let size = std::str::from_utf8(size).map(str::trim);
                match size.map(|s| u64::from_str_radix(s, 16)) {
                    Ok(Ok(0)) => State::Trailers,
                    Ok(Ok(n)) => State::ChunkData(n),
                    _ => State::Passthrough,
                }
            }
            State::Trailers if text.is_empty() => State::Head,
            other => other,
        }
    }

    /// Decide on the head held so far. `Some(rest)` once it is complete
    /// (released to `out`, renamed if ambiguous), with the bytes after it;
    /// `None` while it is incomplete or once the guard gave up.
    fn judge_head(&mut self) -> Option<Vec<u8>> {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        let mut req = httparse::Request::new(&mut fields);
        let judged = match req.parse(&self.head) {
            Ok(httparse::Status::Complete(len)) => Some((len, framing(&req, self.head.as_ptr()))),
            Ok(httparse::Status::Partial) if self.head.len() <= MAX_HEAD => return None,
            // Too long, malformed, too many fields, HTTP/2: hyper decides.
            _ => None,
        };
        let Some((len, framing)) = judged else {
            self.out.append(&mut self.head);
            self.state = State::Passthrough;
            return None;
        };
        for at in framing.rename {
            if let Some(name) = self.head.get_mut(at..at + AMBIGUOUS_LENGTH.len()) {
                name.copy_from_slice(AMBIGUOUS_LENGTH.as_bytes());
            }
        }
        self.state = framing.next;
        self.head_deadline = None;
        let rest = self.head.split_off(len);
        self.out.append(&mut self.head);
        Some(rest)
    }
}

/// How a parsed head frames its body.
struct Framing {
    next: State,
    /// Offsets of `Content-Length` names to rename.
    rename: Vec<usize>,
}

fn framing(req: &httparse::Request<'_, '_>, base: *const u8) -> Framing {
    let mut codings: Option<&[u8]> = None;
    let mut length = Length::Absent;
    for field in req.headers.iter() {
        if field.name.eq_ignore_ascii_case("transfer-encoding") {
            codings = Some(field.value);
        } else if field.name.eq_ignore_ascii_case("content-length") {
            length = length.and(field.value);
        }
    }
    let next = match codings {
        // hyper refuses Transfer-Encoding in HTTP/1.0 and without a final
        // `chunked`: nothing to follow then.
        Some(_) if req.version != Some(1) => State::Passthrough,
        Some(value) if last_coding_is_chunked(value) => State::ChunkSize,
        Some(_) => State::Passthrough,
        None => match length {
            Length::Absent | Length::Is(0) => State::Head,
            Length::Is(n) => State::Body(n),
            Length::Invalid => State::Passthrough,
        },
    };
    // Only a head with both fields has names to rename (rare: found again
    // rather than collected for every request).
    let rename = match (codings, length) {
        (Some(_), Length::Is(_) | Length::Invalid) => req
            .headers
            .iter()
            .filter(|f| f.name.eq_ignore_ascii_case("content-length"))
            .map(|f| (f.name.as_ptr() as usize).wrapping_sub(base as usize))
            .collect(),
        _ => Vec::new(),
    };
    Framing { next, rename }
}

fn last_coding_is_chunked(value: &[u8]) -> bool {
    value
        .rsplit(|b| *b == b',')
        .next()
        .and_then(|c| std::str::from_utf8(c).ok())
        .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
}

/// What the `Content-Length` fields seen so far say.
#[derive(Clone, Copy)]
enum Length {
    /// No such field.
    Absent,
    /// Every value (comma lists included) agrees on this length.
    Is(u64),
    /// A value is not a number, or two disagree.
    Invalid,
}

impl Length {
    /// Fold in one more field's value.
    fn and(self, value: &[u8]) -> Length {
        let Ok(text) = std::str::from_utf8(value) else {
            return Length::Invalid;
        };
        text.split(',').fold(self, |seen, part| {
            match (seen, part.trim().parse::<u64>()) {
                (Length::Invalid, _) | (_, Err(_)) => Length::Invalid,
                (Length::Is(l), Ok(n)) if l != n => Length::Invalid,
                (_, Ok(n)) => Length::Is(n),
            }
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FramingGuard<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            match this.state {
                State::Passthrough => return Pin::new(&mut this.inner).poll_read(cx, buf),
                // Body bytes go straight into hyper's buffer, counted.
                State::Body(n) | State::ChunkData(n) => {
                    let limit =
                        usize::try_from(n).map_or(buf.remaining(), |n| n.min(buf.remaining()));
                    let mut direct = ReadBuf::new(buf.initialize_unfilled_to(limit));
                    match Pin::new(&mut this.inner).poll_read(cx, &mut direct) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) => {
                            let got = direct.filled().len();
                            buf.advance(got);
                            this.counted(got as u64);
                            return Poll::Ready(Ok(()));
                        }
                    }
                }
                _ => {
                    let mut scratch = [0u8; 8192];
                    let mut scan = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut this.inner).poll_read(cx, &mut scan) {
                        Poll::Pending if this.head_overdue(cx) => {
                            return Poll::Ready(Err(io::Error::new(
                                io::ErrorKind::TimedOut,
                                "request head not received within the read timeout",
                            )))
                        }
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(())) if scan.filled().is_empty() => {
                            // End of stream: hyper gets what was held back
                            // and then the end itself.
                            this.out.append(&mut this.head);
                            this.state = State::Passthrough;
                            if this.out.is_empty() {
                                return Poll::Ready(Ok(()));
                            }
                        }
                        Poll::Ready(Ok(())) => this.feed(scan.filled()),
                    }
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FramingGuard<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;

    use super::*;

    /// A socket that returns `pieces`, one per read, then the end.
    struct Pieces(std::collections::VecDeque<Vec<u8>>);

    impl AsyncRead for Pieces {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let this = self.get_mut();
            if let Some(mut piece) = this.0.pop_front() {
                let n = piece.len().min(buf.remaining());
                buf.put_slice(&piece[..n]);
                if n < piece.len() {
                    this.0.push_front(piece.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    /// What hyper would read through the guard, given the client's bytes in
    /// `pieces` (each one read of the socket).
    async fn through(pieces: &[&[u8]]) -> Vec<u8> {
        let socket = Pieces(pieces.iter().map(|p| p.to_vec()).collect());
        let mut guard = FramingGuard::new(socket, Duration::from_secs(10));
        let mut out = Vec::new();
        guard.read_to_end(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn plain_requests_pass_unchanged() {
        let stream: &[u8] = b"POST /a HTTP/1.1\r\nContent-Length: 5\r\n\r\nhelloGET /b HTTP/1.1\r\n\r\nPOST /c HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5;x=1\r\nabcde\r\n0\r\nT: 1\r\n\r\nGET /d HTTP/1.1\r\ncontent-length: 0\r\n\r\n";
        for split in [1, 3, 17, stream.len()] {
            let pieces: Vec<&[u8]> = stream.chunks(split).collect();
            assert_eq!(through(&pieces).await, stream, "read in pieces of {split}");
        }
    }

    #[tokio::test]
    async fn content_length_with_transfer_encoding_is_renamed_in_any_order() {
        let first: &[u8] = b"GET /ok HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi";
        let ambiguous = [
            &b"POST /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"[..],
            b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n0\r\n\r\n",
        ];
        for request in ambiguous {
            let stream = [first, request].concat();
            for split in [1, 7, stream.len()] {
                let pieces: Vec<&[u8]> = stream.chunks(split).collect();
                let out = through(&pieces).await;
                assert_eq!(out.len(), stream.len());
                let text = String::from_utf8(out).unwrap();
                assert!(
                    text.starts_with("GET /ok HTTP/1.1\r\ncontent-length: 2\r\n"),
                    "{text}"
                );
                assert!(text.contains("x-ambiguous-cl: 5\r\n"), "{text}");
                assert_eq!(
                    text.to_ascii_lowercase().matches("content-length").count(),
                    1,
                    "{text}"
                );
            }
        }
    }

    #[tokio::test]
    async fn what_it_cannot_follow_passes_through() {
        let h2: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(through(&[h2]).await, h2);
        let bad_chunk: &[u8] = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nPOST / HTTP/1.1\r\ncontent-length: 1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert_eq!(
            through(&[bad_chunk]).await,
            bad_chunk,
            "not followed after a bad chunk"
        );
        let partial: &[u8] = b"GET / HTTP/1.1\r\nHost: x";
        assert_eq!(
            through(&[partial]).await,
            partial,
            "a cut head is released at the end"
        );
    }
}
