//! What both agents and the whole machine did while a scenario ran: the heap allocations
//! the agents made (the bench's agents count them, `/allocations` on the admin API), the CPU
//! time they and the machine spent (`/proc/<pid>/stat`, `/proc/stat`) and, when asked, the
//! agents' CPU samples (`cpu.rs`). Everything is reported per unit of the scenario's work
//! (a request, a connection, a MiB); allocations per agent: node1 runs the client's side,
//! node2 the server's.

use std::{path::Path, time::Instant};

use anyhow::Context;
use nodemesh_testbed::Testbed;

use super::{cpu::CpuProfile, probes::cpu_seconds_by_agent, stats::Samples};

const NODES: [&str; 2] = ["node1", "node2"];

/// How the agents are watched during a scenario: their allocations, their CPU time and the
/// machine's are measured always; with a directory, perf samples the agents too, into
/// profiles named after the scenario and run (the CPU times then include perf's overhead,
/// and the report says so).
#[derive(Clone, Copy)]
pub(super) struct Watch<'a> {
    pub(super) profiles: Option<(&'a Path, usize)>,
}

impl Watch<'_> {
    pub(super) fn counting() -> Self {
        Self { profiles: None }
    }

    /// Runs a scenario, `(name, meshed)`, under watch and records what the agents and the
    /// machine used per unit into `usage`, `(unit, units)` of work being done by `run`.
    /// Agents carry no direct path, so one is counted (the control) but not profiled.
    pub(super) fn measure<T>(
        self,
        tb: &Testbed,
        usage: &mut UsageRuns,
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
        usage.record(scenario, unit, observation.finish(tb, units)?);
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
    agents_cpu: [f64; 2],
    machine: MachineCpu,
    started: Instant,
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
            agents_cpu: cpu_seconds_by_agent(tb)?,
            machine: MachineCpu::now()?,
            started: Instant::now(),
        })
    }

    /// Stops watching; returns what was used per unit, `units` units of work having been
    /// done.
    fn finish(mut self, tb: &Testbed, units: f64) -> anyhow::Result<Usage> {
        let wall = self.started.elapsed().as_secs_f64();
        let machine = MachineCpu::now()?.since(&self.machine);
        let agents_cpu = cpu_seconds_by_agent(tb)?;
        let under_perf = !self.profiles.is_empty();
        for profile in &mut self.profiles {
            profile.stop()?;
        }
        let after = allocations(tb)?;
        for profile in self.profiles {
            eprintln!("cpu profile: {}", profile.finish()?.display());
        }
        Ok(Usage {
            allocations: [0, 1]
                .map(|i| after[i].saturating_sub(self.allocations[i]) as f64 / units),
            machine_busy: machine.busy_seconds / (wall * machine.cpus),
            machine_us_per_unit: machine.busy_seconds * 1e6 / units,
            agent_us_per_unit: [0, 1].map(|i| (agents_cpu[i] - self.agents_cpu[i]) * 1e6 / units),
            under_perf,
        })
    }
}

/// What one scenario used: per unit of work, and how busy the machine was.
#[derive(Clone, Copy)]
pub(super) struct Usage {
    /// Each agent's heap allocations per unit.
    allocations: [f64; 2],
    /// The share of all CPUs' time that was busy (user, system, interrupts) while the
    /// scenario ran, its client's start included.
    machine_busy: f64,
    /// CPU time of the whole machine (clients, servers, agents, the kernel) per unit, µs.
    machine_us_per_unit: f64,
    /// CPU time of node1's and node2's agents per unit, µs.
    agent_us_per_unit: [f64; 2],
    /// Whether perf sampled the agents meanwhile (its overhead is in the CPU times).
    under_perf: bool,
}

/// The machine's busy CPU time so far, from `/proc/stat`'s first line (all CPUs, in clock
/// ticks of 1/100 s). The kernel counts it by sampling at each timer tick, where a
/// process's own time (`/proc/<pid>/stat`) is scaled to its measured run time: the two are
/// not subtracted from each other.
struct MachineCpu {
    busy_seconds: f64,
    cpus: f64,
}

impl MachineCpu {
    fn now() -> anyhow::Result<Self> {
        Self::parse(&std::fs::read_to_string("/proc/stat")?)
    }

