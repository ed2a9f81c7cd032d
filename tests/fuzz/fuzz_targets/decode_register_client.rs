//! Fuzz target: the decoder of `RegisterClient`, the body of `POST /v1/clients`.
//! Decoding arbitrary bytes never panics, and what decodes re-encodes to a
//! value that decodes to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mls_ds_fuzz::decode_round_trip::<mls_ds_protocol::clients::RegisterClient>(
        data,
        |v: &mls_ds_protocol::clients::RegisterClient| {
            // The server validates the id after decoding; that must not panic either.
            let _ = v.client_id.validate();
        },
    );
});
