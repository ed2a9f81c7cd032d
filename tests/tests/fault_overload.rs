//! Overload: more concurrent requests than `--max-inflight` get 503 instead
//! of queueing without bound, a client over its rate limit gets 429, and the
//! server serves normally once the load drops.

use mls_ds_tests::raw::RawMember;
use mls_ds_tests::{join_all, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--max-inflight",
            "4",
            "--rate-limit-per-sec",
            "20",
            "--rate-limit-burst",
            "20",
        ],
    );
    let url = server.url();

    // Rate limit: one client hammering gets 429 once its burst is spent.
    let hammer = RawMember::new(&url, "hammer");
    hammer.register(0).await;
    let mut statuses = Vec::new();
    for _ in 0..40 {
        match hammer.api.key_package_count().await {
            Ok(_) => statuses.push(200),
            Err(e) => statuses.push(e.status().unwrap_or(0)),
        }
    }
    assert!(statuses.contains(&429), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );

    // In-flight limit: many long-polls at once; the excess is refused with 503
    // right away instead of piling up.
    let mut pollers = Vec::new();
    for i in 0..12 {
        let m = RawMember::new(&url, &format!("poller-{i}"));
        m.register(0).await;
        pollers.push(m);
    }
    let started = std::time::Instant::now();
    let results = join_all(pollers.iter().map(|m| m.api.fetch(0, 10, 1500))).await;
    let refused = results
        .iter()
        .filter(|r| r.as_ref().err().and_then(|e| e.status()) == Some(503))
        .count();
    let served = results.iter().filter(|r| r.is_ok()).count();
    assert!(refused > 0, "some long-polls refused with 503");
    assert!(served > 0, "the rest served");
    assert_eq!(refused + served, results.len(), "only 200 or 503");
    assert!(started.elapsed().as_secs() < 10);

    // Load gone: normal service.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    for m in &pollers {
        m.api
            .fetch(0, 10, 0)
            .await
            .expect("served after the load dropped");
    }
    let log = std::fs::read_to_string(server.log_path()).unwrap();
    assert!(!log.contains("panicked"));
}
