//! Fuzz target: request handling on a real store. Each input picks a valid
//! request (register, publish, create group, commit with and without a
//! Welcome, application message, proposal, claim, fetch, ack, group info,
//! session, delete, ...) and changes its body, method, path, content type or
//! authorization; the harness signs the result with a real client key when
//! asked to, so mutated bodies get past authentication into the handlers.
//! The server must never panic, never answer 5xx, and answer every refusal
//! with an error body whose code matches the status. The state accumulates
//! across inputs and is rebuilt every few thousand (deletions and claims
//! use it up).

#![no_main]

use std::sync::Mutex;

use libfuzzer_sys::fuzz_target;
use mls_ds_fuzz::{Input, World};

static WORLD: Mutex<Option<World>> = Mutex::new(None);

/// Inputs served by one world before it is rebuilt.
const REBUILD_AFTER: u64 = 5_000;

fuzz_target!(|input: Input| {
    let mut world = WORLD.lock().unwrap_or_else(|e| e.into_inner());
    if world.as_ref().is_none_or(|w| w.served >= REBUILD_AFTER) {
        *world = None; // the old store is removed before the new one is built
        *world = Some(World::new());
    }
    if let Some(w) = world.as_mut() {
        w.run(&input);
    }
});
