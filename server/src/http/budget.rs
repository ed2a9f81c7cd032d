//! Memory the DS holds on behalf of peers, bounded whatever they do:
//! request bodies while they are read (per source address and in total),
//! and response bodies and queue stream events until they are sent (per
//! client and in total).
//!
//! A response body holds its share until its last piece is handed to
//! hyper: a large body is handed over in [`PIECE`]-sized copies, so that the
//! page behind it is freed at that moment, not when hyper has written the
//! last slice of it. What hyper and h2 buffer beyond that is bounded per
//! connection by their buffer limits (set in [`super`]), and a peer that
//! does not read loses its connection, and all it holds, after the write
//! timeout (`conn`).

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use mls_ds_protocol::ClientId;

use super::response::ApiError;
use crate::counts::{ClientCounts, Counted, Full, SourceCounts};

/// Bodies up to this size are handed over as they are; larger ones in
/// copies of this size.
pub(crate) const PIECE: usize = 16 * 1024;

/// Memory limits, in bytes.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MemoryLimits {
    /// Request bodies being read, in total.
    pub(crate) requests_total: usize,
    /// Request bodies being read from one source address.
    pub(crate) requests_per_source: usize,
    /// Response bodies not yet sent, in total.
    pub(crate) responses_total: usize,
    /// Response bodies not yet sent to one client.
    pub(crate) responses_per_client: usize,
}

/// The memory budgets of one server.
pub(crate) struct Budgets {
    limits: MemoryLimits,
    requests: Arc<SourceCounts>,
    responses: Arc<ClientCounts>,
}

/// A request body's share of the request budget.
pub(crate) type RequestShare = Counted<IpAddr>;

impl Budgets {
    /// Nothing held yet.
    pub(crate) fn new(limits: MemoryLimits) -> Budgets {
        Budgets {
            limits,
            requests: Arc::default(),
            responses: Arc::default(),
        }
    }

    /// A share of `bytes` for a request body from `source`.
    pub(crate) fn request(&self, source: IpAddr, bytes: usize) -> Result<RequestShare, ApiError> {
        let limits = &self.limits;
        self.requests
            .try_acquire_n(
                &source,
                bytes,
                limits.requests_per_source,
                limits.requests_total,
            )
            .map_err(request_refusal)
    }

    /// `more` bytes on top of `share`.
    pub(crate) fn grow_request(
        &self,
        share: &mut RequestShare,
        more: usize,
    ) -> Result<(), ApiError> {
        let limits = &self.limits;
        share
            .try_grow(more, limits.requests_per_source, limits.requests_total)
            .map_err(request_refusal)
    }

    /// Give `body`, an answer to `client`, its share of the response
    /// budget; past a limit, a `refusable` answer is refused, any other is
    /// counted all the same (it reports a change already made).
    pub(crate) fn response(
        &self,
        client: &ClientId,
        body: &mut BytesBody,
        refusable: bool,
    ) -> Result<(), ApiError> {
        if !refusable {
            let len = body.0.left();
            if len > 0 {
                body.0.share = Some(self.responses.acquire_n(client, len));
            }
            return Ok(());
        }
        self.hold(client, &mut body.0).map_err(|full| match full {
            Full::Key => ApiError::TooMuchAtOnce(format!(
                "this answer would take this client's responses not yet read past {} bytes; \
                 read those before asking for more",
                self.limits.responses_per_client
            )),
            Full::Total => ApiError::Overloaded,
        })
    }

    /// Give `pieces`, bytes to be sent to `client`, their share of the
    /// response budget.
    pub(crate) fn hold(&self, client: &ClientId, pieces: &mut Pieces) -> Result<(), Full> {
        let len = pieces.left();
        if len == 0 {
            return Ok(());
        }
        let limits = &self.limits;
        // One response larger than a limit still goes when nothing else is
        // held under that limit: a page can always be sent, one at a time.
        let share = self.responses.try_acquire_n(
            client,
            len,
            limits.responses_per_client.max(len),
            limits.responses_total.max(len),
        )?;
        pieces.share = Some(share);
        Ok(())
    }

    /// Bytes held now: request bodies, response bodies.
    pub(crate) fn held(&self) -> (usize, usize) {
        (self.requests.total(), self.responses.total())
    }
}

fn request_refusal(full: Full) -> ApiError {
    match full {
        Full::Key => {
            ApiError::TooMuchAtOnce("this address is sending too many request bytes at once".into())
        }
        Full::Total => ApiError::Overloaded,
    }
}

/// Bytes handed over in pieces: whole if small, in copies of [`PIECE`]
/// bytes if large; their budget share is given back with the last piece.
pub(crate) struct Pieces {
    data: Bytes,
    sent: usize,
    share: Option<Counted<ClientId>>,
}

impl Pieces {
    /// `data`, not yet handed over.
    pub(crate) fn new(data: impl Into<Bytes>) -> Pieces {
        Pieces {
            data: data.into(),
            sent: 0,
            share: None,
        }
    }

    /// Bytes not yet handed over.
    pub(crate) fn left(&self) -> usize {
        self.data.len() - self.sent
    }

