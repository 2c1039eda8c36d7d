//! What both agents did while a scenario ran: the heap allocations they made (the bench's
//! agents count them, `/allocations` on the admin API) and, when asked, their CPU samples
//! (`cpu.rs`). The allocations are reported per unit of the scenario's work (a request, a
//! connection, a MiB), per agent: node1 runs the client's side, node2 the server's.

use std::path::Path;

use anyhow::Context;
use nodemesh_testbed::Testbed;

use super::{cpu::CpuProfile, stats::Samples};

const NODES: [&str; 2] = ["node1", "node2"];

/// How the agents are watched during a scenario: their allocations are counted always; with
/// a directory, their CPU is sampled too, into profiles named after the scenario and run.
#[derive(Clone, Copy)]
pub(super) struct Watch<'a> {
    pub(super) profiles: Option<(&'a Path, usize)>,
}

impl Watch<'_> {
    pub(super) fn counting() -> Self {
        Self { profiles: None }
    }

    /// Runs a scenario, `(name, meshed)`, under watch and records the agents' allocations
    /// per unit into `allocations`, `(unit, units)` of work being done by `run`. Agents
    /// carry no direct path, so one is counted (the control) but not profiled.
    pub(super) fn measure<T>(
        self,
        tb: &Testbed,
        allocations: &mut AllocationRuns,
        (scenario, meshed): (&str, bool),
        (unit, units): (&'static str, f64),
        run: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let name = self
            .profiles
            .filter(|_| meshed)
            .map(|(dir, run)| (dir, format!("{}-run{}", slug(scenario), run + 1)));
        let observation =
            Observation::start(tb, name.as_ref().map(|(dir, name)| (*dir, name.as_str())))?;
        let value = run()?;
        allocations.record(scenario, unit, observation.finish(tb, units)?);
        Ok(value)
    }
}

/// `scenario` as a file name: lower case, words joined by dashes.
fn slug(scenario: &str) -> String {
    scenario
        .to_lowercase()
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|word| !word.is_empty())
        .collect::<Vec<_>>()
        .join("-")
}

/// A scenario being watched.
struct Observation {
    allocations: [u64; 2],
    profiles: Vec<CpuProfile>,
}

impl Observation {
    /// Starts watching; with `profile` (a directory and a name), both agents are sampled
    /// too, into `<name>-node1` and `<name>-node2`.
    fn start(tb: &Testbed, profile: Option<(&Path, &str)>) -> anyhow::Result<Self> {
        // Counted first and sampled after, so that the admin requests are not in the profile.
        let allocations = allocations(tb)?;
        let mut profiles = Vec::new();
        if let Some((dir, name)) = profile {
            for node in NODES {
                let pid = tb.agent_pid(node).context("agent pid")?;
                profiles.push(CpuProfile::start(pid, dir, &format!("{name}-{node}"))?);
            }
        }
        Ok(Self {
            allocations,
            profiles,
        })
    }

    /// Stops watching; returns each agent's allocations per unit, `units` units of work
    /// having been done.
    fn finish(mut self, tb: &Testbed, units: f64) -> anyhow::Result<[f64; 2]> {
        for profile in &mut self.profiles {
            profile.stop()?;
        }
        let after = allocations(tb)?;
        for profile in self.profiles {
            eprintln!("cpu profile: {}", profile.finish()?.display());
        }
        Ok([0, 1].map(|i| after[i].saturating_sub(self.allocations[i]) as f64 / units))
    }
}

/// Both agents' allocations so far.
fn allocations(tb: &Testbed) -> anyhow::Result<[u64; 2]> {
    let mut counts = [0; 2];
    for (count, node) in counts.iter_mut().zip(NODES) {
        *count = tb.admin_json(node, "/allocations")?["allocations"]
            .as_u64()
            .context("allocations")?;
    }
    Ok(counts)
}

/// Every run's allocations per unit, by scenario, in the order first recorded.
#[derive(Default)]
pub(super) struct AllocationRuns(Vec<(String, &'static str, Vec<[f64; 2]>)>);

impl AllocationRuns {
    pub(super) fn record(&mut self, scenario: &str, unit: &'static str, per_unit: [f64; 2]) {
        match self.0.iter_mut().find(|(name, _, _)| name == scenario) {
            Some((_, _, runs)) => runs.push(per_unit),
            None => self.0.push((scenario.to_owned(), unit, vec![per_unit])),
        }
    }

    /// The report's section.
    pub(super) fn section(&self, out: &mut String) {
        if self.0.is_empty() {
            return;
        }
        out.push_str(
            "\n### Heap allocations by the agents, per unit of work\n\n\
             Counted by the agents themselves (the bench builds them with the feature \
             `count-allocations`: every allocation and reallocation), read from each agent's \
             `/allocations` before and after the scenario. node1's agent runs the client's \
             side (outbound, and both sides on the same node), node2's the server's. A \
             direct path, which no agent carries, shows what the agents allocate on their own \
             meanwhile.\n\n\
             | scenario | per | node1 agent | node2 agent |\n|---|---|---:|---:|\n",
        );
        for (scenario, unit, runs) in &self.0 {
            let [node1, node2] = [0, 1].map(|i| Samples(runs.iter().map(|r| r[i]).collect()));
            out.push_str(&format!(
                "| {scenario} | {unit} | {} | {} |\n",
                node1.cell(1),
                node2.cell(1)
            ));
        }
    }
}
