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
    /// The broker refused the user access to the work queue (RabbitMQ's
    /// ACCESS_REFUSED): the user needs the read permission on it.
    #[error("consumer group {group:?}: user {user:?} may not consume from queue {queue:?} in vhost {vhost:?} ({detail}): the read pattern (the third of rabbitmqctl set_permissions -p {vhost} {user} CONFIGURE WRITE READ) must match the queue's name, and for retry and dead-letter copies the write pattern must match amq.default (the default exchange) and warren.dlx; rabbitmqctl list_user_permissions {user} shows the current ones")]
    AccessRefused {
        /// The group.
        group: String,
        /// The queue.
        queue: String,
        /// The user the broker named.
        user: String,
        /// The vhost.
        vhost: String,
        /// What the broker said.
        detail: String,
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
            ConsumerError::QueueMissing { .. } | ConsumerError::AccessRefused { .. } => false,
            ConsumerError::Copies { source, .. } => source.is_transient(),
            ConsumerError::Broker { source, .. } => source.is_io_error() || !source.is_amqp_error(),
        }
    }
}
