//! Parts that stopped consuming because the log no longer holds what they must read next.
//!
//! A stored offset below the start of a partition (records deleted by retention or by
//! hand) or beyond its end (a topic deleted and created again) means events this part
//! never saw are gone, or that its offsets belong to another log. Skipping ahead would
//! leave the listing, the index or the schedule silently wrong, so the part halts instead:
//! it consumes nothing, logs the problem, and is listed here — `/readyz` answers 503 and
//! `keyledger_consumer_halted{consumer}` is 1 — until a later look finds the offsets inside
//! the log again (an operator restored the topic or moved the offsets deliberately).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a halted part looks again.
pub const RECHECK: Duration = Duration::from_secs(30);

/// The halted parts of this process, with what each found.
#[derive(Clone, Default)]
pub struct Halts(Arc<Mutex<BTreeMap<String, String>>>);

impl Halts {
    /// Records that `part` halted, and why.
    pub fn halted(&self, part: &str, report: &str) {
        self.lock().insert(part.to_owned(), report.to_owned());
        crate::metrics::metrics().set("keyledger_consumer_halted", &[("consumer", part)], 1.0);
    }

    /// Records that `part` reads a log that holds what it needs.
    pub fn clear(&self, part: &str) {
        if self.lock().remove(part).is_some() {
            tracing::info!(part, "offsets are inside the log again; consuming");
        }
        crate::metrics::metrics().set("keyledger_consumer_halted", &[("consumer", part)], 0.0);
    }

    /// Every halted part and its report.
    pub fn current(&self) -> Vec<(String, String)> {
        self.lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Checks a partition's start offset against the log's bounds (`low` = first offset still
/// held, `high` = next offset to be written); the problem in words when it is outside.
pub fn out_of_range(
    topic: &str,
    partition: i32,
    start: i64,
    low: i64,
    high: i64,
) -> Option<String> {
    if start < low {
        Some(format!(
            "{topic} partition {partition}: the next offset to read is {start}, but the log starts at {low} — records {start}..{low} were deleted before they were read"
        ))
    } else if start > high {
        Some(format!(
            "{topic} partition {partition}: the next offset to read is {start}, but the log ends at {high} — the topic was recreated or the stored offsets belong to another log"
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_is_in_range_between_the_start_and_the_end_inclusive() {
        assert_eq!(out_of_range("t", 0, 0, 0, 0), None);
        assert_eq!(out_of_range("t", 0, 5, 5, 9), None);
        assert_eq!(out_of_range("t", 0, 9, 5, 9), None);
        let deleted = out_of_range("t", 2, 3, 5, 9).expect("before the start");
        assert!(
            deleted.contains("partition 2") && deleted.contains("deleted"),
            "{deleted}"
        );
        let beyond = out_of_range("t", 1, 12, 0, 9).expect("beyond the end");
        assert!(beyond.contains("recreated"), "{beyond}");
    }

    #[test]
    fn a_halt_is_listed_until_cleared() {
        let h = Halts::default();
        h.halted("projector", "gone");
        assert_eq!(h.current(), vec![("projector".into(), "gone".into())]);
        h.clear("projector");
        assert!(h.current().is_empty());
    }
}
