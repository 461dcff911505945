//! # keyledger-projections: the read models
//!
//! The Settings listing and the verification index, each a pure fold over the events of
//! `keyledger-events`. They know nothing of where events come from (the store right after a
//! commit, a replay, or the events topic): a caller hands them `(account, sequence,
//! event)` and they skip what they have already applied, so they can always be rebuilt by
//! replay and a redelivered event changes nothing.

mod index;
mod listing;

pub use index::{
    IndexStats, LegacyCandidate, Lookup, SnapshotError, Usage, VerificationIndex, Verified,
};
pub use listing::{
    happened_by, listing_change, KeyStatus, Listing, ListingChange, ListingRow, Revocation,
};
