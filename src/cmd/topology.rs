//! `warren topology show|apply|verify`.

use std::process::ExitCode;

use serde_json::json;
use warren_topology::{ConnectOptions, ObjectState, Plan, Topology, TopologyError};

use crate::cli::{error_json, Global};

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

/// What `verify` cannot check: AMQP 0-9-1 reads neither back (only the
/// management API does, and warren does not require it).
const NOT_CHECKED: [&str; 2] = ["bindings", "policies"];

/// Runs `warren topology ...`. With `--output json` it prints one JSON
/// document in every outcome, failures included (`error` is `null` or says
/// what failed; see [`crate::cli::error_json`]); the exit code is the same
/// either way.
pub async fn run(g: &Global, cmd: TopologyCmd) -> anyhow::Result<ExitCode> {
    let mut report = match cmd {
        TopologyCmd::Show => json!({ "plan": null, "lints": [], "error": null }),
        TopologyCmd::Apply => json!({ "applied": [], "lints": [], "error": null }),
        TopologyCmd::Verify => json!({
            "matches": null, "checks": [], "not_checked": NOT_CHECKED, "lints": [], "error": null,
        }),
    };
    let result = run_cmd(g, cmd, &mut report).await;
    if g.json() {
        if let Err(e) = &result {
            // What a partial apply did stays on the broker: say so.
            if let Some(TopologyError::Incomplete { applied, .. }) = e.downcast_ref() {
                report["applied"] = json!(applied);
            }
            report["error"] = error_json(e);
        }
        outln!("{}", serde_json::to_string_pretty(&report)?);
    }
    result
}

/// The command itself: prints tables, and fills `report` for JSON.
async fn run_cmd(
    g: &Global,
    cmd: TopologyCmd,
    report: &mut serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let topology = g.topology()?;
    report["lints"] = json!(topology.lints());
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
            report["plan"] = json!(plan);
            if !g.json() {
                out!("{plan}");
                print_lints(&topology);
            }
            Ok(ExitCode::SUCCESS)
        }
        TopologyCmd::Apply => apply(g, &topology, &plan, report).await,
        TopologyCmd::Verify => verify(g, &topology, &plan, report).await,
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
    let opts = ConnectOptions::new(url, "topology").attempts(3);
    Ok(warren_topology::connect(&opts).await?)
}

async fn apply(
    g: &Global,
    t: &Topology,
    plan: &Plan,
    report: &mut serde_json::Value,
) -> anyhow::Result<ExitCode> {
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
    report["applied"] = json!(done);
    if !g.json() {
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

async fn verify(
    g: &Global,
    t: &Topology,
    plan: &Plan,
    json: &mut serde_json::Value,
) -> anyhow::Result<ExitCode> {
    let conn = connect(g).await?;
    let result = warren_topology::verify(&conn, plan).await;
    warren_topology::close(&conn, "done").await;
    let report = result?;
    let ok = report.matches();
    json["matches"] = json!(ok);
    json["checks"] = json!(report.checks);
    if !g.json() {
        for c in &report.checks {
            match &c.state {
                ObjectState::Matches => outln!("ok        {:<9} {}", c.kind, c.name),
                ObjectState::Missing => outln!("MISSING   {:<9} {}", c.kind, c.name),
                ObjectState::Differs(d) => outln!("DIFFERS   {:<9} {}: {d}", c.kind, c.name),
            }
        }
        outln!("not checked: bindings and policies, which AMQP 0-9-1 cannot read back (`rabbitmqctl list_bindings` and `rabbitmqctl list_policies` show them); `warren topology apply` declares the bindings again, and a policy that matches these queues (a max-length, message-ttl or expires) changes how they behave without changing their arguments");
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
