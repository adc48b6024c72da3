//! Handlers and their result type.
//!
//! A handler is an async function of a [`Delivery`] returning
//! [`HandlerResult`]: `Ok(())` (ack), or a [`HandlerError`] that is retryable
//! or permanent. The runtime turns that result into ack / retry queue /
//! dead-letter in one place (`disposition`).

use std::fmt;
use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use serde::de::DeserializeOwned;

use crate::delivery::Delivery;

/// What a handler returns: `Ok(())` acks the delivery.
pub type HandlerResult = Result<(), HandlerError>;

/// The kind of a failure, as written to `x-warren-error-kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// May succeed later: goes through the retry tiers.
    Retryable,
    /// Will never succeed: dead-lettered at once.
    Permanent,
    /// The handler ran past `handler_timeout` (retried).
    Timeout,
    /// The handler panicked (retried).
    Panic,
    /// The body did not decode: dead-lettered at once.
    Decode,
}

impl ErrorKind {
    /// The header value.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Retryable => "retryable",
            ErrorKind::Permanent => "permanent",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Panic => "panic",
            ErrorKind::Decode => "decode",
        }
    }

    /// Whether a failure of this kind goes through the retry tiers.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            ErrorKind::Retryable | ErrorKind::Timeout | ErrorKind::Panic
        )
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A handler's failure: its kind and a message (stored, one line and at most
/// 1 KiB, in `x-warren-error`; the next attempt reads it with
/// [`Delivery::last_error`]). The message goes to the broker and to the
/// log (there too as one line of at most 1 KiB): keep secrets out of it.
///
/// | constructor | `x-warren-error-kind` | what happens |
/// |---|---|---|
/// | [`HandlerError::retryable`] | `retryable` | a copy to `{group}.retry.{n}` while tiers are left, then to `warren.dlx` |
/// | [`HandlerError::permanent`] | `permanent` | a copy to `warren.dlx` (key `{group}`) at once |
/// | [`HandlerError::decode`] | `decode` | a copy to `warren.dlx` at once |
/// | `new(kind, ..)` | that kind | as the kind's [`ErrorKind::is_retryable`] says |
///
/// No other error converts into it by itself (which kind an I/O or a
/// database error is, only the handler knows): each constructor takes any
/// `Display`, so `call().await.map_err(HandlerError::retryable)?`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerError {
    kind: ErrorKind,
    message: String,
}

impl HandlerError {
    /// A failure that may succeed later (retried through the tiers).
    pub fn retryable(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Retryable, message)
    }

    /// A failure that will never succeed (dead-lettered at once).
    pub fn permanent(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Permanent, message)
    }

    /// A body that does not decode (dead-lettered at once, kind `decode`).
    pub fn decode(message: impl fmt::Display) -> Self {
        Self::new(ErrorKind::Decode, message)
    }

    /// A failure of any kind.
    pub fn new(kind: ErrorKind, message: impl fmt::Display) -> Self {
        HandlerError {
            kind,
            message: message.to_string(),
        }
    }

    /// Its kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Its message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for HandlerError {}

/// Processes one delivery.
///
/// Implement it on a struct (an HTTP client, a command runner) or wrap a
/// closure with [`handler_fn`] or [`json_handler`]. The delivery is an
/// owned, cheaply cloned handle: move it into spawned work freely. Up to
/// the group's `concurrency` run at once, each in a `delivery` span with
/// `group`, `message_id`, `attempt` and `redelivered`.
///
/// For a handler chosen at run time, box it with [`BoxHandler::new`].
///
/// # Cancellation, blocking and panics
///
/// - The future must be `Send`. It is dropped (cancelled) at its current
///   `.await` when `handler_timeout` passes (kind `timeout`, retried) and
///   at the end of the shutdown grace (the delivery goes back to the
///   queue). What it spawned (`tokio::spawn`, `spawn_blocking`) is not
///   cancelled with it.
/// - Never block the thread (`std::thread::sleep`, blocking I/O, long CPU
///   work) in the future itself: it cannot be cancelled while it blocks, so
///   `handler_timeout` does not fire (one that blocks past it and then
///   returns `Ok` is acked), a shutdown waits for it past the grace, and it
///   holds a worker thread of the runtime that the consuming loop, the acks
///   and the other groups of the process need. Run such work with
///   `tokio::task::spawn_blocking` and await it.
/// - A panic is caught, in the future or before it (in a closure's body
///   before its `async` block, in `handle` itself): a failure of kind
///   `panic`, retried like a retryable one, whose message is the panic's
///   text when its payload is a `&str` or a `String`
///   (`std::panic::panic_any(42)` gives "handler panicked"). The group
///   keeps running. The process's panic hook still runs first (by default
///   it prints the panic to stderr).
pub trait Handler: Send + Sync + 'static {
    /// Handles one delivery.
    fn handle(&self, delivery: Delivery) -> impl Future<Output = HandlerResult> + Send;
}

