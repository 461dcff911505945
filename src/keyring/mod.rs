//! The Keyring aggregate: all of one account's keys, one consistency boundary.
//!
//! Label uniqueness, the live-key cap, rotation and legacy migration are decided here, over
//! the account's whole history, under cqrs-es's optimistic concurrency. The aggregate is
//! pure: key material is minted by the command handler and handed in (so the plaintext
//! never reaches an event), and time comes from the [`Clock`](crate::domain::Clock) in the
//! services. It also remembers every `command_id` it has handled, so a redelivered command
//! produces nothing new and its original outcome can be answered again.

mod error;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use keyledger_events::{
    Command, ContactsUpdated, ExpiryReminderDue, KeyExpired, KeyGenerated, KeyRevoked, KeyRotated,
    KeyringEvent, LegacyKeyMigrated, RevokeCause, EVENT_VERSION, HASH_SCHEME_BLAKE3,
    HASH_SCHEME_LEGACY_BCRYPT,
};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub use error::KeyringError;

use crate::domain::{
    legacy_hash_username, Clock, Contacts, Label, LegacyHashError, LoginEmail, Policy,
};

/// The cqrs-es event type: the contract's events, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoredEvent(pub KeyringEvent);

impl DomainEvent for StoredEvent {
    fn event_type(&self) -> String {
        self.0.event_type().to_owned()
    }
    fn event_version(&self) -> String {
        EVENT_VERSION.to_owned()
    }
}

/// What may be kept of a freshly minted key, handed in by the command handler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewKeyMaterial {
    pub key_id: Uuid,
    /// The username the key was minted for (its prefix).
    pub username: String,
    pub key_hash: String,
    pub last_five: String,
}

/// A command as the aggregate receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyringCommand {
    pub command_id: Uuid,
    pub command: Command,
    /// Present for GenerateKey and RotateKey (the new key), and MigrateLegacyKey (its id).
    pub material: Option<NewKeyMaterial>,
}

/// What the aggregate needs from outside: time and the rules.
#[derive(Clone)]
pub struct KeyringServices {
    pub clock: Arc<dyn Clock>,
    pub policy: Policy,
}

/// Where a key stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyState {
    Live,
    Revoked,
    /// Its KeyExpired event was recorded.
    Expired,
}

/// One key as the aggregate knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFacts {
    pub key_id: Uuid,
    pub label: String,
    pub last_five: String,
    pub contacts: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub state: KeyState,
    pub legacy: bool,
    pub rotated_from: Option<Uuid>,
    pub rotated_to: Option<Uuid>,
    /// Its rotation asked for it to be revoked on the successor's first verification.
    #[serde(default)]
    pub retire_on_successor_use: bool,
    /// Reminder stages decided (sent or skipped).
    pub reminders_sent: BTreeSet<u32>,
    /// Since when keyledger holds the key: its creation, or its migration for a legacy key.
    pub held_since: DateTime<Utc>,
}

impl KeyFacts {
    /// Who hears about this key: its contacts, or the login email when it has none.
    pub fn recipients(&self, login_email: Option<&str>) -> Vec<String> {
        if self.contacts.is_empty() {
            login_email.map(|l| vec![l.to_owned()]).unwrap_or_default()
        } else {
            self.contacts.clone()
        }
    }

    /// Neither revoked nor expired as of `now`.
    pub fn is_live_at(&self, now: DateTime<Utc>) -> bool {
        self.state == KeyState::Live && self.expires_at > now
    }
}

/// The outcome of a handled command, remembered by its `command_id`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorOutcome {
    pub sequences: Vec<u64>,
    /// The key the command created or acted on.
    pub key_id: Option<Uuid>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keyring {
    login_email: Option<String>,
    keys: BTreeMap<Uuid, KeyFacts>,
    legacy_key: Option<Uuid>,
    version: u64,
    handled: HashMap<Uuid, PriorOutcome>,
}

impl Keyring {
    /// The account's login email, once its first key recorded it.
    pub fn login_email(&self) -> Option<&str> {
        self.login_email.as_deref()
    }

    /// The number of events applied (the stream's last sequence).
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn key(&self, key_id: Uuid) -> Option<&KeyFacts> {
        self.keys.get(&key_id)
    }

