//! The performance picture: load tools that measure keyledger next to the bare parts it is
//! built on (the database, the broker, an HTTP endpoint that does nothing), so every figure
//! comes with the ceiling it should be read against. `scripts/bench-all` runs them all.
//!
//! - [`bus`]: GenerateKey over the bus next to raw commits and the raw broker; the audit
//!   replay next to a bare consumer.
//! - [`http`]: verification over HTTP next to a bare endpoint of the same server.
//! - [`restart`]: time from start to ready, and memory, with a large store.

pub mod bus;
pub mod http;
pub mod restart;

/// The `p` quantile (0..=1) of sorted values; NaN when there are none.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
