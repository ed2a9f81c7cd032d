//! Fuzz target: the decoder of `CreateGroup`, the body of `POST /v1/groups`.
//! Decoding arbitrary bytes never panics, and what decodes re-encodes to a
//! value that decodes to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mls_ds_fuzz::decode_round_trip::<mls_ds_protocol::groups::CreateGroup>(data, |_| {});
});