    /// The outcome of `command_id` if this keyring already handled it.
    pub fn prior_outcome(&self, command_id: Uuid) -> Option<&PriorOutcome> {
        self.handled.get(&command_id)
    }

    fn live_keys(&self, now: DateTime<Utc>) -> usize {
        self.keys.values().filter(|k| k.is_live_at(now)).count()
    }

    fn check_label_free(&self, label: &Label) -> Result<(), KeyringError> {
        // Unique among the account's listed (non-revoked) keys, expired ones included.
        let taken = self
            .keys
            .values()
            .any(|k| k.state != KeyState::Revoked && k.label == label.as_str());
        if taken {
            return Err(KeyringError::DuplicateLabel(label.as_str().to_owned()));
        }
        Ok(())
    }

    fn existing(&self, key_id: Uuid) -> Result<&KeyFacts, KeyringError> {
        let key = self
            .keys
            .get(&key_id)
            .ok_or(KeyringError::KeyNotFound(key_id))?;
        if key.state == KeyState::Revoked {
            return Err(KeyringError::KeyRevoked(key_id));
        }
        Ok(key)
    }

    /// The login email this command acts under: the recorded one, or (for an account's
    /// first key) the one the command names. A different one is refused.
    fn resolve_login(&self, given: &str) -> Result<LoginEmail, KeyringError> {
        let given = LoginEmail::parse(given).map_err(KeyringError::InvalidLoginEmail)?;
        match &self.login_email {
            Some(recorded) if recorded != given.as_str() => Err(KeyringError::LoginEmailMismatch {
                recorded: recorded.clone(),
            }),
            _ => Ok(given),
        }
    }

