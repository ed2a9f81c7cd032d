//! Fuzz target: the SDK's reader of the queue stream (`GET
//! /v1/queue/stream`, server-sent events), fed what a broken or hostile DS
//! could send. The first byte sets where the bytes are cut into the pieces
//! they arrive in. Reading never panics, and the pages read (or the error)
//! do not depend on how the bytes were cut.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mls_ds_client::pages_of;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let piece = usize::from(cut).max(1);
    let chunks: Vec<&[u8]> = stream.chunks(piece).collect();
    let whole = pages_of(&[stream]);
    let pieces = pages_of(&chunks);
    match (whole, pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "pages depend on how the stream was cut"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!("one reading failed, the other did not: {a:?} / {b:?}"),
    }
});