/// A closure handler: see [`handler_fn`].
pub struct HandlerFn<F> {
    f: F,
}

impl<F> fmt::Debug for HandlerFn<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HandlerFn")
    }
}

/// A handler from an async closure `Fn(Delivery) -> impl Future<Output = HandlerResult>`.
///
/// ```
/// use warren_consumer::{handler_fn, Delivery, HandlerError};
/// let h = handler_fn(|d: Delivery| async move {
///     if d.body().is_empty() {
///         return Err(HandlerError::permanent("empty body"));
///     }
///     Ok(())
/// });
/// # let _ = h;
/// ```
///
/// The closure is called once per delivery, so it is `Fn`: what it shares
/// (a client, a pool, a [`warren_producer::Publisher`]) is cloned into each
/// future, not moved into it, which does not compile ("cannot move out of
/// `client`, a captured variable in an `Fn` closure"). And `?` needs a
/// [`HandlerError`]: there is no conversion from other errors, because only
/// you know whether a failure is worth retrying, so pick the kind with
/// `map_err`:
///
/// ```
/// use std::sync::Arc;
/// use warren_consumer::{handler_fn, Delivery, HandlerError};
/// let seen = Arc::new(std::sync::Mutex::new(Vec::<u64>::new())); // shared state
/// let h = handler_fn(move |d: Delivery| {
///     let seen = seen.clone(); // one clone per delivery
///     async move {
///         let text = std::str::from_utf8(d.body()).map_err(HandlerError::decode)?;
///         let id: u64 = text.trim().parse().map_err(HandlerError::permanent)?;
///         seen.lock().map_err(|_| HandlerError::retryable("poisoned"))?.push(id);
///         Ok(())
///     }
/// });
/// # let _ = h;
/// ```
pub fn handler_fn<F, Fut>(f: F) -> HandlerFn<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    HandlerFn { f }
}

impl<F, Fut> Handler for HandlerFn<F>
where
    F: Fn(Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn handle(&self, delivery: Delivery) -> impl Future<Output = HandlerResult> + Send {
        (self.f)(delivery)
    }
}

/// A typed JSON handler: see [`json_handler`].
pub struct JsonHandler<T, F> {
    f: F,
    _t: PhantomData<fn() -> T>,
}

impl<T, F> fmt::Debug for JsonHandler<T, F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JsonHandler<{}>", std::any::type_name::<T>())
    }
}

/// A handler that decodes the body as JSON into `T` first. A body that does
/// not decode is dead-lettered with kind `decode` in one attempt, never
/// retried; the closure is not called.
pub fn json_handler<T, F, Fut>(f: F) -> JsonHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    JsonHandler { f, _t: PhantomData }
}

impl<T, F, Fut> Handler for JsonHandler<T, F>
where
    T: DeserializeOwned + Send + 'static,
    F: Fn(T, Delivery) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = HandlerResult> + Send + 'static,
{
    fn handle(&self, delivery: Delivery) -> impl Future<Output = HandlerResult> + Send {
        let decoded = delivery.json::<T>();
        let fut = decoded.map(|value| (self.f)(value, delivery));
        async move {
            match fut {
                Ok(fut) => fut.await,
                Err(e) => Err(e),
            }
        }
    }
}

/// The object-safe form of [`Handler`], implemented for every handler.
pub trait DynHandler: Send + Sync + 'static {
    /// Handles one delivery (boxed future).
    fn handle_boxed(&self, delivery: Delivery) -> BoxFuture<'_, HandlerResult>;
}

impl<H: Handler> DynHandler for H {
    fn handle_boxed(&self, delivery: Delivery) -> BoxFuture<'_, HandlerResult> {
        Box::pin(self.handle(delivery))
    }
}

/// A type-erased handler, for choosing one at run time
/// (`--http` or `--exec`).
#[derive(Clone)]
pub struct BoxHandler(Arc<dyn DynHandler>);

impl BoxHandler {
    /// Boxes a handler.
    pub fn new(handler: impl Handler) -> Self {
        BoxHandler(Arc::new(handler))
    }
}

impl fmt::Debug for BoxHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("BoxHandler")
    }
}

impl Handler for BoxHandler {
    fn handle(&self, delivery: Delivery) -> impl Future<Output = HandlerResult> + Send {
        self.0.handle_boxed(delivery)
    }
}
