//! [`Selection`]: which dead letters a replay or purge takes.

use std::time::{Duration, SystemTime};

use regex::Regex;
use serde::Serialize;

use crate::error::OperatorError;
use crate::message::Info;

/// Which dead letters to take. Every given criterion must match (AND);
/// several `ids` match any of them. An empty selection is refused unless
/// `all` is set, so that a forgotten flag never replays or purges a whole
/// queue.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Selection {
    /// Message ids (`message_id`, or the `h:` hash `list` shows).
    pub ids: Vec<String>,
    /// A failure-group fingerprint (from `stats`).
    pub fingerprint: Option<String>,
    /// A regular expression the error text must match.
    #[serde(serialize_with = "ser_regex")]
    pub error: Option<Regex>,
    /// The error kind (`permanent`, `broker`, ...).
    pub kind: Option<String>,
    /// The original routing key (exact).
    pub routing_key: Option<String>,
    /// Dead-lettered at least this long ago.
    #[serde(serialize_with = "ser_dur")]
    pub older_than: Option<Duration>,
    /// Dead-lettered at most this long ago.
    #[serde(serialize_with = "ser_dur")]
    pub newer_than: Option<Duration>,
    /// Take at most this many (per group); at least 1 ([`Selection::check`]
    /// refuses 0).
    pub limit: Option<usize>,
    /// Take everything the other criteria allow, even with none given.
    pub all: bool,
}

fn ser_regex<S: serde::Serializer>(r: &Option<Regex>, s: S) -> Result<S::Ok, S::Error> {
    match r {
        Some(r) => s.serialize_some(r.as_str()),
        None => s.serialize_none(),
    }
}

fn ser_dur<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&humantime::format_duration(*d).to_string()),
        None => s.serialize_none(),
    }
}

impl Selection {
    /// Whether any criterion (other than `limit`) was given.
    pub fn has_criteria(&self) -> bool {
        !self.ids.is_empty()
            || self.fingerprint.is_some()
            || self.error.is_some()
            || self.kind.is_some()
            || self.routing_key.is_some()
            || self.older_than.is_some()
            || self.newer_than.is_some()
    }

    /// Refuses a selection that selects nothing explicitly.
    pub fn check(&self) -> Result<(), OperatorError> {
        if !self.all && !self.has_criteria() {
            return Err(OperatorError::Selection(
                "nothing selected: give --id, --fingerprint, --error, --kind, --routing-key, --older-than or --newer-than, or --all for every dead letter".into(),
            ));
        }
        if self.limit == Some(0) {
            return Err(OperatorError::Selection(
                "--limit 0 selects nothing: give at least 1, or leave --limit out".into(),
            ));
        }
        if self.all && !self.ids.is_empty() {
            return Err(OperatorError::Selection(
                "--all and --id contradict each other; give one".into(),
            ));
        }
        Ok(())
    }

    /// Whether a dead letter matches (ignoring `limit`).
    pub fn matches(&self, info: &Info, now: SystemTime) -> bool {
        if !self.ids.is_empty() && !self.ids.contains(&info.id) {
            return false;
        }
        if let Some(f) = &self.fingerprint {
            if *f != info.fingerprint {
                return false;
            }
        }
        if let Some(re) = &self.error {
            if !re.is_match(&info.error) {
                return false;
            }
        }
        if let Some(k) = &self.kind {
            if *k != info.kind {
                return false;
            }
        }
        if let Some(rk) = &self.routing_key {
            if info.original_routing_key.as_deref() != Some(rk.as_str()) {
                return false;
            }
        }
        let age = info.age(now);
        if let Some(min) = self.older_than {
            if age.is_none_or(|a| a < min) {
                return false;
            }
        }
        if let Some(max) = self.newer_than {
            if age.is_none_or(|a| a > max) {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn info(id: &str, kind: &str, error: &str, at: u64) -> Info {
        Info {
            id: id.into(),
            attempts: 0,
            replays: 0,
            kind: kind.into(),
            error: error.into(),
            fingerprint: crate::fingerprint::fingerprint(kind, error),
            dead_lettered_at: Some(at),
            original_exchange: Some("orders".into()),
            original_routing_key: Some("order.created".into()),
            size: 1,
        }
    }

    #[test]
    fn empty_selection_is_refused() {
        assert!(Selection::default().check().is_err());
        let all = Selection {
            all: true,
            ..Default::default()
        };
        assert!(all.check().is_ok());
        let none = Selection {
            all: true,
            limit: Some(0),
            ..Default::default()
        };
        assert!(none.check().is_err());
    }

    #[test]
    fn criteria_are_anded() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let s = Selection {
            kind: Some("permanent".into()),
            error: Some(Regex::new("not found").unwrap()),
            older_than: Some(Duration::from_secs(100)),
            ..Default::default()
        };
        assert!(s.matches(&info("a", "permanent", "order 1 not found", 9_000), now));
        assert!(!s.matches(&info("b", "timeout", "order 1 not found", 9_000), now));
        assert!(!s.matches(&info("c", "permanent", "order 1 not found", 9_950), now));
        assert!(!s.matches(&info("d", "permanent", "paid", 9_000), now));
    }
}
