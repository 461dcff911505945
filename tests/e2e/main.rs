//! End-to-end tests: the real application on a random port, against a real PostgreSQL
//! (a fresh database per test) or the embedded SQLite store in a temporary folder.
//! One test binary, so the suite links once.

mod common;

mod audit;
mod bad_input;
mod bus;
mod cli;
mod concurrency;
mod event_log;
mod history;
mod kafka;
mod leaks;
mod legacy;
mod lifecycle;
mod observability;
mod reminders;
mod security;
mod smtp;
