//! `nodemesh top`: a live view of the HTTP traffic this node's pods send, from the agent's
//! `/metrics` (or, `cli/cluster/top.rs`, every agent's), refreshed every second: for each source workload → destination Service,
//! requests per second, success rate (non-5xx) and p50/p99 latency over the last second.
//! Latencies are estimated from the histogram buckets (Istio's), interpolated within a
//! bucket. `q`, Esc or Ctrl-C quits.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use crossterm::event::{self, Event, KeyCode, KeyModifiers};
use ratatui::{
    layout::Constraint,
    style::{Modifier, Style},
    widgets::{Block, Row as TableRow, Table},
};

use super::{admin_client::AdminClient, prometheus};

/// (source `namespace/workload`, destination Service).
type Key = (String, String);

/// Cumulative counts for one source → destination pair.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Totals {
    requests: f64,
    server_errors: f64,
    /// (upper bound ms, cumulative count), ascending; the last is +Inf.
    buckets: Vec<(f64, f64)>,
}

/// One line of the view.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub source: String,
    pub destination: String,
    pub rps: f64,
    pub success: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The source-reported request totals in a `/metrics` text.
pub fn totals(metrics: &str) -> BTreeMap<Key, Totals> {
    let mut totals: BTreeMap<Key, Totals> = BTreeMap::new();
    for sample in prometheus::parse(metrics) {
        if sample.labels.get("reporter").map(String::as_str) != Some("source") {
            continue;
        }
        let key = (
            format!(
                "{}/{}",
                sample
                    .labels
                    .get("source_workload_namespace")
                    .map_or("?", String::as_str),
                sample
                    .labels
                    .get("source_workload")
                    .map_or("?", String::as_str)
            ),
            sample
                .labels
                .get("destination_service")
                .cloned()
                .unwrap_or_default(),
        );
        let entry = totals.entry(key).or_default();
        match sample.name.as_str() {
            "istio_requests_total" => {
                entry.requests += sample.value;
                if sample
                    .labels
                    .get("response_code")
                    .is_some_and(|code| code.starts_with('5'))
                {
                    entry.server_errors += sample.value;
                }
            }
            "istio_request_duration_milliseconds_bucket" => {
                let le = match sample.labels.get("le").map(String::as_str) {
                    Some("+Inf") => f64::INFINITY,
                    Some(le) => le.parse().unwrap_or(f64::INFINITY),
                    None => continue,
                };
                match entry.buckets.iter_mut().find(|(bound, _)| *bound == le) {
                    Some((_, count)) => *count += sample.value,
                    None => entry.buckets.push((le, sample.value)),
                }
                entry.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            }
            _ => {}
        }
    }
    totals
}

/// The rows for what happened between two scrapes `elapsed` apart.
pub fn rows(
    before: &BTreeMap<Key, Totals>,
    after: &BTreeMap<Key, Totals>,
    elapsed: Duration,
) -> Vec<Row> {
    let seconds = elapsed.as_secs_f64().max(1e-3);
    after
        .iter()
        .map(|((source, destination), now)| {
            let then = before
                .get(&(source.clone(), destination.clone()))
                .cloned()
                .unwrap_or_default();
            let requests = (now.requests - then.requests).max(0.0);
            let errors = (now.server_errors - then.server_errors).max(0.0);
            let buckets: Vec<(f64, f64)> = now
                .buckets
                .iter()
                .map(|(le, count)| {
                    let old = then
                        .buckets
                        .iter()
                        .find(|(bound, _)| bound == le)
                        .map_or(0.0, |(_, c)| *c);
                    (*le, (count - old).max(0.0))
                })
                .collect();
            Row {
                source: source.clone(),
                destination: destination.clone(),
                rps: requests / seconds,
                success: if requests > 0.0 {
                    1.0 - errors / requests
                } else {
                    1.0
                },
                p50_ms: quantile(&buckets, 0.5),
                p99_ms: quantile(&buckets, 0.99),
            }
        })
        .filter(|row| row.rps > 0.0)
        .collect()
}

/// The `q` quantile from cumulative buckets, interpolated linearly within its bucket.
fn quantile(buckets: &[(f64, f64)], q: f64) -> f64 {
    let Some(&(_, total)) = buckets.last() else {
        return 0.0;
    };
    if total <= 0.0 {
        return 0.0;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return lower.0;
            }
            let within = (count - lower.1).max(1e-9);
            return lower.0 + (le - lower.0) * ((rank - lower.1) / within);
        }
        lower = (le, count);
    }
    lower.0
}

/// Where the view gets its `/metrics` text from: this node's agent, or (`cli/cluster/top.rs`)
/// every agent of the cluster, or Prometheus.
pub trait Scrape {
    /// The samples as of now, in the text format (several agents' texts may follow each
    /// other: totals add up).
    fn scrape(&mut self) -> anyhow::Result<String>;
    /// What is scraped, for the title.
    fn describe(&self) -> String;
}

/// The agent on this node.
struct LocalAgent(AdminClient);

