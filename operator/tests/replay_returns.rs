//! `replay --to-original` where some original routing keys have no binding
//! any more: with a window of publishes in flight, lapin can hand one copy's
//! `basic.return` to another copy's confirm. Every dead letter whose copy was
//! returned must stay in the dead-letter queue; every routed one must leave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::BTreeSet;

use support::*;
use tokio_util::sync::CancellationToken;
use warren_operator as op;
use warren_topology::{dead_queue, DEAD_LETTER_EXCHANGE};

const N: usize = 150;

#[tokio::test]
async fn a_returned_replay_copy_never_removes_its_dead_letter() {
    let env = setup().await;
    let mut unroutable = BTreeSet::new();
    for i in 0..2 * N {
        let id = format!("m{i:03}");
        // Interleaved: "order.paid" is bound (billing), "order.gone" is not.
        let rk = if i % 2 == 0 {
            "order.paid"
        } else {
            "order.gone"
        };
        if i % 2 == 1 {
            unroutable.insert(id.clone());
        }
        let p = props(
            &id,
            warren_headers(&env.billing, "permanent", "boom", rk, &env.orders),
        );
        publish(&env.conn, DEAD_LETTER_EXCHANGE, &env.billing, b"{}", p).await;
    }
    let opts = op::ReplayOptions {
        target: op::Target::Original,
        read: op::ReadOptions::default().idle_timeout(std::time::Duration::from_secs(3)),
        ..Default::default()
    };
    let r = op::replay(
        &env.conn,
        &env.billing,
        &op::Selection {
            all: true,
            ..Default::default()
        },
        &opts,
        &op::Metrics::unregistered(),
        &|_| {},
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(r.replayed, N, "the routed copies");
    assert_eq!(r.failed, N, "the returned copies");
    wait_count(&env.conn, &env.billing, N as u32).await;
    let left: BTreeSet<String> = drain(&env.conn, &dead_queue(&env.billing))
        .await
        .into_iter()
        .map(|(_, p)| p.message_id().as_ref().unwrap().to_string())
        .collect();
    assert_eq!(
        left, unroutable,
        "exactly the dead letters whose copy was returned stay"
    );
}
