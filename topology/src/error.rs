//! Errors of the topology crate.

use std::fmt;

/// A topology file that does not validate: where, which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file's path as given.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The dotted field, like `group.retry`.
    pub field: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file, self.line, self.column)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Everything that can go wrong reading a topology or talking to the broker
/// about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopologyError {
    /// The topology file could not be read.
    #[error("cannot read topology file {file}: {source}")]
    Read {
        /// The path.
        file: String,
        /// Why.
        source: std::io::Error,
    },
    /// The topology file is invalid; nothing was declared.
    #[error("{0}")]
    Invalid(ConfigError),
    /// The AMQP URL could not be parsed.
    #[error("invalid AMQP URL {url}: {reason}")]
    Url {
        /// The URL, password masked.
        url: String,
        /// Why.
        reason: String,
    },
    /// Could not connect (after retrying).
    #[error("cannot connect to {url}: {reason}")]
    Connect {
        /// The URL, password masked.
        url: String,
        /// Why, with what to do.
        reason: String,
        /// Whether trying again may help (false for a refused login or vhost).
        transient: bool,
    },
    /// An object exists on the broker with other properties (PRECONDITION_FAILED).
    #[error("{kind} {name:?} exists on the broker with other settings: {detail}. warren deleted nothing; to change it, move its messages away, delete it yourself and apply again")]
    Mismatch {
        /// `queue` or `exchange`.
        kind: &'static str,
        /// Its name.
        name: String,
        /// What differs, as far as the broker says (and, after `; also`,
        /// the other objects that differ).
        detail: String,
        /// Every object that differs, this one first.
        differing: Vec<crate::declare::Check>,
    },
    /// `apply` failed after it had declared some objects (a binding to an
    /// exchange that is not there, a permission, an object another client
    /// declared meanwhile); what it declared stays.
    #[error("{source}; already declared: {}", declared.join(", "))]
    Incomplete {
        /// What `apply` had declared before the failure (`exchange "x"`,
        /// `queue "y"`, `N bindings`).
        declared: Vec<String>,
        /// Everything `apply` did before the failure, objects it found
        /// already there included.
        applied: Vec<crate::declare::Applied>,
        /// The failure.
        source: Box<TopologyError>,
    },
    /// The broker refused the login a permission on an object
    /// (ACCESS_REFUSED).
    #[error("the broker refused {object} ({text}): {needs}")]
    AccessRefused {
        /// What was being done (`exchange "x"`, `binding ...`).
        object: String,
        /// The broker's words (they name the user and the vhost).
        text: String,
        /// Which permission that takes.
        needs: &'static str,
    },
    /// Any other broker error while declaring.
    #[error("broker error on {object}: {source}")]
    Broker {
        /// What was being done.
        object: String,
        /// The lapin error.
        source: lapin::Error,
    },
}

impl TopologyError {
    /// Whether trying again later may succeed (network trouble, not a bad file
    /// or a mismatch).
    pub fn is_transient(&self) -> bool {
        match self {
            TopologyError::Connect { transient, .. } => *transient,
            TopologyError::Broker { source, .. } => source.is_io_error() || !source.is_amqp_error(),
            TopologyError::Incomplete { source, .. } => source.is_transient(),
            _ => false,
        }
    }
}
