//! Confirmed publishing for replay and import: one confirm-mode channel, a
//! bounded window of publishes awaiting their confirm, a timeout on every
//! await, `mandatory` so that an unroutable message is an error.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::pin::Pin;
use std::time::Duration;

use futures_util::FutureExt;
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::Confirmation;
use lapin::{BasicProperties, Channel, Connection};

use crate::error::{timed, OperatorError};

/// Default most publishes awaiting their confirm.
pub const DEFAULT_WINDOW: usize = 256;

type Waiting = Pin<Box<dyn Future<Output = Result<Confirmation, OperatorError>> + Send>>;

/// What identifies a publish among those in flight: where it went, its
/// `message_id` and a hash of its body (a returned message carries all three).
type Key = (String, String, Option<String>, u64);

fn key(exchange: &str, routing_key: &str, message_id: Option<&str>, body: &[u8]) -> Key {
    let mut h = DefaultHasher::new();
    body.hash(&mut h);
    (
        exchange.to_owned(),
        routing_key.to_owned(),
        message_id.map(str::to_owned),
        h.finish(),
    )
}

fn key_of_return(r: &BasicReturnMessage) -> Key {
    let d = &r.delivery;
    key(
        d.exchange.as_str(),
        d.routing_key.as_str(),
        d.properties.message_id().as_ref().map(|s| s.as_str()),
        &d.data,
    )
}

enum Slot {
    Waiting(Waiting),
    Done(Box<Result<Confirmation, OperatorError>>),
}

struct InFlight<T> {
    token: T,
    key: Key,
    target: String,
    slot: Slot,
}

/// A confirm-mode channel with a bounded window; `T` travels with each
/// publish and comes back with its outcome (a delivery tag to ack), in
/// publish order.
///
/// ## Returned messages
///
/// lapin hands a `basic.return` to whichever confirm it resolves next and
/// resolves a multiple-ack in hash-map order, so `Ack(Some(returned))` may
/// belong to another publish in the window, and the unroutable one may see
/// `Ack(None)`. Trusting it would ack a dead letter whose copy was dropped.
/// Instead, returns are collected by what they carry (exchange, routing key,
/// `message_id`, body) and matched to their publish. The oldest publish is
/// decided only once its confirm resolved and every confirm already resolved
/// has given up its return: lapin resolves in order and hands returns out
/// first in, first out, so a return of the oldest publish sits on a confirm
/// resolved no later than its own.
pub(crate) struct Confirmed<T> {
    channel: Channel,
    window: usize,
    timeout: Duration,
    pending: VecDeque<InFlight<T>>,
    /// Returns not yet matched to their publish.
    returned: HashMap<Key, usize>,
}

