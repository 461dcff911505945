//! The reminder saga: keys expire on their own, and their contacts hear about it ahead of
//! time, exactly once per stage.
//!
//! - [`schedule`] is the pure fold: per live key, the stages still ahead and its expiry.
//! - [`store`] is its table (`reminder_schedule`).
//! - [`saga`] keeps that schedule from the event log (a projection) and, when a stage
//!   falls due by the service's clock, asks the keyring (through the command handler) to
//!   record it: SendExpiryReminder, or ExpireKey at expiry. The aggregate decides, once, in
//!   the log; the saga issuing a command twice changes nothing.

pub mod saga;
pub mod schedule;
pub mod store;
