//! Fuzz target: the decoder of `PublishKeyPackages`, the body of `POST /v1/key-packages`.
//! Decoding arbitrary bytes never panics, and what decodes re-encodes to a
//! value that decodes to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    mls_ds_fuzz::decode_round_trip::<mls_ds_protocol::key_packages::PublishKeyPackages>(
        data,
        |_| {},
    );
});
