//! Email addresses: contacts of a key and the account's login email.
//!
//! Parsed with the `email_address` crate (RFC 5322 local parts, a domain with at least two
//! labels, no domain literals, no display names), then normalised: trimmed, domain
//! lower-cased. The local part keeps its case (it is case-sensitive by the standard).

use std::collections::HashSet;
use std::fmt;

use email_address::{EmailAddress, Options};

/// A sane upper bound on a key's contacts.
pub const MAX_CONTACTS: usize = 20;

const OPTIONS: Options = Options {
    minimum_sub_domains: 2,
    allow_domain_literal: false,
    allow_display_text: false,
    allow_long_local_parts: false,
};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("'{address}' is not a valid email address: {reason}")]
pub struct EmailError {
    pub address: String,
    pub reason: String,
}

fn parse_normalised(raw: &str) -> Result<(String, usize), EmailError> {
    let trimmed = raw.trim();
    let bad = |reason: String| EmailError {
        address: trimmed.chars().take(320).collect(),
        reason,
    };
    let parsed = EmailAddress::parse_with_options(trimmed, OPTIONS)
        .map_err(|e| bad(e.to_string().trim_end_matches('.').to_owned()))?;
    let local = parsed.local_part();
    let domain = parsed.domain().to_ascii_lowercase();
    let normalised = format!("{local}@{domain}");
    if normalised.len() > 254 {
        return Err(bad("longer than 254 characters".into()));
    }
    Ok((normalised, local.len()))
}

/// One contact email, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContactEmail(String);

impl ContactEmail {
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        parse_normalised(raw).map(|(s, _)| Self(s))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ContactEmail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// 1 to 20 distinct contact emails, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contacts(Vec<ContactEmail>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContactsError {
    #[error("at least one contact email is required")]
    Empty,
    #[error("at most {MAX_CONTACTS} contact emails are allowed (got {0})")]
    TooMany(usize),
    #[error("contact {index}: {error}")]
    Invalid { index: usize, error: EmailError },
    #[error("contact {index}: '{address}' is listed more than once")]
    Duplicate { index: usize, address: String },
}

impl Contacts {
    pub fn parse<S: AsRef<str>>(raw: &[S]) -> Result<Self, ContactsError> {
        if raw.is_empty() {
            return Err(ContactsError::Empty);
        }
        if raw.len() > MAX_CONTACTS {
            return Err(ContactsError::TooMany(raw.len()));
        }
        let mut seen = HashSet::with_capacity(raw.len());
        let mut out = Vec::with_capacity(raw.len());
        for (index, r) in raw.iter().enumerate() {
            let email = ContactEmail::parse(r.as_ref())
                .map_err(|error| ContactsError::Invalid { index, error })?;
            // Two spellings that differ only in the case of the local part reach the same
            // mailbox on every real mail server: treat them as duplicates.
            if !seen.insert(email.as_str().to_lowercase()) {
                return Err(ContactsError::Duplicate {
                    index,
                    address: email.0,
                });
            }
            out.push(email);
        }
        Ok(Self(out))
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|c| c.0.clone()).collect()
    }
}

/// The account owner's login email; its local part gives the key prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginEmail {
    address: String,
    local_len: usize,
}

impl LoginEmail {
    /// Parses and normalises; rejects an address whose local part has no ASCII letter or
    /// digit (it would give an empty key prefix).
    pub fn parse(raw: &str) -> Result<Self, EmailError> {
        let (address, local_len) = parse_normalised(raw)?;
        let login = Self { address, local_len };
        if login.username().is_empty() {
            return Err(EmailError {
                address: login.address,
                reason: "its local part has no letter or digit to form the key prefix".into(),
            });
        }
        Ok(login)
    }

    pub fn as_str(&self) -> &str {
        &self.address
    }

    /// The key prefix: the local part with every non-alphanumeric character removed
    /// (`john.doe@agency.gov.sg` → `johndoe`).
    pub fn username(&self) -> String {
        self.address[..self.local_len]
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect()
    }

    /// Whether `other` names the same mailbox (domain compared without case).
    pub fn same_as(&self, other: &str) -> bool {
        match parse_normalised(other) {
            Ok((o, _)) => o == self.address,
            Err(_) => false,
        }
    }
}

/// Whether `candidate` names the mailbox `normalised` (an address already normalised by
/// this module): the local part compared exactly, the domain without ASCII case, no full
/// parse (this runs on the verification hot path).
pub fn same_mailbox(normalised: &str, candidate: &str) -> bool {
    let (Some((l1, d1)), Some((l2, d2))) = (
        normalised.rsplit_once('@'),
        candidate.trim().rsplit_once('@'),
    ) else {
        return false;
    };
    l1 == l2 && d1.eq_ignore_ascii_case(d2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalises_domain_case_and_whitespace() {
        let c = ContactEmail::parse("  Jane.Tan@Agency.GOV.sg ").expect("valid");
        assert_eq!(c.as_str(), "Jane.Tan@agency.gov.sg");
    }

    #[test]
    fn rejects_invalid_addresses() {
        for bad in [
            "",
            "plain",
            "a@b",
            "a@@b.sg",
            "John <j@x.sg>",
            "a@[127.0.0.1]",
            "a b@x.sg",
        ] {
            assert!(
                ContactEmail::parse(bad).is_err(),
                "{bad} should be rejected"
            );
        }
    }

    #[test]
    fn contacts_bounds_and_duplicates() {
        assert_eq!(Contacts::parse::<&str>(&[]), Err(ContactsError::Empty));
        let many: Vec<String> = (0..21).map(|i| format!("u{i}@x.gov.sg")).collect();
        assert_eq!(Contacts::parse(&many), Err(ContactsError::TooMany(21)));
        let dup = Contacts::parse(&["a@x.gov.sg", "A@X.GOV.SG"]);
        assert!(matches!(
            dup,
            Err(ContactsError::Duplicate { index: 1, .. })
        ));
        let ok = Contacts::parse(&["a@x.gov.sg", "b@x.gov.sg"]).expect("valid");
        assert_eq!(ok.to_strings(), vec!["a@x.gov.sg", "b@x.gov.sg"]);
    }

    #[test]
    fn same_mailbox_compares_domains_without_case() {
        assert!(same_mailbox(
            "John.Doe@agency.gov.sg",
            " John.Doe@AGENCY.gov.sg "
        ));
        assert!(!same_mailbox(
            "John.Doe@agency.gov.sg",
            "john.doe@agency.gov.sg"
        ));
        assert!(!same_mailbox("a@x.gov.sg", "a@x.gov.sg.evil"));
        assert!(!same_mailbox("a@x.gov.sg", "nonsense"));
    }

    #[test]
    fn username_rule() {
        let l = LoginEmail::parse("john.doe@agency.gov.sg").expect("valid");
        assert_eq!(l.username(), "johndoe");
        let l = LoginEmail::parse("Mary_Ann-Lim+1@x.gov.sg").expect("valid");
        assert_eq!(l.username(), "MaryAnnLim1");
        assert!(LoginEmail::parse("._.@x.gov.sg").is_err());
        assert!(l.same_as("Mary_Ann-Lim+1@X.GOV.SG"));
    }
}
