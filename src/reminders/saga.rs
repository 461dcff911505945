//! The saga's two loops: keeping the schedule from the event log, and firing what is due.
//!
//! Keeping: each batch of events (from the events topic, or from the event store when
//! there is no bus) updates the schedule and moves the saga's checkpoints in one
//! transaction. Firing: every tick, the keys with a stage due by the service's clock get
//! SendExpiryReminder or ExpireKey through an [`Issuer`] — the command handler, which
//! implements it from the layer above, so this module does not depend on it. Command ids derive from
//! key and stage, so two saga instances, or a firing repeated after a crash, record one
//! event; a stage is taken off the schedule only when its event comes back from the log.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;
use uuid::Uuid;

use super::schedule::{change, scheduled_key, Change, KeySchedule, Stages};
use super::store;
use crate::domain::{AccountId, Clock};
use crate::projection::Projection;
use crate::store::{Store, StoreError, StoredRecord, Tx};

/// The saga's consumer name (checkpoints, offsets, consumer group).
pub const SAGA: &str = "keyledger-saga";

/// How long a fired command is not repeated while its event makes its way back.
const REFIRE_AFTER: Duration = Duration::from_secs(5);
/// Most keys fired per tick.
const PER_TICK: i64 = 500;

/// The schedule, kept from the log.
pub struct Saga {
    store: Arc<Store>,
    stages: Stages,
    /// Whether this deployment counts usage (a reminder says when a key was last used
    /// only then).
    usage: bool,
    /// Since when usage is recorded (a fact of the migration): read once.
    usage_since: tokio::sync::OnceCell<Option<chrono::DateTime<chrono::Utc>>>,
}

impl Saga {
    pub fn new(store: Arc<Store>, stages: Stages) -> Self {
        Self {
            store,
            stages,
            usage: true,
            usage_since: tokio::sync::OnceCell::new(),
        }
    }

    /// Whether usage is counted (`KEYLEDGER_USAGE_FLUSH_SECONDS` is not 0): without it a
    /// reminder says nothing of the key's use — it could not tell "never used".
    pub fn with_usage(mut self, counted: bool) -> Self {
        self.usage = counted;
        self
    }

    /// Fills a reminder's usage from the usage table, so its email can say when the key
    /// was last used (or that it never was). Unreadable, it stays unsaid: a reminder is
    /// not held back for it.
    async fn add_usage(&self, command: &mut keyledger_events::Command) {
        if !self.usage {
            return;
        }
        if let keyledger_events::Command::SendExpiryReminder {
            key_id,
            last_used_at,
            usage_since,
            ..
        } = command
        {
            let read = async {
                let last = crate::store::usage::last_used(&self.store, *key_id).await?;
                let since = *self
                    .usage_since
                    .get_or_try_init(|| crate::store::usage::tracked_since(&self.store))
                    .await?;
                Ok::<_, StoreError>((last, since))
            };
            match read.await {
                Ok((last, since)) => (*last_used_at, *usage_since) = (last, since),
                Err(e) => tracing::warn!(error = %e, "reminder without usage: cannot read it"),
            }
        }
    }

    /// How many keys have a stage or their expiry due now.
    pub async fn due_now(&self, now: chrono::DateTime<chrono::Utc>) -> Result<i64, StoreError> {
        store::count_due(&self.store, now.timestamp_millis()).await
    }

    /// The keys with something due by `until`, optionally of one account.
    pub async fn upcoming(
        &self,
        until: chrono::DateTime<chrono::Utc>,
        account: Option<&str>,
        limit: i64,
    ) -> Result<Vec<KeySchedule>, StoreError> {
        store::due(&self.store, until.timestamp_millis(), account, limit).await
    }
}

#[async_trait]
impl Projection for Saga {
    fn name(&self) -> &'static str {
        SAGA
    }

    /// Each event changes the schedule of the key it names: the batch's keys are read at
    /// once, folded in memory in order, and what changed written at once.
    async fn apply(
        &self,
        tx: &mut Tx,
        batch: &[(&str, &[StoredRecord])],
    ) -> Result<(), StoreError> {
        let mut keys: Vec<Uuid> = batch
            .iter()
            .flat_map(|(_, records)| records.iter().map(|r| scheduled_key(&r.event)))
            .collect();
        keys.sort();
        keys.dedup();
        let found = store::get_many(tx, &keys).await?;
        let mut now: HashMap<Uuid, Option<KeySchedule>> =
            keys.iter().map(|k| (*k, found.get(k).cloned())).collect();
        let mut changed: Vec<Uuid> = Vec::new();
        for (account, records) in batch {
            for record in *records {
                let key_id = scheduled_key(&record.event);
                let current = now.get(&key_id).and_then(Option::as_ref);
                match change(account, current, &record.event, &self.stages) {
                    Change::Put(s) => {
                        changed.push(s.key_id);
                        now.insert(s.key_id, Some(s));
                    }
                    Change::Remove(k) => {
                        now.insert(k, None);
                        changed.push(k);
                    }
                    Change::None => {}
                }
            }
        }
        changed.sort();
        changed.dedup();
        let puts: Vec<&KeySchedule> = changed
            .iter()
            .filter_map(|k| now.get(k).and_then(Option::as_ref))
            .collect();
        let removes: Vec<Uuid> = changed
            .iter()
            .filter(|k| now.get(k).is_some_and(Option::is_none))
            .copied()
            .collect();
        store::remove_many(tx, &removes).await?;
        store::put_many(tx, &puts).await
    }
}

