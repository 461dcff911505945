//! Prometheus metrics, served at `/metrics` in the text exposition format.
//!
//! A small registry of its own rather than a metrics framework: the hot path (verify, a few
//! hundred nanoseconds) only touches fixed atomics, and labelled counters on the slower
//! paths (commands, the bus) sit behind one mutex. Gauges that live in the database (the
//! relay's backlog) are read when scraped.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// Upper bounds of the verify latency histogram, in seconds.
const VERIFY_BUCKETS: [f64; 12] = [
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2, 0.05, 0.1, 0.5,
];

/// The verify outcomes, as labelled.
pub const VERIFY_OUTCOMES: [&str; 6] = [
    "valid",
    "malformed",
    "unknown",
    "expired",
    "revoked",
    "error",
];

struct Histogram {
    buckets: [AtomicU64; VERIFY_BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    const fn new() -> Self {
        Self {
            buckets: [const { AtomicU64::new(0) }; VERIFY_BUCKETS.len()],
            count: AtomicU64::new(0),
            sum_nanos: AtomicU64::new(0),
        }
    }

    fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = VERIFY_BUCKETS.iter().position(|b| secs <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_nanos
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }
}

type Labels = Vec<(&'static str, String)>;

/// Every metric of the process.
pub struct Metrics {
    verify: [AtomicU64; VERIFY_OUTCOMES.len()],
    verify_latency: Histogram,
    counters: Mutex<BTreeMap<(&'static str, Labels), u64>>,
    gauges: Mutex<BTreeMap<(&'static str, Labels), f64>>,
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    METRICS.get_or_init(|| Metrics {
        verify: [const { AtomicU64::new(0) }; VERIFY_OUTCOMES.len()],
        verify_latency: Histogram::new(),
        counters: Mutex::new(BTreeMap::new()),
        gauges: Mutex::new(BTreeMap::new()),
    })
}

/// What each metric means (`# HELP`), and its type.
const HELP: &[(&str, &str, &str)] = &[
    (
        "keyledger_commands_total",
        "counter",
        "Commands handled, by type and outcome (accepted, duplicate, rejected, unavailable).",
    ),
    (
        "keyledger_events_published_total",
        "counter",
        "Events the relay published on the events topic.",
    ),
    (
        "keyledger_dead_letters_total",
        "counter",
        "Command envelopes sent to the dead-letter topic, by reason.",
    ),
    (
        "keyledger_consumer_halted",
        "gauge",
        "1 while a consumer is halted because its next offset is outside the log (records deleted before they were read); it never skips ahead.",
    ),
    (
        "keyledger_reminders_total",
        "counter",
        "Reminder-saga decisions recorded: stage sent, stage skipped, key expired.",
    ),
    (
        "keyledger_notifications_total",
        "counter",
        "Notifications: recorded, published, delivered, failed (a failed delivery attempt).",
    ),
    (
        "keyledger_consumer_lag_seconds",
        "gauge",
        "Age of the last event a consumer of the events topic applied, when it applied it.",
    ),
    (
        "keyledger_relay_backlog_records",
        "gauge",
        "Events committed but not yet published (outbox rows).",
    ),
    (
        "keyledger_relay_backlog_seconds",
        "gauge",
        "Age of the oldest unpublished event.",
    ),
    (
        "keyledger_reminders_due",
        "gauge",
        "Keys with a reminder stage or an expiry due now.",
    ),
    (
        "keyledger_events_refused_total",
        "counter",
        "Records on the events topic a consumer refused (a signature the log's key does not vouch for, or unreadable), by consumer; each is dead-lettered.",
    ),
    (
        "keyledger_relay_stuck_accounts_total",
        "counter",
        "Accounts whose next outbox row could not be read; their events are held back (every other account goes on).",
    ),
    (
        "keyledger_producer_renewals_total",
        "counter",
        "Idempotent producers replaced after a fatal error (their failed records are published again).",
    ),
    (
        "keyledger_leaks_reported_total",
        "counter",
        "Keys reported in leak reports (POST /v1/leaks, ReportLeak), by result: revoked, already_inactive, unknown, malformed.",
    ),
    (
        "keyledger_keys_revoked_for_leaks_total",
        "counter",
        "Live keys revoked because they were reported leaked (their contacts are told).",
    ),
    (
        "keyledger_usage_flush_lag_seconds",
        "gauge",
        "How old the oldest verification counted in memory could be when this instance last wrote its usage (grows while the usage table cannot be written).",
    ),
    (
        "keyledger_usage_flushed_total",
        "counter",
        "Verifications this instance has added to the usage table.",
    ),
    (
        "keyledger_index_lag_seconds",
        "gauge",
        "How long the last event from another instance's commit took to reach this instance's verification index (events topic or LISTEN): a revocation elsewhere is refused here that much later.",
    ),
    (
        "keyledger_rotations_ended_on_first_use_total",
        "counter",
        "Old keys this instance revoked because their successor (revoke_old_on_first_use) was verified.",
    ),
    (
        "keyledger_legacy_checks_total",
        "counter",
        "bcrypt checks of legacy keys, by outcome (valid, miss, busy, limited).",
    ),
];

impl Metrics {
    /// Counts one verification and its latency.
    pub fn verified(&self, outcome: &str, took: Duration) {
        let i = VERIFY_OUTCOMES
            .iter()
            .position(|o| *o == outcome)
            .unwrap_or(VERIFY_OUTCOMES.len() - 1);
        self.verify[i].fetch_add(1, Ordering::Relaxed);
        self.verify_latency.observe(took);
    }

    /// Adds `n` to a labelled counter.
    pub fn count(&self, name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        let labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        *c.entry((name, labels)).or_insert(0) += n;
    }

    /// Sets a labelled gauge.
    pub fn set(&self, name: &'static str, labels: &[(&'static str, &str)], value: f64) {
        let labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        let mut g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        g.insert((name, labels), value);
    }

    /// A gauge's value, if set.
    pub fn gauge(&self, name: &'static str, labels: &[(&'static str, &str)]) -> Option<f64> {
        let labels: Labels = labels.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        let g = self.gauges.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(name, labels)).copied()
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP keyledger_verify_total Keys verified, by outcome."
        );
        let _ = writeln!(out, "# TYPE keyledger_verify_total counter");
        for (i, o) in VERIFY_OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "keyledger_verify_total{{outcome=\"{o}\"}} {}",
                self.verify[i].load(Ordering::Relaxed)
            );
        }
        let h = &self.verify_latency;
        let _ = writeln!(
            out,
            "# HELP keyledger_verify_seconds Time to verify a key (in process, excluding HTTP)."
        );
        let _ = writeln!(out, "# TYPE keyledger_verify_seconds histogram");
        let mut cumulative = 0;
        for (i, b) in VERIFY_BUCKETS.iter().enumerate() {
            cumulative += h.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "keyledger_verify_seconds_bucket{{le=\"{b}\"}} {cumulative}"
            );
        }
        let count = h.count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "keyledger_verify_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "keyledger_verify_seconds_sum {}",
            h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "keyledger_verify_seconds_count {count}");

        let counters = self
            .counters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let gauges = self
            .gauges
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, kind, help) in HELP {
            let _ = writeln!(out, "# HELP {name} {help}");
            let _ = writeln!(out, "# TYPE {name} {kind}");
            for ((n, labels), v) in counters.iter().filter(|((n, _), _)| n == name) {
                let _ = writeln!(out, "{n}{} {v}", render_labels(labels));
            }
            for ((n, labels), v) in gauges.iter().filter(|((n, _), _)| n == name) {
                let _ = writeln!(out, "{n}{} {v}", render_labels(labels));
            }
        }
        out
    }
}

fn render_labels(labels: &Labels) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = labels
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_exposition_format() {
        let m = metrics();
        m.verified("valid", Duration::from_nanos(300));
        m.verified("unknown", Duration::from_micros(3));
        m.count(
            "keyledger_commands_total",
            &[("type", "GenerateKey"), ("outcome", "accepted")],
            2,
        );
        m.set("keyledger_relay_backlog_records", &[], 5.0);
        let text = m.render();
        assert!(
            text.contains("keyledger_verify_total{outcome=\"valid\"}"),
            "{text}"
        );
        assert!(
            text.contains("keyledger_verify_seconds_bucket{le=\"+Inf\"}"),
            "{text}"
        );
        assert!(
            text.contains("keyledger_commands_total{type=\"GenerateKey\",outcome=\"accepted\"}"),
            "{text}"
        );
        assert!(text.contains("keyledger_relay_backlog_records 5"), "{text}");
    }
}
