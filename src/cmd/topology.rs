//! `warren topology show|apply|verify`.

use std::process::ExitCode;

use serde_json::json;
use warren_topology::{ConnectOptions, ObjectState, Plan, Topology, TopologyError};

use crate::cli::Global;

/// What to do with the topology file.
#[derive(Debug, clap::Subcommand)]
pub enum TopologyCmd {
    /// Print the plan: every exchange, queue (with its arguments) and binding.
    Show,
    /// Declare the plan on the broker (idempotent; never deletes anything).
    Apply,
    /// Check the broker against the plan: exit 0 when it matches, 1 otherwise.
    Verify,
}

/// Runs `warren topology ...`.
pub async fn run(g: &Global, cmd: TopologyCmd) -> anyhow::Result<ExitCode> {
    let topology = g.topology()?;
    if topology.exchanges.is_empty() && topology.groups.is_empty() {
        // Valid, but almost always the wrong file.
        eprintln!(
            "warning: {} declares no [[exchange]] and no [[group]]: there is nothing to show, apply or verify (pass another file with -f or WARREN_TOPOLOGY)",
            g.topology.display()
        );
    }
    let plan = Plan::new(&topology);
    match cmd {
        TopologyCmd::Show => {
            if g.json() {
                outln!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({ "plan": plan, "lints": topology.lints() })
                    )?
                );
            } else {
                out!("{plan}");
                print_lints(&topology);
            }
            Ok(ExitCode::SUCCESS)
        }
        TopologyCmd::Apply => apply(g, &topology, &plan).await,
        TopologyCmd::Verify => verify(g, &topology, &plan).await,
    }
}

fn print_lints(t: &Topology) {
    let lints = t.lints();
    if !lints.is_empty() {
        outln!("WARNINGS");
        for l in lints {
            outln!("  {l}");
        }
    }
}

async fn connect(g: &Global) -> anyhow::Result<warren_topology::lapin::Connection> {
    let url = g.url()?;
    let opts = ConnectOptions::new(url, "cli").attempts(3);
    Ok(warren_topology::connect(&opts).await?)
}

async fn apply(g: &Global, t: &Topology, plan: &Plan) -> anyhow::Result<ExitCode> {
    let conn = connect(g).await?;
    let result = warren_topology::apply(&conn, plan).await;
    warren_topology::close(&conn, "done").await;
    let done = match result {
        Ok(done) => done,
        Err(e @ TopologyError::Incomplete { .. }) => return Err(anyhow::Error::new(e).context(
            "topology apply stopped partway (`warren topology verify` shows what the broker has)",
        )),
        Err(e) => {
            return Err(
                anyhow::Error::new(e).context("topology apply stopped; nothing was declared")
            )
        }
    };
    if g.json() {
        outln!(
            "{}",
            serde_json::to_string_pretty(&json!({ "applied": done, "lints": t.lints() }))?
        );
    } else {
        for a in &done {
            let action = match a.action {
                warren_topology::Action::Created => "created",
                warren_topology::Action::Unchanged => "unchanged",
                warren_topology::Action::Bound => "bound",
            };
            outln!("{action:<10} {:<9} {}", a.kind, a.name);
        }
        let created = done
            .iter()
            .filter(|a| a.action == warren_topology::Action::Created)
            .count();
        outln!(
            "applied {}: {created} created, {} already there",
            g.topology.display(),
            done.iter()
                .filter(|a| a.action == warren_topology::Action::Unchanged)
                .count()
        );
        print_lints(t);
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(g: &Global, t: &Topology, plan: &Plan) -> anyhow::Result<ExitCode> {
    let conn = connect(g).await?;
    let result = warren_topology::verify(&conn, plan).await;
    warren_topology::close(&conn, "done").await;
    let report = result?;
    let ok = report.matches();
    if g.json() {
        outln!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "matches": ok, "checks": report.checks, "lints": t.lints() })
            )?
        );
    } else {
        for c in &report.checks {
            match &c.state {
                ObjectState::Matches => outln!("ok        {:<9} {}", c.kind, c.name),
                ObjectState::Missing => outln!("MISSING   {:<9} {}", c.kind, c.name),
                ObjectState::Differs(d) => outln!("DIFFERS   {:<9} {}: {d}", c.kind, c.name),
            }
        }
        outln!("bindings are declared by `apply` (idempotent); AMQP cannot list them, so verify does not check them");
        print_lints(t);
        if ok {
            outln!("the broker matches {}", g.topology.display());
        } else {
            let missing = report
                .checks
                .iter()
                .filter(|c| c.state == ObjectState::Missing)
                .count();
            let differ = report.differing().count();
            outln!("the broker does not match {}: {missing} missing, {differ} different (`warren topology apply` creates what is missing; it never changes what differs)", g.topology.display());
        }
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
