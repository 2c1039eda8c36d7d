//! What an operator's log pipeline gets: JSON lines on stderr when it is not a terminal,
//! text when asked for, and colour escapes only on a terminal.

use std::process::{Command, Output};

const ESC: char = '\u{1b}';

/// `nodemesh status` against a loopback port nothing listens on: it logs one error.
fn status_refused(extra: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nodemesh"));
    command
        .args(["status", "--admin", "127.0.0.1:9"])
        .args(extra)
        .env_remove("NODEMESH_LOG_FORMAT")
        .env_remove("NO_COLOR");
    command
}

fn run(mut command: Command) -> (Output, String) {
    let output = command.output().expect("nodemesh runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "the status request must fail: {stderr}"
    );
    (output, stderr)
}

/// The same command under a pseudo-terminal (util-linux `script`): its output is a terminal.
fn on_a_terminal(command: &Command) -> String {
    let line = std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    let mut script = Command::new("script");
    script.args(["--quiet", "--return", "--command", &line, "/dev/null"]);
    for (key, value) in command.get_envs() {
        match value {
            Some(value) => script.env(key, value),
            None => script.env_remove(key),
        };
    }
    let output = script.output().expect("script (util-linux)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn logs_to_a_pipe_are_json_lines_without_escapes() {
    let (_, stderr) = run(status_refused(&[]));
    assert!(!stderr.contains(ESC), "{stderr:?}");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"),
        "the failure is logged: {stderr}"
    );
}

#[test]
fn text_is_there_when_asked_for_and_colours_only_on_a_terminal() {
    let (_, stderr) = run(status_refused(&["--log-format", "text"]));
    assert!(
        stderr.contains("ERROR") && !stderr.trim_start().starts_with('{'),
        "{stderr}"
    );
    assert!(!stderr.contains(ESC), "no colours into a pipe: {stderr:?}");

    let terminal = on_a_terminal(&status_refused(&[]));
    assert!(
        terminal.contains("ERROR"),
        "text by default on a terminal: {terminal:?}"
    );
    assert!(
        terminal.contains(ESC),
        "colours on a terminal: {terminal:?}"
    );
    let mut no_color = status_refused(&[]);
    no_color.env("NO_COLOR", "1");
    let terminal = on_a_terminal(&no_color);
    assert!(
        terminal.contains("ERROR") && !terminal.contains(ESC),
        "{terminal:?}"
    );
}
