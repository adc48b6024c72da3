//! The ack window of one consuming channel: which deliveries are still being
//! handled, which are settled, and the fewest frames that tell the broker.
//!
//! Contiguous settled deliveries at the front of the window go out as one
//! `multiple=true` ack (or nack). When the front has been unfinished for a
//! while (a slow handler, or a copy whose confirm is held up) and most of the
//! window is done behind it, those are acked one by one so that the prefetch
//! window does not stay full of finished work.
//!
//! When to flush is the consume loop's choice: once a quarter of the prefetch
//! window (at most 64) is settled, or a millisecond after the first settled
//! delivery, when stragglers are due, and before shutting down.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// basic.ack.
    Ack,
    /// basic.nack with requeue.
    Requeue,
    /// basic.nack without requeue: the broker dead-letters it through the
    /// queue's own dead-letter exchange.
    Reject,
}

/// One frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct AckOp {
    pub settle: Settle,
    pub tag: u64,
    pub multiple: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pending,
    Done(Settle),
    /// Already told to the broker on its own.
    Sent,
}

/// When finished deliveries stuck behind an unfinished one are acked alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stragglers {
    /// At least this many are done behind it when it is the only unfinished
    /// one; with more unfinished, the done and the unfinished but the front
    /// together (a window held by several slow or held deliveries fills up
    /// with fewer done behind them)...
    pub threshold: usize,
    /// ...and it arrived at least this long ago.
    pub after: Duration,
}

/// The window of delivery tags of one channel, in arrival order.
#[derive(Debug)]
pub(crate) struct AckWindow {
    entries: VecDeque<(u64, Slot, Instant)>,
    done_behind: usize,
    /// Entries still being handled.
    pending: usize,
    stragglers: Stragglers,
}

impl AckWindow {
    pub fn new(stragglers: Stragglers) -> Self {
        AckWindow {
            entries: VecDeque::new(),
            done_behind: 0,
            pending: 0,
            stragglers: Stragglers {
                threshold: stragglers.threshold.max(1),
                after: stragglers.after,
            },
        }
    }

    /// A delivery arrived (tags only grow on a channel).
    pub fn received(&mut self, tag: u64, at: Instant) {
        self.entries.push_back((tag, Slot::Pending, at));
        self.pending += 1;
    }