    /// The next piece, if any is left.
    pub(crate) fn next_piece(&mut self) -> Option<Bytes> {
        if self.left() == 0 {
            self.share = None;
            return None;
        }
        if self.data.len() <= PIECE {
            self.share = None;
            return Some(std::mem::take(&mut self.data));
        }
        let end = self.sent + self.left().min(PIECE);
        let piece = Bytes::copy_from_slice(&self.data[self.sent..end]);
        self.sent = end;
        if self.left() == 0 {
            // The bytes themselves are not needed any more.
            self.data = Bytes::new();
            self.sent = 0;
            self.share = None;
        }
        Some(piece)
    }
}

/// A response body of bytes, handed to hyper in [`Pieces`].
pub(crate) struct BytesBody(Pieces);

impl BytesBody {
    /// A body of `data`.
    pub(crate) fn new(data: impl Into<Bytes>) -> BytesBody {
        BytesBody(Pieces::new(data))
    }
}

impl Body for BytesBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().0.next_piece().map(|b| Ok(Frame::data(b))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.left() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.0.left() as u64)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    const LIMITS: MemoryLimits = MemoryLimits {
        requests_total: 1000,
        requests_per_source: 600,
        responses_total: 5 * PIECE / 2 + 10,
        responses_per_client: 2 * PIECE + 10,
    };

    #[tokio::test]
    async fn large_bodies_go_in_pieces_and_give_back_their_share() {
        let budgets = Budgets::new(LIMITS);
        let a = ClientId::new("a").unwrap();
        let data: Vec<u8> = (0..PIECE + PIECE / 2).map(|i| i as u8).collect();
        let mut body = BytesBody::new(data.clone());
        budgets.response(&a, &mut body, true).unwrap();
        assert_eq!(budgets.held().1, data.len());
        let mut again = BytesBody::new(data.clone());
        assert!(matches!(
            budgets.response(&a, &mut again, true),
            Err(ApiError::TooMuchAtOnce(_))
        ));
        assert_eq!(body.size_hint().exact(), Some(data.len() as u64));
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(first.len(), PIECE);
        assert_eq!(budgets.held().1, data.len(), "held until the last piece");
        let second = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!([first, second].concat(), data);
        assert!(body.is_end_stream());
        assert_eq!(budgets.held().1, 0);
        assert!(body.frame().await.is_none());
    }

    #[tokio::test]
    async fn small_bodies_are_one_frame_and_counted_until_taken() {
        let budgets = Budgets::new(LIMITS);
        let mut body = BytesBody::new(vec![7u8; 100]);
        budgets
            .response(&ClientId::new("a").unwrap(), &mut body, true)
            .unwrap();
        assert_eq!(budgets.held().1, 100);
        let collected = body.collect().await.unwrap().to_bytes();
        assert_eq!(collected.as_ref(), &[7u8; 100][..]);
        assert_eq!(budgets.held().1, 0);
    }

    #[test]
    fn the_total_response_budget_is_shared_and_a_full_one_is_overload() {
        let budgets = Budgets::new(LIMITS);
        let mut held = Vec::new();
        for name in ["a", "b"] {
            let mut body = BytesBody::new(vec![0u8; PIECE + 1]);
            budgets
                .response(&ClientId::new(name).unwrap(), &mut body, true)
                .unwrap();
            held.push(body);
        }
        let mut third = BytesBody::new(vec![0u8; PIECE + 1]);
        assert!(matches!(
            budgets.response(&ClientId::new("c").unwrap(), &mut third, true),
            Err(ApiError::Overloaded)
        ));
    }

    #[test]
    fn a_response_over_the_limits_goes_alone() {
        let budgets = Budgets::new(LIMITS);
        let a = ClientId::new("a").unwrap();
        let mut huge = BytesBody::new(vec![0u8; 4 * PIECE]);
        budgets.response(&a, &mut huge, true).unwrap();
        let mut small_but_counted = BytesBody::new(vec![0u8; PIECE + 1]);
        assert!(budgets.response(&a, &mut small_but_counted, true).is_err());
        drop(huge);
        budgets.response(&a, &mut small_but_counted, true).unwrap();
    }

    #[test]
    fn the_answer_to_a_write_is_never_refused_but_counted() {
        let budgets = Budgets::new(LIMITS);
        let a = ClientId::new("a").unwrap();
        let mut held = BytesBody::new(vec![0u8; 2 * PIECE]);
        budgets.response(&a, &mut held, true).unwrap();
        let mut read = BytesBody::new(vec![0u8; PIECE]);
        assert!(budgets.response(&a, &mut read, true).is_err());
        let mut write = BytesBody::new(vec![0u8; PIECE]);
        budgets.response(&a, &mut write, false).unwrap();
        assert_eq!(budgets.held().1, 3 * PIECE);
    }

    #[test]
    fn request_shares_grow_within_their_limits() {
        let budgets = Budgets::new(LIMITS);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
        let mut share = budgets.request(a, 500).unwrap();
        assert!(matches!(
            budgets.grow_request(&mut share, 101),
            Err(ApiError::TooMuchAtOnce(_))
        ));
        budgets.grow_request(&mut share, 100).unwrap();
        assert!(matches!(budgets.request(b, 401), Err(ApiError::Overloaded)));
        drop(share);
        assert!(budgets.request(b, 600).is_ok());
    }
}
