//! The account id: opaque to keyledger, owned by the calling service.

use std::fmt;

/// At most this many bytes.
pub const MAX_ACCOUNT_ID_BYTES: usize = 128;

/// A non-empty account id of at most 128 bytes with no control characters or slashes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountIdError {
    #[error("account id must not be empty")]
    Empty,
    #[error("account id must be at most {MAX_ACCOUNT_ID_BYTES} bytes")]
    TooLong,
    #[error("account id must not contain control characters, whitespace or '/'")]
    BadCharacter,
}

impl AccountId {
    pub fn parse(raw: &str) -> Result<Self, AccountIdError> {
        if raw.is_empty() {
            return Err(AccountIdError::Empty);
        }
        if raw.len() > MAX_ACCOUNT_ID_BYTES {
            return Err(AccountIdError::TooLong);
        }
        if raw
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '/')
        {
            return Err(AccountIdError::BadCharacter);
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert!(AccountId::parse("acc-42").is_ok());
        assert_eq!(AccountId::parse(""), Err(AccountIdError::Empty));
        assert_eq!(AccountId::parse("a/b"), Err(AccountIdError::BadCharacter));
        assert_eq!(
            AccountId::parse(&"x".repeat(129)),
            Err(AccountIdError::TooLong)
        );
    }
}