    /// Deliveries not yet told to the broker.
    pub fn outstanding(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, s, _)| *s != Slot::Sent)
            .count()
    }

    /// Deliveries settled but not yet told to the broker.
    pub fn settled(&self) -> usize {
        self.done_behind
    }

    /// When the finished deliveries behind an unfinished one are to be acked
    /// alone: `None` while fewer than the threshold are done behind it.
    pub fn stragglers_due(&self) -> Option<Instant> {
        let others = self.pending.saturating_sub(1);
        if self.done_behind == 0 || self.done_behind + others < self.stragglers.threshold {
            return None;
        }
        let (_, _, at) = self.entries.iter().find(|(_, s, _)| *s == Slot::Pending)?;
        Some(*at + self.stragglers.after)
    }

    /// A delivery is settled. Unknown tags are ignored (returns false).
    pub fn complete(&mut self, tag: u64, settle: Settle) -> bool {
        let Ok(i) = self.entries.binary_search_by_key(&tag, |(t, _, _)| *t) else {
            return false;
        };
        match self.entries.get_mut(i) {
            Some((_, slot @ Slot::Pending, _)) => {
                *slot = Slot::Done(settle);
                self.done_behind += 1;
                self.pending -= 1;
                true
            }
            _ => false,
        }
    }

    /// The frames that settle what can be settled at `now`: the settled
    /// front of the window, and the stragglers if they are due.
    pub fn flush(&mut self, now: Instant, out: &mut Vec<AckOp>) {
        self.flush_front(out);
        if self.stragglers_due().is_some_and(|due| due <= now) {
            self.flush_stragglers(out);
        }
    }

    /// The frames that settle every settled delivery, stragglers included
    /// (shutting down: whatever is not acked is redelivered).
    pub fn flush_all(&mut self, out: &mut Vec<AckOp>) {
        self.flush_front(out);
        self.flush_stragglers(out);
    }

    fn flush_front(&mut self, out: &mut Vec<AckOp>) {
        let mut run: Option<(Settle, u64, usize)> = None;
        while let Some(&(tag, slot, _)) = self.entries.front() {
            match slot {
                Slot::Pending => break,
                Slot::Sent => {}
                Slot::Done(s) => {
                    self.done_behind -= 1;
                    run = match run {
                        Some((rs, _, n)) if rs == s => Some((s, tag, n + 1)),
                        Some((rs, last, n)) => {
                            out.push(AckOp {
                                settle: rs,
                                tag: last,
                                multiple: n > 1,
                            });
                            Some((s, tag, 1))
                        }
                        None => Some((s, tag, 1)),
                    };
                }
            }
            self.entries.pop_front();
        }
        if let Some((s, last, n)) = run {
            out.push(AckOp {
                settle: s,
                tag: last,
                multiple: n > 1,
            });
        }
    }

    fn flush_stragglers(&mut self, out: &mut Vec<AckOp>) {
        if self.done_behind == 0 {
            return;
        }
        for (tag, slot, _) in self.entries.iter_mut() {
            if let Slot::Done(s) = *slot {
                out.push(AckOp {
                    settle: s,
                    tag: *tag,
                    multiple: false,
                });
                *slot = Slot::Sent;
            }
        }
        self.done_behind = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_break_the_runs_of_acks() {
        let mut w = window(100);
        let now = Instant::now();
        for t in 1..=4 {
            w.received(t, now);
        }
        w.complete(1, Settle::Ack);
        w.complete(2, Settle::Reject);
        w.complete(3, Settle::Ack);
        w.complete(4, Settle::Ack);
        let op = |settle, tag, multiple| AckOp {
            settle,
            tag,
            multiple,
        };
        assert_eq!(
            flush(&mut w),
            vec![
                op(Settle::Ack, 1, false),
                op(Settle::Reject, 2, false),
                op(Settle::Ack, 4, true),
            ]
        );
    }

    fn flush(w: &mut AckWindow) -> Vec<AckOp> {
        flush_at(w, Instant::now())
    }

    fn flush_at(w: &mut AckWindow, now: Instant) -> Vec<AckOp> {
        let mut v = Vec::new();
        w.flush(now, &mut v);
        v
    }

    /// Stragglers acked as soon as `threshold` are done behind the front.
    fn window(threshold: usize) -> AckWindow {
        AckWindow::new(Stragglers {
            threshold,
            after: Duration::ZERO,
        })
    }

    fn receive(w: &mut AckWindow, tags: std::ops::RangeInclusive<u64>) {
        let now = Instant::now();
        for t in tags {
            w.received(t, now);
        }
    }

    fn ack(tag: u64, multiple: bool) -> AckOp {
        AckOp {
            settle: Settle::Ack,
            tag,
            multiple,
        }
    }

    #[test]
    fn contiguous_acks_become_one_multiple_ack() {
        let mut w = window(100);
        receive(&mut w, 1..=5);
        for t in [3, 1, 2] {
            assert!(w.complete(t, Settle::Ack));
        }
        assert_eq!(flush(&mut w), [ack(3, true)]);
        assert!(w.complete(5, Settle::Ack));
        assert_eq!(flush(&mut w), []);
        assert!(w.complete(4, Settle::Ack));
        assert_eq!(flush(&mut w), [ack(5, true)]);
        assert_eq!(w.outstanding(), 0);
    }

    #[test]
    fn a_requeue_splits_the_run() {
        let mut w = window(100);
        receive(&mut w, 1..=4);
        w.complete(1, Settle::Ack);
        w.complete(2, Settle::Requeue);
        w.complete(3, Settle::Ack);
        assert_eq!(
            flush(&mut w),
            [
                ack(1, false),
                AckOp {
                    settle: Settle::Requeue,
                    tag: 2,
                    multiple: false
                },
                ack(3, false)
            ]
        );
        assert_eq!(w.outstanding(), 1);
    }

    #[test]
    fn stragglers_behind_a_slow_handler_are_acked_alone_and_once() {
        let mut w = window(3);
        receive(&mut w, 1..=3);
        w.complete(2, Settle::Ack);
        assert_eq!(flush(&mut w), []);
        receive(&mut w, 4..=4);
        w.complete(4, Settle::Ack);
        assert_eq!(flush(&mut w), [ack(2, false), ack(4, false)]);
        assert!(!w.complete(2, Settle::Ack), "settled once only");
        w.complete(1, Settle::Ack);
        // 1 goes alone; 2 was sent; 3 is pending.
        assert_eq!(flush(&mut w), [ack(1, false)]);
        w.complete(3, Settle::Ack);
        assert_eq!(flush(&mut w), [ack(3, false)]);
        assert_eq!(w.outstanding(), 0);
    }

    /// Several unfinished deliveries (slow handlers, copies held) leave
    /// room for fewer done behind them: the window full but an eighth is
    /// what counts, or a window of 8 with 2 held would wait for them with
    /// 6 done behind, below a threshold of 7 it could never reach.
    #[test]
    fn stragglers_behind_several_unfinished_are_due_when_the_window_fills() {
        let mut w = window(7);
        receive(&mut w, 1..=7);
        for t in 3..=7 {
            w.complete(t, Settle::Ack);
        }
        assert_eq!(w.stragglers_due(), None, "5 done, 2 unfinished: 7 of 8");
        receive(&mut w, 8..=8);
        w.complete(8, Settle::Ack);
        assert!(w.stragglers_due().is_some(), "6 done, 2 unfinished: 8 of 8");
        assert_eq!(
            flush(&mut w),
            (3..=8).map(|t| ack(t, false)).collect::<Vec<_>>()
        );
        assert_eq!(w.outstanding(), 2);
    }

    #[test]
    fn unknown_tags_are_ignored() {
        let mut w = window(4);
        receive(&mut w, 7..=7);
        assert!(!w.complete(3, Settle::Ack));
        assert_eq!(flush(&mut w), []);
    }

    #[test]
    fn stragglers_wait_until_the_front_has_been_unfinished_for_a_while() {
        let t0 = Instant::now();
        let after = Duration::from_millis(100);
        let mut w = AckWindow::new(Stragglers {
            threshold: 2,
            after,
        });
        w.received(1, t0);
        w.received(2, t0 + Duration::from_millis(5));
        w.complete(2, Settle::Ack);
        assert_eq!(
            w.stragglers_due(),
            None,
            "one done behind: below the threshold"
        );
        w.received(3, t0 + Duration::from_millis(5));
        w.complete(3, Settle::Ack);
        assert_eq!(
            w.stragglers_due(),
            Some(t0 + after),
            "due when the front is 100 ms old"
        );
        assert_eq!(flush_at(&mut w, t0 + Duration::from_millis(99)), []);
        // The front finishes in time: one multiple ack, no single acks.
        w.complete(1, Settle::Ack);
        assert_eq!(
            flush_at(&mut w, t0 + Duration::from_millis(99)),
            [ack(3, true)]
        );

        // Again, but the front stays unfinished past the delay.
        receive(&mut w, 4..=6);
        let t1 = Instant::now();
        w.complete(5, Settle::Ack);
        w.complete(6, Settle::Ack);
        assert!(w.stragglers_due().is_some_and(|due| due <= t1 + after));
        assert_eq!(flush_at(&mut w, t1 + after), [ack(5, false), ack(6, false)]);
        assert_eq!(w.stragglers_due(), None);
        assert_eq!(w.outstanding(), 1);
    }

    #[test]
    fn flush_all_acks_every_settled_delivery_at_once() {
        let mut w = AckWindow::new(Stragglers {
            threshold: 100,
            after: Duration::from_secs(3600),
        });
        receive(&mut w, 1..=4);
        w.complete(2, Settle::Ack);
        w.complete(3, Settle::Requeue);
        assert_eq!(flush(&mut w), []);
        let mut v = Vec::new();
        w.flush_all(&mut v);
        assert_eq!(
            v,
            [
                ack(2, false),
                AckOp {
                    settle: Settle::Requeue,
                    tag: 3,
                    multiple: false
                }
            ]
        );
        assert_eq!(w.outstanding(), 2, "1 and 4 are unfinished");
        w.complete(1, Settle::Ack);
        assert_eq!(flush(&mut w), [ack(1, false)]);
    }
}
