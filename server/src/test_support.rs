//! In-process access for the fuzz targets and the benches (feature
//! `test-support`, which release builds do not enable): a DS on a data
//! directory served request by request through the real HTTP adapter, and
//! the authenticator on its own.

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use clap::Parser as _;
use http_body_util::{BodyExt, Full};
use hyper::Request;

pub use crate::service::auth::{Authenticator, Caller, RegisteredKey, RequestView};
pub use crate::service::error::DsError;

use crate::backend::sled::SledBackend;
use crate::config::Cli;
use crate::http::Front;
use crate::state_cell::StateCell;

/// A DS served in process, without sockets.
pub struct InProcess {
    front: Front<SledBackend>,
}

impl InProcess {
    /// Open (or create) a DS in `data_dir`, with `flags` as `mls-ds` takes
    /// them on its command line (e.g. `["--max-wait-ms", "0"]`).
    pub fn open(data_dir: &Path, flags: &[&str]) -> Result<InProcess, String> {
        let cli = Cli::try_parse_from(std::iter::once("mls-ds").chain(flags.iter().copied()))
            .map_err(|e| e.to_string())?;
        let limits = cli.serve.limits;
        let ds = crate::embedded::open(data_dir, &limits).map_err(|e| e.to_string())?;
        Ok(InProcess {
            front: crate::front(StateCell::new(Arc::new(ds)), &limits),
        })
    }

    /// Serve one request given as its parts, through the whole HTTP adapter
    /// (limits, authentication, routing, error mapping). `None` if the parts
    /// do not form an HTTP request (hyper refuses those before the adapter).
    pub async fn handle(
        &self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &[u8])],
        body: Vec<u8>,
    ) -> Option<(u16, Vec<u8>)> {
        let mut builder = Request::builder().method(method).uri(path_and_query);
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let req = builder.body(Full::new(Bytes::from(body))).ok()?;
        let resp = self.front.handle(req, IpAddr::from([127, 0, 0, 1])).await;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some((status, body.to_vec()))
    }
}
