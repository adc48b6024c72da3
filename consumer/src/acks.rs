//! The ack window of one consuming channel: which deliveries are still being
//! handled, which are settled, and the fewest frames that tell the broker.
//!
//! Contiguous settled deliveries at the front of the window go out as one
//! `multiple=true` ack (or nack). When a slow handler holds the front while
//! many later deliveries are done, those are acked one by one so that the
//! prefetch window does not fill up with finished work.
//!
//! When to flush is the consume loop's choice: once a quarter of the prefetch
//! window (at most 64) is settled, or a millisecond after the first settled
//! delivery, and before shutting down.

use std::collections::VecDeque;

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// basic.ack.
    Ack,
    /// basic.nack with requeue.
    Requeue,
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

/// The window of delivery tags of one channel, in arrival order.
#[derive(Debug)]
pub(crate) struct AckWindow {
    entries: VecDeque<(u64, Slot)>,
    done_behind: usize,
    straggler_threshold: usize,
}

impl AckWindow {
    /// A window that acks individually once `straggler_threshold` deliveries
    /// are done behind an unfinished one.
    pub fn new(straggler_threshold: usize) -> Self {
        AckWindow {
            entries: VecDeque::new(),
            done_behind: 0,
            straggler_threshold: straggler_threshold.max(1),
        }
    }

    /// A delivery arrived (tags only grow on a channel).
    pub fn received(&mut self, tag: u64) {
        self.entries.push_back((tag, Slot::Pending));
    }

    /// Deliveries not yet told to the broker.
    pub fn outstanding(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, s)| *s != Slot::Sent)
            .count()
    }

    /// Deliveries settled but not yet told to the broker.
    pub fn settled(&self) -> usize {
        self.done_behind
    }

    /// A delivery is settled. Unknown tags are ignored (returns false).
    pub fn complete(&mut self, tag: u64, settle: Settle) -> bool {
        let Ok(i) = self.entries.binary_search_by_key(&tag, |(t, _)| *t) else {
            return false;
        };
        match self.entries.get_mut(i) {
            Some((_, slot @ Slot::Pending)) => {
                *slot = Slot::Done(settle);
                self.done_behind += 1;
                true
            }
            _ => false,
        }
    }

    /// The frames that settle everything that can be settled now.
    pub fn flush(&mut self, out: &mut Vec<AckOp>) {
        let mut run: Option<(Settle, u64, usize)> = None;
        while let Some(&(tag, slot)) = self.entries.front() {
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
        if self.done_behind >= self.straggler_threshold {
            for (tag, slot) in self.entries.iter_mut() {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flush(w: &mut AckWindow) -> Vec<AckOp> {
        let mut v = Vec::new();
        w.flush(&mut v);
        v
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
        let mut w = AckWindow::new(100);
        for t in 1..=5 {
            w.received(t);
        }
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
        let mut w = AckWindow::new(100);
        for t in 1..=4 {
            w.received(t);
        }
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
        let mut w = AckWindow::new(2);
        for t in 1..=4 {
            w.received(t);
        }
        w.complete(2, Settle::Ack);
        assert_eq!(flush(&mut w), []);
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

    #[test]
    fn unknown_tags_are_ignored() {
        let mut w = AckWindow::new(4);
        w.received(7);
        assert!(!w.complete(3, Settle::Ack));
        assert_eq!(flush(&mut w), []);
    }
}
