//! Domain values that parse on construction.
//!
//! Raw caller input (strings) becomes one of these types at the edge of the aggregate, or
//! it becomes a precise error; past that point nothing re-checks a string.

mod account;
pub mod api_key;
mod clock;
mod email;
mod label;
mod policy;
pub mod seal;
mod signing;

pub use account::{AccountId, AccountIdError};
pub use api_key::{
    contains_key_shaped, key_shaped, legacy_hash_username, mint_key, to_hex as hex, KeyHasher,
    LegacyHashError, MalformedKey, MintedKey, PlaintextKey, PresentedKey, SecretString,
};
pub use clock::{Clock, ManualClock, SystemClock};
pub use email::{
    same_mailbox, ContactEmail, Contacts, ContactsError, EmailError, LoginEmail, MAX_CONTACTS,
};
pub use label::{Label, LabelError, MAX_LABEL_CHARS};
pub use policy::Policy;
pub use signing::{LogSigner, SigningKeyError};
