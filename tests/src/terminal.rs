//! A pseudo-terminal for the interactive commands (`nodemesh top`): tmux sessions, one per
//! command started, whose screens the tests read, all killed when this goes.

use std::{cell::Cell, process::Command, time::Duration};

use crate::wait_until;

/// tmux sessions named `<prefix>-<n>`, one per command started.
pub struct Tmux {
    prefix: String,
    size: (u16, u16),
    started: Cell<u32>,
}

impl Tmux {
    /// Sessions of `columns` × `rows` named after `prefix` (make it unique per test).
    pub fn new(prefix: &str, columns: u16, rows: u16) -> Self {
        Self {
            prefix: prefix.to_owned(),
            size: (columns, rows),
            started: Cell::new(0),
        }
    }

    /// Runs `command_line` (a shell command) in a session of its own. Each command gets a
    /// new session: killing the last session ends the tmux server, and a session started at
    /// that moment can fail to reach it (a clean-clone CI run caught that).
    pub fn start(&self, command_line: &str) {
        let n = self.started.get() + 1;
        self.started.set(n);
        let started = Command::new("tmux")
            .args(["new-session", "-d", "-s", &self.session(n)])
            .args([
                "-x",
                &self.size.0.to_string(),
                "-y",
                &self.size.1.to_string(),
            ])
            .arg(command_line)
            .status()
            .expect("tmux");
        assert!(started.success(), "tmux new-session {command_line}");
    }

    /// The screen of the last command started, wrapped lines joined.
    pub fn screen(&self) -> String {
        let capture = Command::new("tmux")
            .args(["capture-pane", "-p", "-J", "-t"])
            .arg(self.session(self.started.get()))
            .output()
            .expect("capture-pane");
        String::from_utf8_lossy(&capture.stdout).into_owned()
    }

    /// Waits (`timeout`) until the last command's screen satisfies `shown`; returns the
    /// screen, or what it was with the error.
    pub fn wait_screen(
        &self,
        timeout: Duration,
        what: &str,
        shown: impl Fn(&str) -> bool,
    ) -> Result<String, String> {
        let mut screen = String::new();
        let seen = wait_until(timeout, what, || {
            screen = self.screen();
            Ok(shown(&screen))
        });
        match seen {
            Ok(()) => Ok(screen),
            Err(error) => Err(format!("{error}:\n{screen}")),
        }
    }

    /// Types `keys` into the last command's session.
    pub fn send_keys(&self, keys: &str) {
        let _ = Command::new("tmux")
            .args(["send-keys", "-t", &self.session(self.started.get()), keys])
            .status();
    }

    fn session(&self, n: u32) -> String {
        format!("{}-{n}", self.prefix)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        for n in 1..=self.started.get() {
            let _ = Command::new("tmux")
                .args(["kill-session", "-t", &self.session(n)])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}