    fn material<'a>(
        material: &'a Option<NewKeyMaterial>,
        username: &str,
    ) -> Result<&'a NewKeyMaterial, KeyringError> {
        match material {
            Some(m) if m.username == username => Ok(m),
            Some(_) => Err(KeyringError::Internal(
                "key material was minted for another username".into(),
            )),
            None => Err(KeyringError::Internal("no key material handed in".into())),
        }
    }

    /// Decides which events `cmd` produces at `now` under `policy`. Pure.
    pub fn decide(
        &self,
        cmd: &KeyringCommand,
        now: DateTime<Utc>,
        policy: &Policy,
    ) -> Result<Vec<KeyringEvent>, KeyringError> {
        let command_id = cmd.command_id;
        match &cmd.command {
            Command::GenerateKey {
                label,
                contacts,
                login_email,
            } => {
                let label = Label::parse(label)?;
                let contacts = Contacts::parse(contacts)?;
                let login = self.resolve_login(login_email)?;
                self.check_label_free(&label)?;
                if self.live_keys(now) >= policy.max_live_keys {
                    return Err(KeyringError::KeyLimitReached {
                        max: policy.max_live_keys,
                    });
                }
                let m = Self::material(&cmd.material, &login.username())?;
                Ok(vec![KeyringEvent::KeyGenerated(KeyGenerated {
                    command_id,
                    key_id: m.key_id,
                    label: label.into_string(),
                    last_five: m.last_five.clone(),
                    key_hash: m.key_hash.clone(),
                    hash_scheme: HASH_SCHEME_BLAKE3.into(),
                    contacts: contacts.to_strings(),
                    login_email: login.as_str().to_owned(),
                    created_at: now,
                    expires_at: policy.expiry_for(now),
                    rotated_from: None,
                })])
            }
            Command::UpdateContacts { key_id, contacts } => {
                let contacts = Contacts::parse(contacts)?;
                self.existing(*key_id)?;
                Ok(vec![KeyringEvent::ContactsUpdated(ContactsUpdated {
                    command_id,
                    key_id: *key_id,
                    contacts: contacts.to_strings(),
                    updated_at: now,
                })])
            }
            Command::RevokeKey { key_id } => {
                self.existing(*key_id)?;
                Ok(vec![KeyringEvent::KeyRevoked(KeyRevoked {
                    command_id,
                    key_id: *key_id,
                    revoked_at: now,
                    cause: None,
                    source: None,
                    ..Default::default()
                })])
            }
            Command::RevokeLeakedKey {
                key_id,
                source,
                reporter,
            } => {
                let key = self.existing(*key_id)?;
                if !key.is_live_at(now) {
                    // Expired already: it verifies nowhere, nothing to end and no one to alarm.
                    return Err(KeyringError::KeyExpired(*key_id));
                }
                Ok(vec![KeyringEvent::KeyRevoked(KeyRevoked {
                    command_id,
                    key_id: *key_id,
                    revoked_at: now,
                    cause: Some(RevokeCause::Leaked),
                    source: Some(source.clone()),
                    reporter: reporter.clone(),
                    recipients: key.recipients(self.login_email()),
                    label: key.label.clone(),
                    last_five: key.last_five.clone(),
                    login_email: self.login_email.clone().unwrap_or_default(),
                })])
            }
            Command::ReportLeak { .. } => Err(KeyringError::Internal(
                "ReportLeak spans keyrings: the leak desk takes it, not one account".into(),
            )),
            Command::RetireRotatedKey { new_key_id } => {
                let new = self
                    .keys
                    .get(new_key_id)
                    .ok_or(KeyringError::KeyNotFound(*new_key_id))?;
                if !new.is_live_at(now) {
                    // An instance that had not yet heard of the successor's revocation saw
                    // it used: ending the old key now would leave the account with neither.
                    return Err(KeyringError::NothingToRetire(*new_key_id));
                }
                let old = new
                    .rotated_from
                    .and_then(|old| self.keys.get(&old))
                    .filter(|old| old.retire_on_successor_use)
                    .ok_or(KeyringError::NothingToRetire(*new_key_id))?;
                if !old.is_live_at(now) {
                    // Revoked, expired or past its grace already: nothing left to end.
                    return Err(KeyringError::NothingToRetire(*new_key_id));
                }
                Ok(vec![KeyringEvent::KeyRevoked(KeyRevoked {
                    command_id,
                    key_id: old.key_id,
                    revoked_at: now,
                    cause: Some(RevokeCause::Rotated),
                    source: None,
                    ..Default::default()
                })])
            }
            Command::RotateKey {
                key_id,
                label,
                grace_seconds,
                revoke_old_on_first_use,
            } => {
                let label = Label::parse(label)?;
                let grace = match grace_seconds {
                    None => policy.default_grace,
                    Some(s) if *s >= 0 && *s <= policy.max_grace.num_seconds() => {
                        Duration::seconds(*s)
                    }
                    Some(_) => {
                        return Err(KeyringError::InvalidGrace {
                            max_seconds: policy.max_grace.num_seconds(),
                        })
                    }
                };
                let old = self.existing(*key_id)?;
                if let Some(successor) = old.rotated_to {
                    return Err(KeyringError::KeyAlreadyRotated {
                        key_id: *key_id,
                        successor,
                    });
                }
                if !old.is_live_at(now) {
                    return Err(KeyringError::KeyExpired(*key_id));
                }
                self.check_label_free(&label)?;
                // The old key is on its way out, so a rotation may take the account one
                // over the cap for the length of the grace period.
                if self.live_keys(now) > policy.max_live_keys {
                    return Err(KeyringError::KeyLimitReached {
                        max: policy.max_live_keys,
                    });
                }
                let login = self
                    .login_email
                    .as_deref()
                    .ok_or_else(|| KeyringError::Internal("account has no login email".into()))
                    .and_then(|l| LoginEmail::parse(l).map_err(KeyringError::InvalidLoginEmail))?;
                let m = Self::material(&cmd.material, &login.username())?;
                let old_key_expires_at = old.expires_at.min(now + grace);
                Ok(vec![
                    KeyringEvent::KeyGenerated(KeyGenerated {
                        command_id,
                        key_id: m.key_id,
                        label: label.into_string(),
                        last_five: m.last_five.clone(),
                        key_hash: m.key_hash.clone(),
                        hash_scheme: HASH_SCHEME_BLAKE3.into(),
                        contacts: old.contacts.clone(),
                        login_email: login.as_str().to_owned(),
                        created_at: now,
                        expires_at: policy.expiry_for(now),
                        rotated_from: Some(*key_id),
                    }),
                    KeyringEvent::KeyRotated(KeyRotated {
                        command_id,
                        old_key_id: *key_id,
                        new_key_id: m.key_id,
                        old_key_expires_at,
                        rotated_at: now,
                        revoke_old_on_first_use: *revoke_old_on_first_use,
                    }),
                ])
            }
            Command::ExpireKey { key_id } => {
                let key = self.existing(*key_id)?;
                match key.state {
                    KeyState::Expired => Ok(vec![]),
                    _ if now < key.expires_at => Err(KeyringError::KeyNotExpired {
                        key_id: *key_id,
                        expires_at: key.expires_at,
                    }),
                    _ => Ok(vec![KeyringEvent::KeyExpired(KeyExpired {
                        command_id,
                        key_id: *key_id,
                        expires_at: key.expires_at,
                        expired_at: now,
                        // A legacy key migrated after its expiry was never live here:
                        // recorded expired, but nobody is told it "has expired" now.
                        recipients: if key.expires_at <= key.held_since {
                            Vec::new()
                        } else {
                            key.recipients(self.login_email())
                        },
                        label: key.label.clone(),
                        last_five: key.last_five.clone(),
                        login_email: self.login_email.clone().unwrap_or_default(),
                    })]),
                }
            }
            Command::SendExpiryReminder {
                key_id,
                stage,
                skipping,
                last_used_at,
                usage_since,
            } => {
                // Only the configured stages: a forged command must not make the notifier
                // mail a key's contacts once per day of its life.
                if !policy.reminder_stages.contains(stage) {
                    return Err(KeyringError::InvalidStage);
                }
                let key = self.existing(*key_id)?;
                if key.state == KeyState::Expired || key.expires_at <= now {
                    return Err(KeyringError::KeyExpired(*key_id));
                }
                if key.reminders_sent.contains(stage) {
                    // Sent or skipped already: decided once, nothing more to record.
                    return Ok(vec![]);
                }
                let due_at = key.expires_at - Duration::days(i64::from(*stage));
                if now < due_at {
                    return Err(KeyringError::ReminderNotDue {
                        key_id: *key_id,
                        stage: *stage,
                        due_at,
                    });
                }
                let mut skipped: Vec<u32> = skipping
                    .iter()
                    .copied()
                    .filter(|s| {
                        *s > *stage
                            && policy.reminder_stages.contains(s)
                            && !key.reminders_sent.contains(s)
                    })
                    .collect();
                skipped.sort_unstable_by(|a, b| b.cmp(a));
                skipped.dedup();
                Ok(vec![KeyringEvent::ExpiryReminderDue(ExpiryReminderDue {
                    command_id,
                    key_id: *key_id,
                    stage: *stage,
                    recipients: key.recipients(self.login_email()),
                    expires_at: key.expires_at,
                    due_at,
                    skipped_stages: skipped,
                    label: key.label.clone(),
                    last_five: key.last_five.clone(),
                    login_email: self.login_email.clone().unwrap_or_default(),
                    last_used_at: *last_used_at,
                    // Never used only if usage was recorded for the key's whole life.
                    never_used: last_used_at.is_none()
                        && usage_since.is_some_and(|since| since <= key.held_since),
                })])
            }
            Command::MigrateLegacyKey {
                login_email,
                legacy_hash,
                created_at,
            } => {
                let login = self.resolve_login(login_email)?;
                let username = legacy_hash_username(legacy_hash)?;
                if username != login.username() {
                    return Err(LegacyHashError::Username {
                        found: username.to_owned(),
                        expected: login.username(),
                    }
                    .into());
                }
                if let Some(existing) = self.legacy_key {
                    return Err(KeyringError::LegacyAlreadyMigrated(existing));
                }
                let created_at = created_at.unwrap_or(now);
                if created_at > now {
                    return Err(KeyringError::CreatedInFuture);
                }
                let label = Label::parse("default")?;
                self.check_label_free(&label)?;
                let key_id = cmd
                    .material
                    .as_ref()
                    .map(|m| m.key_id)
                    .ok_or_else(|| KeyringError::Internal("no key id handed in".into()))?;
                Ok(vec![KeyringEvent::LegacyKeyMigrated(LegacyKeyMigrated {
                    command_id,
                    key_id,
                    label: label.into_string(),
                    last_five: "*****".into(),
                    legacy_hash: legacy_hash.clone(),
                    hash_scheme: HASH_SCHEME_LEGACY_BCRYPT.into(),
                    login_email: login.as_str().to_owned(),
                    created_at,
                    expires_at: policy.legacy_expiry,
                    migrated_at: now,
                })])
            }
        }
    }

    fn record(&mut self, command_id: Uuid, key_id: Uuid) {
        let version = self.version;
        let outcome = self.handled.entry(command_id).or_insert(PriorOutcome {
            sequences: Vec::new(),
            key_id: Some(key_id),
        });
        outcome.sequences.push(version);
    }
}

