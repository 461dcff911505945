//! `/metrics` and `/readyz` as an operator's scraper and probe see them.

use reqwest::StatusCode;

use crate::common::{read, Backing, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_commands_and_verifications_and_readyz_reports_the_database() {
    let app = TestApp::spawn(Backing::postgres().await).await;
    let (status, key) = app
        .generate("acc-metrics", "prod", &["ops@agency.gov.sg"])
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let api_key = key["api_key"].as_str().expect("key");
    assert_eq!(app.verify(api_key, None).await["valid"], true);
    assert_eq!(app.verify("nope", None).await["code"], "malformed");

    // Open routes: no token.
    let resp = app.get_open("/metrics").await;
    assert_eq!(resp.status(), StatusCode::OK);
    let text = resp.text().await.expect("text");
    for needle in [
        "keyledger_commands_total{type=\"GenerateKey\",outcome=\"accepted\"}",
        "keyledger_verify_total{outcome=\"valid\"}",
        "keyledger_verify_total{outcome=\"malformed\"}",
        "keyledger_verify_seconds_bucket{le=\"+Inf\"}",
        "keyledger_reminders_due 0",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(!text.contains(api_key), "no key in the metrics");

    let (status, body) = read(app.get_open("/readyz").await).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["database"], "ok");
}
