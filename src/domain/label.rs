//! A key's label: permanent, shown on the Settings page, unique in the account.

use std::fmt;

/// At most this many characters (Unicode scalar values).
pub const MAX_LABEL_CHARS: usize = 255;

/// A trimmed, non-empty label of at most 255 characters with no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Label(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error("label must not be empty")]
    Empty,
    #[error("label must be at most {MAX_LABEL_CHARS} characters (got {0})")]
    TooLong(usize),
    #[error("label must not contain control characters")]
    ControlCharacter,
    #[error("label must not contain an API key (the log keeps labels for ever)")]
    ContainsKey,
}

impl Label {
    pub fn parse(raw: &str) -> Result<Self, LabelError> {
        let trimmed = raw.trim();
        if trimmed.is_empty() {
            return Err(LabelError::Empty);
        }
        let chars = trimmed.chars().count();
        if chars > MAX_LABEL_CHARS {
            return Err(LabelError::TooLong(chars));
        }
        if trimmed.chars().any(char::is_control) {
            return Err(LabelError::ControlCharacter);
        }
        if super::contains_key_shaped(trimmed.as_bytes()) {
            return Err(LabelError::ContainsKey);
        }
        Ok(Self(trimmed.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_and_bounds() {
        assert_eq!(
            Label::parse("  prod  ").map(Label::into_string),
            Ok("prod".into())
        );
        assert_eq!(Label::parse("   "), Err(LabelError::Empty));
        assert!(
            Label::parse(&"é".repeat(255)).is_ok(),
            "counts characters, not bytes"
        );
        assert_eq!(
            Label::parse(&"a".repeat(256)),
            Err(LabelError::TooLong(256))
        );
        assert_eq!(Label::parse("a\u{0}b"), Err(LabelError::ControlCharacter));
        let key = format!("old prod key jo_v1_{}", "Ab+/".repeat(11));
        assert_eq!(Label::parse(&key), Err(LabelError::ContainsKey));
    }
}