impl Aggregate for Keyring {
    const TYPE: &'static str = "Keyring";
    type Command = KeyringCommand;
    type Event = StoredEvent;
    type Error = KeyringError;
    type Services = KeyringServices;

    async fn handle(
        &mut self,
        command: Self::Command,
        services: &Self::Services,
        sink: &EventSink<Self>,
    ) -> Result<(), Self::Error> {
        let now = services.clock.now();
        for event in self.decide(&command, now, &services.policy)? {
            sink.write(StoredEvent(event), self).await;
        }
        Ok(())
    }

    fn apply(&mut self, event: Self::Event) {
        self.version += 1;
        match event.0 {
            KeyringEvent::KeyGenerated(e) => {
                if self.login_email.is_none() {
                    self.login_email = Some(e.login_email.clone());
                }
                self.record(e.command_id, e.key_id);
                self.keys.insert(
                    e.key_id,
                    KeyFacts {
                        key_id: e.key_id,
                        label: e.label,
                        last_five: e.last_five,
                        contacts: e.contacts,
                        created_at: e.created_at,
                        expires_at: e.expires_at,
                        state: KeyState::Live,
                        legacy: false,
                        rotated_from: e.rotated_from,
                        rotated_to: None,
                        retire_on_successor_use: false,
                        reminders_sent: BTreeSet::new(),
                        held_since: e.created_at,
                    },
                );
            }
            KeyringEvent::LegacyKeyMigrated(e) => {
                if self.login_email.is_none() {
                    self.login_email = Some(e.login_email.clone());
                }
                self.record(e.command_id, e.key_id);
                self.legacy_key = Some(e.key_id);
                self.keys.insert(
                    e.key_id,
                    KeyFacts {
                        key_id: e.key_id,
                        label: e.label,
                        last_five: e.last_five,
                        contacts: Vec::new(),
                        created_at: e.created_at,
                        expires_at: e.expires_at,
                        state: KeyState::Live,
                        legacy: true,
                        rotated_from: None,
                        rotated_to: None,
                        retire_on_successor_use: false,
                        reminders_sent: BTreeSet::new(),
                        held_since: e.migrated_at,
                    },
                );
            }
            KeyringEvent::ContactsUpdated(e) => {
                self.record(e.command_id, e.key_id);
                if let Some(k) = self.keys.get_mut(&e.key_id) {
                    k.contacts = e.contacts;
                }
            }
            KeyringEvent::KeyRevoked(e) => {
                self.record(e.command_id, e.key_id);
                if let Some(k) = self.keys.get_mut(&e.key_id) {
                    k.state = KeyState::Revoked;
                }
            }
            KeyringEvent::KeyRotated(e) => {
                // The KeyGenerated of the same command recorded the new key as its key.
                self.record(e.command_id, e.new_key_id);
                if let Some(k) = self.keys.get_mut(&e.old_key_id) {
                    k.rotated_to = Some(e.new_key_id);
                    k.retire_on_successor_use = e.revoke_old_on_first_use;
                    k.expires_at = k.expires_at.min(e.old_key_expires_at);
                }
            }
            KeyringEvent::KeyExpired(e) => {
                self.record(e.command_id, e.key_id);
                if let Some(k) = self.keys.get_mut(&e.key_id) {
                    if k.state == KeyState::Live {
                        k.state = KeyState::Expired;
                    }
                }
            }
            KeyringEvent::ExpiryReminderDue(e) => {
                self.record(e.command_id, e.key_id);
                if let Some(k) = self.keys.get_mut(&e.key_id) {
                    k.reminders_sent.insert(e.stage);
                    k.reminders_sent.extend(e.skipped_stages);
                }
            }
        }
    }
}
