//! [`SecretUrl`]: a broker or database URL that never shows its password.

use std::fmt;
use std::ops::Deref;

use crate::redact_url;

/// A URL (or a comma-separated list of them) whose `Debug` and `Display` replace each
/// password with `***`, so a configuration struct holding it can be logged or printed.
/// [`Deref`] gives the whole URL, to connect with; print only the `SecretUrl` itself.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> Self {
        SecretUrl(url.into())
    }

    /// The URL with its password, to connect with.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL as it may be shown: every password replaced by `***`.
    pub fn redacted(&self) -> String {
        self.0
            .split(',')
            .map(redact_url)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Deref for SecretUrl {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for SecretUrl {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl From<String> for SecretUrl {
    fn from(url: String) -> Self {
        SecretUrl(url)
    }
}

impl From<&str> for SecretUrl {
    fn from(url: &str) -> Self {
        SecretUrl(url.to_owned())
    }
}

/// Joins URLs into one comma-separated list (e.g. the values of a repeated `--amqp-url`).
impl FromIterator<SecretUrl> for SecretUrl {
    fn from_iter<I: IntoIterator<Item = SecretUrl>>(urls: I) -> Self {
        let urls: Vec<String> = urls.into_iter().map(|url| url.0).collect();
        SecretUrl(urls.join(","))
    }
}

impl fmt::Display for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretUrl({:?})", self.redacted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_and_display_hide_every_password() {
        let url = SecretUrl::from("amqp://app:pw1@a:5672/%2f,amqps://app:pw2@b:5671/%2f");
        for shown in [
            format!("{url}"),
            format!("{url:?}"),
            format!("{:?}", Some(&url)),
        ] {
            assert!(!shown.contains("pw1") && !shown.contains("pw2"), "{shown}");
            assert!(shown.contains("amqp://app:***@a:5672/%2f"), "{shown}");
            assert!(shown.contains("amqps://app:***@b:5671/%2f"), "{shown}");
        }
        assert_eq!(url.expose(), &*url);
        assert!(url.expose().contains("pw2"));
        let joined: SecretUrl = [
            SecretUrl::from("amqp://app:pw1@a:5672/%2f"),
            SecretUrl::from("amqps://app:pw2@b:5671/%2f"),
        ]
        .into_iter()
        .collect();
        assert_eq!(joined, url);
        let plain = SecretUrl::from("sqlite://orders.db?mode=rwc");
        assert_eq!(plain.to_string(), "sqlite://orders.db?mode=rwc");
    }
}
