//! [`ConsumerError`]: why a consumer group stopped.

/// Why [`crate::ConsumerGroup::run`] returned an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConsumerError {
    /// Could not connect, even after retrying with backoff.
    #[error("consumer group {group:?}: {source}")]
    Connect {
        /// The group.
        group: String,
        /// The connect error (password masked).
        source: warren_topology::TopologyError,
    },
    /// A queue of the group (work, retry or dead-letter) does not exist:
    /// apply the topology first.
    #[error("consumer group {group:?}: queue {queue:?} does not exist on the broker (run `warren topology apply` first): {detail}")]
    QueueMissing {
        /// The group.
        group: String,
        /// The queue.
        queue: String,
        /// What the broker said.
        detail: String,
    },
    /// The publisher of retry and dead-letter copies could not start.
    #[error("consumer group {group:?}: starting the publisher of retry and dead-letter copies: {source}")]
    Copies {
        /// The group.
        group: String,
        /// Why.
        source: warren_producer::PublishError,
    },
    /// A broker error while setting up a channel.
    #[error("consumer group {group:?}: {what}: {source}")]
    Broker {
        /// The group.
        group: String,
        /// What was being done.
        what: &'static str,
        /// The lapin error.
        source: lapin::Error,
    },
}

impl ConsumerError {
    /// Whether trying again later may succeed (the network, not the setup).
    pub fn is_transient(&self) -> bool {
        match self {
            ConsumerError::Connect { source, .. } => source.is_transient(),
            ConsumerError::QueueMissing { .. } => false,
            ConsumerError::Copies { source, .. } => source.is_transient(),
            ConsumerError::Broker { source, .. } => source.is_io_error() || !source.is_amqp_error(),
        }
    }
}