impl<T: Send + 'static> Confirmed<T> {
    pub(crate) async fn open(
        conn: &Connection,
        window: usize,
        timeout: Duration,
    ) -> Result<Self, OperatorError> {
        let channel = timed(
            timeout,
            "opening a channel",
            "publisher",
            conn.create_channel(),
        )
        .await?;
        timed(
            timeout,
            "enabling publisher confirms",
            "publisher",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(Confirmed {
            channel,
            window: window.max(1),
            timeout,
            pending: VecDeque::new(),
            returned: HashMap::new(),
        })
    }

    /// Whether the window is full (take a [`Confirmed::next_batch`] first).
    pub(crate) fn full(&self) -> bool {
        self.pending.len() >= self.window
    }

    /// Publishes awaiting a confirm.
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Sends one message; its outcome comes back from [`Confirmed::next_batch`].
    /// An error here means the channel is unusable.
    pub(crate) async fn publish(
        &mut self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        token: T,
    ) -> Result<(), OperatorError> {
        // Errors quote it: the queue through the default exchange, else
        // `exchange/routing key`.
        let target = if exchange.is_empty() {
            routing_key.to_owned()
        } else {
            format!("{exchange}/{routing_key}")
        };
        let properties_id = properties.message_id().as_ref().map(|s| s.to_string());
        let confirm = timed(
            self.timeout,
            "publishing",
            &target,
            self.channel.basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            ),
        )
        .await?;
        let timeout = self.timeout;
        let waiting_target = target.clone();
        let waiting: Waiting = Box::pin(async move {
            match tokio::time::timeout(timeout, confirm).await {
                Err(_) => Err(OperatorError::Timeout {
                    what: "waiting for a publisher confirm",
                    object: waiting_target,
                    after: timeout,
                }),
                Ok(Err(source)) => Err(OperatorError::Amqp {
                    what: "waiting for a publisher confirm",
                    object: waiting_target,
                    source,
                }),
                Ok(Ok(c)) => Ok(c),
            }
        });
        let message_id = properties_id.as_deref();
        self.pending.push_back(InFlight {
            token,
            key: key(exchange, routing_key, message_id, body),
            target,
            slot: Slot::Waiting(waiting),
        });
        Ok(())
    }

    /// Takes the return a resolved confirm carries into `returned`.
    fn harvest(returned: &mut HashMap<Key, usize>, slot: &mut Slot) {
        let Slot::Done(done) = slot else { return };
        if let Ok(Confirmation::Ack(r) | Confirmation::Nack(r)) = &mut **done {
            if let Some(msg) = r.take() {
                *returned.entry(key_of_return(&msg)).or_default() += 1;
            }
        }
    }

    /// Polls every confirm still waiting and takes the return of every one
    /// resolved.
    fn poll_all(&mut self) {
        for f in self.pending.iter_mut() {
            if let Slot::Waiting(w) = &mut f.slot {
                if let Some(r) = w.now_or_never() {
                    f.slot = Slot::Done(Box::new(r));
                }
            }
            Self::harvest(&mut self.returned, &mut f.slot);
        }
    }

    /// Whether the oldest publish's confirm has resolved (polled, not
    /// waited for): [`Confirmed::next_batch`] would return at once with at
    /// least one outcome. False when nothing is in flight.
    pub(crate) fn front_settled(&mut self) -> bool {
        let Some(front) = self.pending.front_mut() else {
            return false;
        };
        if let Slot::Waiting(w) = &mut front.slot {
            match w.now_or_never() {
                Some(r) => front.slot = Slot::Done(Box::new(r)),
                None => return false,
            }
        }
        true
    }

    /// Waits until the oldest publish's confirm resolved.
    async fn await_front(&mut self) -> bool {
        let Some(front) = self.pending.front_mut() else {
            return false;
        };
        if let Slot::Waiting(w) = &mut front.slot {
            let r = w.await;
            front.slot = Slot::Done(Box::new(r));
        }
        true
    }

    /// The outcomes of the oldest publishes whose confirms have resolved, in
    /// publish order (at least one, waiting for the oldest; empty when
    /// nothing is in flight). The window is scanned twice per batch, not once
    /// per message.
    pub(crate) async fn next_batch(&mut self) -> Vec<(T, Result<(), OperatorError>)> {
        if !self.await_front().await {
            return Vec::new();
        }
        // The oldest resolved before the first pass, so that pass harvests
        // every return that can be its own. Those seen resolved during it
        // can be decided after a second pass: every confirm resolved no
        // later than theirs has given up its return by then (see the type's
        // docs). When only the oldest is ready, one pass is enough.
        self.poll_all();
        let ready = self
            .pending
            .iter()
            .take_while(|f| matches!(f.slot, Slot::Done(_)))
            .count();
        if ready > 1 {
            self.poll_all();
        }
        (0..ready).filter_map(|_| self.decide_front()).collect()
    }

    /// Decides the oldest publish (its confirm has resolved, and the returns
    /// it could be matched with were harvested).
    fn decide_front(&mut self) -> Option<(T, Result<(), OperatorError>)> {
        if !matches!(self.pending.front()?.slot, Slot::Done(_)) {
            return None;
        }
        let f = self.pending.pop_front()?;
        let (exchange, routing_key, _, _) = &f.key;
        let publish_error = |outcome: &str| OperatorError::Publish {
            exchange: exchange.clone(),
            routing_key: routing_key.clone(),
            outcome: outcome.into(),
        };
        let was_returned = match self.returned.get_mut(&f.key) {
            Some(n) if *n > 0 => {
                *n -= 1;
                if *n == 0 {
                    self.returned.remove(&f.key);
                }
                true
            }
            _ => false,
        };
        let Slot::Done(done) = f.slot else {
            unreachable!("checked above")
        };
        let outcome = match *done {
            Err(e) => Err(e),
            Ok(_) if was_returned => Err(publish_error("returned (no queue is bound for it)")),
            Ok(Confirmation::Ack(_)) => Ok(()),
            Ok(Confirmation::Nack(_)) => Err(publish_error("nacked")),
            Ok(Confirmation::NotRequested) => Err(publish_error(&format!(
                "not confirmed (confirms are off on {:?})",
                f.target
            ))),
        };
        Some((f.token, outcome))
    }

    /// Closes the channel (after every confirm was taken).
    pub(crate) async fn close(self) {
        let _ = tokio::time::timeout(self.timeout, self.channel.close(200, "done".into())).await;
    }
}

/// The users whose `user_id` copies went without (the connection logs in as
/// another user, and the broker refuses a `user_id` that is not its login):
/// the first few named, for one log line per run rather than one per message.
#[derive(Debug, Default)]
pub(crate) struct DroppedUserIds {
    named: BTreeSet<String>,
    more: bool,
}

impl DroppedUserIds {
    /// Users named, at most.
    const NAMED: usize = 5;

    /// Whether `copy` (of `original`) goes without the `user_id` `original`
    /// carries; notes the user when it does.
    pub(crate) fn note(&mut self, original: &BasicProperties, copy: &BasicProperties) -> bool {
        let (Some(user), None) = (original.user_id(), copy.user_id()) else {
            return false;
        };
        if !self.named.contains(user.as_str()) {
            if self.named.len() < Self::NAMED {
                self.named.insert(user.to_string());
            } else {
                self.more = true;
            }
        }
        true
    }
}

/// `svc-a,svc-b` (`,...` when more users than named).
impl std::fmt::Display for DroppedUserIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.named.iter().map(String::as_str).collect();
        f.write_str(&names.join(","))?;
        if self.more {
            f.write_str(",...")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_user_ids_are_noted_once_each_and_the_first_few_named() {
        let mut d = DroppedUserIds::default();
        let none = BasicProperties::default();
        let of = |u: &str| BasicProperties::default().with_user_id(u.to_owned().into());
        assert!(!d.note(&none, &none), "no user_id to drop");
        assert!(!d.note(&of("a"), &of("a")), "kept");
        for u in ["b", "a", "b", "c", "d", "e"] {
            assert!(d.note(&of(u), &none));
        }
        assert_eq!(d.to_string(), "a,b,c,d,e");
        assert!(d.note(&of("f"), &none));
        assert_eq!(d.to_string(), "a,b,c,d,e,...");
    }
}