    /// From the text of `/proc/stat`.
    fn parse(stat: &str) -> anyhow::Result<Self> {
        let ticks: Vec<f64> = stat
            .lines()
            .next()
            .and_then(|line| line.strip_prefix("cpu "))
            .context("no cpu line in /proc/stat")?
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()?;
        // user nice system idle iowait irq softirq steal ...: the busy ones are user (guest
        // time is inside it), nice, system, irq and softirq; steal is time the hypervisor
        // gave to someone else.
        let busy: f64 = [0, 1, 2, 5, 6]
            .iter()
            .map(|&i| ticks.get(i).copied().unwrap_or(0.0))
            .sum();
        let cpus = stat
            .lines()
            .filter(|line| line.starts_with("cpu") && !line.starts_with("cpu "))
            .count();
        Ok(Self {
            busy_seconds: busy / 100.0,
            cpus: cpus.max(1) as f64,
        })
    }

    fn since(&self, earlier: &Self) -> Self {
        Self {
            busy_seconds: self.busy_seconds - earlier.busy_seconds,
            cpus: self.cpus,
        }
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

/// Every run's usage, by scenario, in the order first recorded.
#[derive(Default)]
pub(super) struct UsageRuns(Vec<(String, &'static str, Vec<Usage>)>);

impl UsageRuns {
    pub(super) fn record(&mut self, scenario: &str, unit: &'static str, usage: Usage) {
        match self.0.iter_mut().find(|(name, _, _)| name == scenario) {
            Some((_, _, runs)) => runs.push(usage),
            None => self.0.push((scenario.to_owned(), unit, vec![usage])),
        }
    }

    /// The report's sections: allocations, then CPU.
    pub(super) fn sections(&self, out: &mut String) {
        self.allocations_section(out);
        self.cpu_section(out);
    }

    fn allocations_section(&self, out: &mut String) {
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
            let [node1, node2] =
                [0, 1].map(|i| Samples(runs.iter().map(|r| r.allocations[i]).collect()));
            out.push_str(&format!(
                "| {scenario} | {unit} | {} | {} |\n",
                node1.cell(1),
                node2.cell(1)
            ));
        }
    }

    fn cpu_section(&self, out: &mut String) {
        if self.0.is_empty() {
            return;
        }
        out.push_str(
            "\n### CPU per unit of work: the whole machine and the agents\n\n\
             Busy CPU time of the whole machine (`/proc/stat`: every process and the kernel, \
             interrupts included, counted at the timer's ticks) and of each agent \
             (`/proc/<pid>/stat`) while the scenario ran, divided by its units of work (a MiB \
             echoed, a request, a connection); \"busy\" is the machine's busy time over the \
             wall time of all its CPUs, the client's start included. Every process of a \
             scenario shares this machine's CPUs: a path's rate can be no more than the \
             number of CPUs divided by the machine's CPU per unit, and where a scenario \
             leaves them partly idle (one exchange at a time, one connection's pipeline), \
             the work along its chain sets the rate instead.\n\n\
             | scenario | per | machine busy | machine CPU µs | node1's agent µs | node2's agent µs |\n\
             |---|---|---:|---:|---:|---:|\n",
        );
        for (scenario, unit, runs) in &self.0 {
            let of = |field: fn(&Usage) -> f64| Samples(runs.iter().map(field).collect());
            let perf = if runs.iter().any(|usage| usage.under_perf) {
                " (under perf: its overhead included)"
            } else {
                ""
            };
            out.push_str(&format!(
                "| {scenario}{perf} | {unit} | {} % | {} | {} | {} |\n",
                of(|u| u.machine_busy * 100.0).cell(0),
                of(|u| u.machine_us_per_unit).cell(1),
                of(|u| u.agent_us_per_unit[0]).cell(1),
                of(|u| u.agent_us_per_unit[1]).cell(1),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::MachineCpu;

    #[test]
    fn the_machines_busy_time_leaves_out_idle_iowait_and_steal() {
        let stat = "cpu  100 5 50 1000 7 3 2 1 40 0\n\
                    cpu0 50 2 25 500 3 1 1 0 20 0\n\
                    cpu1 50 3 25 500 4 2 1 1 20 0\n\
                    intr 12345\n";
        let cpu = MachineCpu::parse(stat).expect("parsed");
        // user + nice + system + irq + softirq, in 1/100 s; guest is inside user.
        assert!(
            (cpu.busy_seconds - 1.60).abs() < 1e-9,
            "{}",
            cpu.busy_seconds
        );
        assert_eq!(cpu.cpus, 2.0);
        assert!(MachineCpu::parse("intr 1\n").is_err());
    }
}
