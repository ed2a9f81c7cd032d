//! Fuzz target: the decoders of every response body the SDK reads from a DS
//! (which it must not trust): the first byte picks the type, the rest is the
//! body. Decoding never panics; what decodes round-trips.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mls_ds_fuzz::decode_round_trip as rt;
use mls_ds_protocol::{auth, clients, groups, key_packages, queue, ErrorBody};

fuzz_target!(|data: &[u8]| {
    let Some((which, body)) = data.split_first() else {
        return;
    };
    match which % 11 {
        0 => rt::<clients::Registered>(body, |_| {}),
        1 => rt::<auth::SessionCreated>(body, |_| {}),
        2 => rt::<groups::GroupCreated>(body, |_| {}),
        3 => rt::<groups::CommitAccepted>(body, |_| {}),
        4 => rt::<groups::MessageAccepted>(body, |_| {}),
        5 => rt::<groups::GroupInfoResponse>(body, |_| {}),
        6 => rt::<key_packages::KeyPackageCount>(body, |_| {}),
        7 => rt::<key_packages::ClaimedKeyPackage>(body, |_| {}),
        8 => rt::<queue::QueuePage>(body, |_| {}),
        9 => rt::<queue::Acked>(body, |_| {}),
        _ => rt::<ErrorBody>(body, |e| {
            // The SDK shows the reason to the user.
            let _ = e.text();
        }),
    }
});