impl Scrape for LocalAgent {
    fn scrape(&mut self) -> anyhow::Result<String> {
        Ok(self.0.get_ok("/metrics")?)
    }

    fn describe(&self) -> String {
        self.0.addr().to_string()
    }
}

/// Runs the live view of this node's agent until the user quits.
pub fn run(admin: SocketAddr) -> anyhow::Result<()> {
    run_with(
        &mut LocalAgent(AdminClient::new(admin)?),
        Duration::from_secs(1),
    )
}

/// Runs the live view of `source`, scraped every `every`, until the user quits.
pub fn run_with(source: &mut dyn Scrape, every: Duration) -> anyhow::Result<()> {
    // Fail before taking over the terminal if the source is not there.
    let first = source.scrape()?;
    let mut terminal = ratatui::init();
    let result = view(&mut terminal, source, first, every);
    ratatui::restore();
    result
}

fn view(
    terminal: &mut ratatui::DefaultTerminal,
    source: &mut dyn Scrape,
    first: String,
    every: Duration,
) -> anyhow::Result<()> {
    let what = source.describe();
    let mut before = totals(&first);
    let mut taken = Instant::now();
    let mut current: Vec<Row> = Vec::new();
    let mut status = format!("nodemesh top — {what} — waiting for the first interval");
    loop {
        terminal.draw(|frame| {
            let header = TableRow::new([
                "SOURCE",
                "DESTINATION",
                "REQ/S",
                "SUCCESS",
                "P50 MS",
                "P99 MS",
            ])
            .style(Style::default().add_modifier(Modifier::BOLD));
            let body = current.iter().map(|row| {
                TableRow::new([
                    row.source.clone(),
                    row.destination.clone(),
                    format!("{:.1}", row.rps),
                    format!("{:.1}%", row.success * 100.0),
                    format!("{:.2}", row.p50_ms),
                    format!("{:.2}", row.p99_ms),
                ])
            });
            let table = Table::new(
                body,
                [
                    Constraint::Percentage(28),
                    Constraint::Percentage(36),
                    Constraint::Percentage(9),
                    Constraint::Percentage(9),
                    Constraint::Percentage(9),
                    Constraint::Percentage(9),
                ],
            )
            .header(header)
            .block(Block::bordered().title(status.as_str()));
            frame.render_widget(table, frame.area());
        })?;
        let deadline = taken + every;
        while let Some(wait) = deadline.checked_duration_since(Instant::now()) {
            if event::poll(wait)?
                && let Event::Key(key) = event::read()?
            {
                let ctrl_c =
                    key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                    return Ok(());
                }
            }
        }
        match source.scrape() {
            Ok(text) => {
                let after = totals(&text);
                current = rows(&before, &after, taken.elapsed());
                before = after;
                taken = Instant::now();
                status = format!(
                    "nodemesh top — {what} — {} source→destination pairs with traffic in the last {}s (q quits)",
                    current.len(),
                    every.as_secs()
                );
            }
            Err(error) => {
                status = format!("nodemesh top — {error}");
                taken = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scrape(ok: u64, failed: u64, buckets: &[(&str, u64)]) -> String {
        let labels = "reporter=\"source\",source_workload=\"client\",source_workload_namespace=\"shop\",destination_service=\"web.shop.svc.cluster.local\"";
        let mut text = format!(
            "istio_requests_total{{{labels},response_code=\"200\"}} {ok}\nistio_requests_total{{{labels},response_code=\"503\"}} {failed}\n"
        );
        for (le, count) in buckets {
            text.push_str(&format!(
                "istio_request_duration_milliseconds_bucket{{{labels},response_code=\"200\",le=\"{le}\"}} {count}\n"
            ));
        }
        text
    }

    #[test]
    fn rates_success_and_quantiles_from_two_scrapes() {
        let before = totals(&scrape(100, 0, &[("1.0", 50), ("5.0", 100), ("+Inf", 100)]));
        // One second later: 200 more requests, 20 of them failed; of the successes (the
        // histogram here), 100 took at most 1 ms and 50 between 1 and 5 ms.
        let after = totals(&scrape(
            280,
            20,
            &[("1.0", 150), ("5.0", 250), ("+Inf", 250)],
        ));
        let rows = rows(&before, &after, Duration::from_secs(1));
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(
            (row.source.as_str(), row.destination.as_str()),
            ("shop/client", "web.shop.svc.cluster.local")
        );
        assert_eq!(row.rps, 200.0);
        assert!((row.success - 0.9).abs() < 1e-9);
        // The median is request 75 of 150, three quarters into the first bucket.
        assert!((row.p50_ms - 0.75).abs() < 1e-9, "{row:?}");
        // p99 is request 148.5: 48.5 of the 50 in (1, 5] ms, so 1 + 4 × 0.97.
        assert!((row.p99_ms - 4.88).abs() < 1e-9, "{row:?}");
    }

    #[test]
    fn quiet_pairs_are_not_shown() {
        let same = totals(&scrape(5, 0, &[("1.0", 5), ("+Inf", 5)]));
        assert!(rows(&same, &same, Duration::from_secs(1)).is_empty());
    }
}
