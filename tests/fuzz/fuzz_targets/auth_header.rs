//! Fuzz target: the `Authorization` header parser, as the server calls it
//! (`Authenticator::parse`), and the token decoder under it. Never a panic;
//! a parsed token formats back to a header that parses to the same token.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mls_ds_protocol::auth::{self, AuthToken};
use mls_ds_server::test_support::Authenticator;

fuzz_target!(|data: &[u8]| {
    // hyper hands the handler header values that are visible ASCII or
    // obs-text; `to_str` (as the server uses) keeps the ASCII ones.
    if let Ok(header) = std::str::from_utf8(data) {
        if let Ok(token) = Authenticator::parse(Some(header)) {
            let again = auth::parse_header(&auth::header_value(&token));
            assert_eq!(again.ok().as_ref(), Some(&token));
        }
    }
    // The token bytes themselves (what the hex decodes to).
    mls_ds_fuzz::decode_round_trip::<AuthToken>(data, |_| {});
    // A well-formed header around arbitrary token bytes.
    let header = format!("MLS-DS {}", hex::encode(data));
    let _ = Authenticator::parse(Some(&header));
});
