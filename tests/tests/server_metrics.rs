//! The metrics listener: `/metrics` is served on the listener of
//! `--metrics-listen` and nowhere else. The API port answers it with 404;
//! the metrics listener answers `GET /metrics` with the Prometheus page,
//! which counts the API's requests but not its own scrapes, and anything
//! else with 404 or 405.

use mls_ds_protocol::{decode, ErrorBody, ErrorCode};
use mls_ds_tests::raw::raw_request;
use mls_ds_tests::Server;

async fn get(url: &str, path: &str) -> (u16, Vec<u8>) {
    raw_request(url, "GET", path, &[], vec![]).await
}

fn counter(page: &str, series: &str) -> Option<u64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[tokio::test]
async fn metrics_are_served_on_their_own_listener_only() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path(), &[]);
    let (api, metrics) = (server.url(), server.metrics_url());
    assert_ne!(api, metrics);

    assert_eq!(get(&api, "/healthz").await.0, 200);
    let (status, body) = get(&api, "/metrics").await;
    assert_eq!(status, 404, "the API port has no /metrics");
    let error = decode::<ErrorBody>(&body).unwrap();
    assert_eq!(error.code, ErrorCode::NotFound, "{}", error.text());

    for _ in 0..2 {
        let (status, page) = get(&metrics, "/metrics").await;
        assert_eq!(status, 200, "the metrics listener serves /metrics");
        let page = String::from_utf8(page).unwrap();
        // The API's two requests, counted once each however often scraped.
        let api_requests = [
            (r#"mls_ds_requests_total{route="healthz",status="200"}"#, 1),
            (r#"mls_ds_requests_total{route="unknown",status="404"}"#, 1),
            ("mls_ds_request_duration_seconds_count", 2),
            ("mls_ds_fsync_failures_total", 0),
        ];
        for (series, n) in api_requests {
            assert_eq!(counter(&page, series), Some(n), "{series} in:\n{page}");
        }
        assert!(
            !page.contains(r#"route="metrics""#),
            "scrapes are not API requests:\n{page}"
        );
    }

    for path in ["/healthz", "/v1/queue", "/metricsx", "/"] {
        let (status, body) = get(&metrics, path).await;
        assert_eq!(status, 404, "{path} on the metrics listener");
        assert_eq!(
            decode::<ErrorBody>(&body).unwrap().code,
            ErrorCode::NotFound
        );
    }
    let (status, _) = raw_request(&metrics, "POST", "/metrics", &[], vec![]).await;
    assert_eq!(status, 405, "only GET (and HEAD) of /metrics");
}
