//! Every way the keyring can refuse a command, each with a stable machine code.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::domain::{AccountIdError, ContactsError, EmailError, LabelError, LegacyHashError};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringError {
    #[error("invalid account id: {0}")]
    InvalidAccountId(#[from] AccountIdError),
    #[error("invalid label: {0}")]
    InvalidLabel(#[from] LabelError),
    #[error("invalid contacts: {0}")]
    InvalidContacts(#[from] ContactsError),
    #[error("invalid login email: {0}")]
    InvalidLoginEmail(EmailError),
    #[error("the account's login email is '{recorded}'; a command may not change it")]
    LoginEmailMismatch { recorded: String },
    #[error("the account already has a key labelled '{0}'")]
    DuplicateLabel(String),
    #[error("the account already has {max} live keys, the most allowed; revoke one first")]
    KeyLimitReached { max: usize },
    #[error("no key {0} in this account")]
    KeyNotFound(Uuid),
    #[error("key {0} has been revoked")]
    KeyRevoked(Uuid),
    #[error("key {0} has expired")]
    KeyExpired(Uuid),
    #[error("key {key_id} was already rotated (its successor is {successor})")]
    KeyAlreadyRotated { key_id: Uuid, successor: Uuid },
    #[error("key {key_id} does not expire before {expires_at}")]
    KeyNotExpired {
        key_id: Uuid,
        expires_at: DateTime<Utc>,
    },
    #[error("reminder stage {stage} of key {key_id} is not due before {due_at}")]
    ReminderNotDue {
        key_id: Uuid,
        stage: u32,
        due_at: DateTime<Utc>,
    },
    #[error("a reminder stage is a number of days before expiry, 1 to 366")]
    InvalidStage,
    #[error("grace_seconds must be between 0 and {max_seconds}")]
    InvalidGrace { max_seconds: i64 },
    #[error("invalid legacy hash: {0}")]
    InvalidLegacyHash(#[from] LegacyHashError),
    #[error("created_at must not be in the future")]
    CreatedInFuture,
    #[error("the account's legacy key was already migrated as key {0}")]
    LegacyAlreadyMigrated(Uuid),
    #[error("key {0} ended no rotation that is still running")]
    NothingToRetire(Uuid),
    #[error("internal error: {0}")]
    Internal(String),
}

impl KeyringError {
    /// The stable machine code, the same on HTTP and on the bus.
    pub fn code(&self) -> &'static str {
        match self {
            KeyringError::InvalidAccountId(_) => "invalid_account_id",
            KeyringError::InvalidLabel(_) => "invalid_label",
            KeyringError::InvalidContacts(_) => "invalid_contacts",
            KeyringError::InvalidLoginEmail(_) => "invalid_login_email",
            KeyringError::LoginEmailMismatch { .. } => "login_email_mismatch",
            KeyringError::DuplicateLabel(_) => "duplicate_label",
            KeyringError::KeyLimitReached { .. } => "key_limit_reached",
            KeyringError::KeyNotFound(_) => "key_not_found",
            KeyringError::KeyRevoked(_) => "key_revoked",
            KeyringError::KeyExpired(_) => "key_expired",
            KeyringError::KeyAlreadyRotated { .. } => "key_already_rotated",
            KeyringError::KeyNotExpired { .. } => "key_not_expired",
            KeyringError::ReminderNotDue { .. } => "reminder_not_due",
            KeyringError::InvalidStage => "invalid_stage",
            KeyringError::InvalidGrace { .. } => "invalid_grace_period",
            KeyringError::InvalidLegacyHash(_) => "invalid_legacy_hash",
            KeyringError::CreatedInFuture => "invalid_request",
            KeyringError::LegacyAlreadyMigrated(_) => "legacy_key_already_migrated",
            KeyringError::NothingToRetire(_) => "nothing_to_retire",
            KeyringError::Internal(_) => "internal",
        }
    }
}
