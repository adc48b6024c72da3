//! [`PublisherConfig`]: the window, timeouts, size limit and reconnect backoff.

use std::time::Duration;

/// How a [`crate::Publisher`] behaves. Build it with [`PublisherConfig::default`]
/// and the consuming setters; every default is a `pub const` below.
///
/// ## Order and limits
///
/// - `window` bounds everything: at most `window` messages are handed to the
///   broker and not yet confirmed (and they hold the only copies the publisher
///   keeps). A publish waits for a free slot; a slot is freed only when the
///   broker answered or the channel died, so a blocked broker fills the window
///   and callers then wait, never memory.
/// - `publish_timeout` is the whole budget of one publish: waiting for a slot,
///   reconnecting, republishing and waiting for the confirm. When it passes
///   the caller gets [`crate::PublishError::Timeout`]; a message whose confirm
///   never came is never reported as sent.
/// - `max_message_size` is checked before anything is sent.
/// - The reconnect backoff applies when opening a channel fails; the
///   connection's own retries are those of the [`warren_topology::ConnectOptions`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublisherConfig {
    /// Unconfirmed publishes in flight at most. Default [`PublisherConfig::DEFAULT_WINDOW`].
    pub window: usize,
    /// Budget of one publish, from the call to the confirm. Default [`PublisherConfig::DEFAULT_PUBLISH_TIMEOUT`].
    pub publish_timeout: Duration,
    /// Largest body accepted, in bytes. Default [`PublisherConfig::DEFAULT_MAX_MESSAGE_SIZE`].
    pub max_message_size: usize,
    /// First delay before reopening a channel after a failure. Default [`PublisherConfig::DEFAULT_RECONNECT_MIN_DELAY`].
    pub reconnect_min_delay: Duration,
    /// Longest such delay (exponential with jitter in between). Default [`PublisherConfig::DEFAULT_RECONNECT_MAX_DELAY`].
    pub reconnect_max_delay: Duration,
    /// Time allowed to get a channel (including reconnecting) and enable
    /// confirms on it. Default [`PublisherConfig::DEFAULT_CHANNEL_TIMEOUT`].
    pub channel_timeout: Duration,
}

impl PublisherConfig {
    /// The longest any of its durations (and a [`crate::Message`]'s own
    /// timeout) is taken to be: 100 years. A longer one, such as
    /// `Duration::MAX` for "for ever", counts as this long, since a
    /// deadline past what a clock holds cannot be computed.
    pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    /// Default window: 1024 unconfirmed publishes.
    pub const DEFAULT_WINDOW: usize = 1024;
    /// Default publish timeout: 30 s.
    pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);
    /// Default largest body: 16 MiB (RabbitMQ 4's own default `max_message_size`).
    pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;
    /// Default first reconnect delay: 100 ms.
    pub const DEFAULT_RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
    /// Default longest reconnect delay: 5 s.
    pub const DEFAULT_RECONNECT_MAX_DELAY: Duration = Duration::from_secs(5);
    /// Default time to get a channel: 30 s.
    pub const DEFAULT_CHANNEL_TIMEOUT: Duration = Duration::from_secs(30);

    /// Sets the window (at least 1).
    pub fn window(mut self, window: usize) -> Self {
        self.window = window.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        self
    }

    /// Sets the publish timeout.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.publish_timeout = timeout;
        self
    }

    /// Sets the largest body accepted, in bytes.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Sets the reconnect backoff (exponential with jitter between `min` and `max`).
    pub fn reconnect_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.reconnect_min_delay = min;
        self.reconnect_max_delay = max.max(min);
        self
    }

    /// Sets the time allowed to get a channel.
    pub fn channel_timeout(mut self, timeout: Duration) -> Self {
        self.channel_timeout = timeout;
        self
    }
}

impl Default for PublisherConfig {
    fn default() -> Self {
        PublisherConfig {
            window: Self::DEFAULT_WINDOW,
            publish_timeout: Self::DEFAULT_PUBLISH_TIMEOUT,
            max_message_size: Self::DEFAULT_MAX_MESSAGE_SIZE,
            reconnect_min_delay: Self::DEFAULT_RECONNECT_MIN_DELAY,
            reconnect_max_delay: Self::DEFAULT_RECONNECT_MAX_DELAY,
            channel_timeout: Self::DEFAULT_CHANNEL_TIMEOUT,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setters_keep_values_sane() {
        let c = PublisherConfig::default()
            .window(0)
            .reconnect_backoff(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(c.window, 1);
        assert_eq!(c.reconnect_max_delay, Duration::from_secs(2));
        assert_eq!(
            PublisherConfig::default().window,
            PublisherConfig::DEFAULT_WINDOW
        );
    }
}