/// What became of a command the saga issued.
pub enum Fired {
    /// Decided: the events it recorded (none when it had been decided before) and how
    /// (`accepted`, `duplicate`).
    Decided {
        events: Vec<keyledger_events::KeyringEvent>,
        status: &'static str,
    },
    /// The keyring declined it (the key was revoked, expired or is gone), with the code.
    Declined(&'static str),
    /// Not decided now (the store is down, the account contended): fire again later.
    Failed(String),
}

/// Where the saga's commands go: the command handler (`handler.rs` implements this), with
/// the actor `saga`.
#[async_trait]
pub trait Issuer: Send + Sync {
    async fn issue(
        &self,
        account_id: AccountId,
        command_id: Uuid,
        command: keyledger_events::Command,
    ) -> Fired;
}

/// Fires due stages every `tick` until stopped.
pub struct Firing {
    pub saga: Arc<Saga>,
    pub handler: Arc<dyn Issuer>,
    pub clock: Arc<dyn Clock>,
    pub tick: Duration,
}

impl Firing {
    pub async fn run(self, mut stop: watch::Receiver<bool>) {
        let mut fired: HashMap<Uuid, Instant> = HashMap::new();
        let mut interval = tokio::time::interval(self.tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {}
                _ = stop.changed() => break,
            }
            if let Err(e) = self.fire_due(&mut fired).await {
                tracing::warn!(error = %e, "reminder saga cannot read its schedule; retrying");
            }
        }
        tracing::info!(part = "reminder saga", "stopped");
    }

    /// One round: every key with a due stage gets its command, unless it was fired a
    /// moment ago and its event is still on its way back.
    pub async fn fire_due(&self, fired: &mut HashMap<Uuid, Instant>) -> Result<usize, StoreError> {
        let now = self.clock.now();
        fired.retain(|_, at| at.elapsed() < REFIRE_AFTER);
        let due = self.saga.upcoming(now, None, PER_TICK).await?;
        let mut issued = 0;
        for schedule in due {
            let Some(action) = schedule.action(now) else {
                continue;
            };
            let (command_id, mut command) = action.command(schedule.key_id);
            if fired.contains_key(&command_id) {
                continue;
            }
            self.saga.add_usage(&mut command).await;
            fired.insert(command_id, Instant::now());
            let Ok(account_id) = AccountId::parse(&schedule.account_id) else {
                tracing::error!(account_id = %schedule.account_id, "schedule names an invalid account");
                continue;
            };
            issued += 1;
            match self.handler.issue(account_id, command_id, command).await {
                Fired::Decided { events, status } => {
                    count_decisions(&events);
                    tracing::info!(
                        account_id = %schedule.account_id,
                        key_id = %schedule.key_id,
                        action = ?action,
                        status,
                        "reminder saga fired"
                    )
                }
                // The key was revoked, expired or is gone: its event removes the schedule.
                Fired::Declined(code) => tracing::info!(
                    account_id = %schedule.account_id,
                    key_id = %schedule.key_id,
                    action = ?action,
                    code,
                    "reminder saga: the keyring declined"
                ),
                Fired::Failed(e) => {
                    fired.remove(&command_id);
                    tracing::warn!(key_id = %schedule.key_id, error = %e, "reminder saga cannot fire; retrying");
                }
            }
        }
        Ok(issued)
    }
}

/// Counts what the keyring recorded for the saga: stages sent and skipped, keys expired.
fn count_decisions(events: &[keyledger_events::KeyringEvent]) {
    use keyledger_events::KeyringEvent;
    let m = crate::metrics::metrics();
    for e in events {
        match e {
            KeyringEvent::ExpiryReminderDue(r) => {
                m.count("keyledger_reminders_total", &[("decision", "sent")], 1);
                let skipped = r.skipped_stages.len() as u64;
                if skipped > 0 {
                    m.count(
                        "keyledger_reminders_total",
                        &[("decision", "skipped")],
                        skipped,
                    );
                }
            }
            KeyringEvent::KeyExpired(_) => {
                m.count("keyledger_reminders_total", &[("decision", "expired")], 1)
            }
            _ => {}
        }
    }
}
