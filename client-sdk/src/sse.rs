//! Reading the DS's queue stream (`GET /v1/queue/stream`): server-sent
//! events, each `page` event a base64 `QueuePage`; comments (keep-alives)
//! and other fields are skipped.

use base64::Engine as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mls_ds_protocol::queue::QueuePage;

use crate::error::{ClientError, Result};

/// Longest event the reader buffers: far above a page's size limit, so
/// that only a broken stream reaches it.
const MAX_EVENT_BYTES: usize = 64 * 1024 * 1024;
/// The DS sends something at least every 20 s; silence this long means a
/// dead connection (a dropped NAT mapping, a network switch).
const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// An open queue stream.
pub struct QueueStream {
    body: Incoming,
    events: Events,
    url: String,
}

/// The events of a stream, from its bytes as they arrive.
#[derive(Default)]
struct Events {
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no event end, so that a large
    /// event arriving in many frames is not searched from its start again.
    scanned: usize,
}

impl Events {
    fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next page among the complete events buffered; `None` when more
    /// bytes are needed.
    fn next_page(&mut self) -> Result<Option<QueuePage>> {
        while let Some(end) = event_end(&self.buf, self.scanned) {
            let event: Vec<u8> = self.buf.drain(..end).collect();
            self.scanned = 0;
            if let Some(page) = parse_event(&event)? {
                return Ok(Some(page));
            }
        }
        // The last byte may start the blank line that ends the event.
        self.scanned = self.buf.len().saturating_sub(1);
        if self.buf.len() > MAX_EVENT_BYTES {
            return Err(ClientError::BadResponse(
                "queue stream event too large".into(),
            ));
        }
        Ok(None)
    }
}

/// The pages of a queue stream whose bytes arrive in `chunks` (for the fuzz
/// target of the stream reader).
#[cfg(feature = "test-hooks")]
pub fn pages_of(chunks: &[&[u8]]) -> Result<Vec<QueuePage>> {
    let mut events = Events::default();
    let mut pages = Vec::new();
    for chunk in chunks {
        events.feed(chunk);
        while let Some(page) = events.next_page()? {
            pages.push(page);
        }
    }
    Ok(pages)
}

impl QueueStream {
    pub(crate) fn new(body: Incoming, url: String) -> QueueStream {
        QueueStream {
            body,
            events: Events::default(),
            url,
        }
    }

    /// The next page; `None` when the DS ended the stream (reconnect from
    /// the cursor to go on).
    pub async fn next_page(&mut self) -> Result<Option<QueuePage>> {
        loop {
            if let Some(page) = self.events.next_page()? {
                return Ok(Some(page));
            }
            let frame = tokio::time::timeout(IDLE_TIMEOUT, self.body.frame())
                .await
                .map_err(|_| ClientError::ConnectionLost {
                    url: self.url.clone(),
                    detail: "the queue stream was silent for 60 s".into(),
                })?;
            match frame {
                None => return Ok(None),
                Some(Err(e)) => {
                    return Err(ClientError::ConnectionLost {
                        url: self.url.clone(),
                        detail: e.to_string(),
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.events.feed(&data);
                    }
                }
            }
        }
    }
}

/// Where the first complete event in `buf` ends (after its blank line),
/// searching from `from`.
fn event_end(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|i| from + i + 2)
}

/// The page an event carries, if it is a `page` event.
fn parse_event(event: &[u8]) -> Result<Option<QueuePage>> {
    let text = std::str::from_utf8(event)
        .map_err(|_| ClientError::BadResponse("queue stream event is not UTF-8".into()))?;
    let mut kind = "message";
    let mut data = String::new();
    for line in text.lines() {
        if line.starts_with(':') {
            continue;
        }
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "event" => kind = value,
            "data" => data.push_str(value),
            _ => {}
        }
    }
    if kind != "page" || data.is_empty() {
        return Ok(None);
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.as_bytes())
        .map_err(|e| ClientError::BadResponse(format!("queue stream page: {e}")))?;
    mls_ds_protocol::decode(&bytes)
        .map(Some)
        .map_err(|e| ClientError::BadResponse(format!("queue stream page: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_are_read_and_everything_else_skipped() {
        let page = QueuePage {
            entries: Vec::new(),
            head: 7,
            acked: 3,
        };
        let data = base64::engine::general_purpose::STANDARD
            .encode(mls_ds_protocol::encode(&page).unwrap());
        let event = format!("id: 7\nevent: page\ndata: {data}\n\n");
        assert_eq!(parse_event(event.as_bytes()).unwrap(), Some(page));
        assert_eq!(parse_event(b": keep-alive\n\n").unwrap(), None);
        assert_eq!(parse_event(b"retry: 1000\n\n").unwrap(), None);
        assert!(parse_event(b"event: page\ndata: !!\n\n").is_err());
        assert_eq!(event_end(b"a\n\nb", 0), Some(3));
        assert_eq!(event_end(b"a\n\nb", 1), Some(3));
        assert_eq!(event_end(b"a\nb", 0), None);
        assert_eq!(event_end(b"a", 5), None);
    }
}
