//! Where access log lines go: stdout, in batches. A line per request written straight to
//! stdout is a `write` per request on the proxy's hot path (about a third of what the access
//! log cost in the L7 profile, docs/benchmarks.md); instead lines are appended to a buffer
//! that is written when it reaches [`FLUSH_AT`] bytes, every [`FLUSH_EVERY`] by a thread of
//! its own, and when the agent exits ([`flush`]). A line may so reach stdout up to
//! `FLUSH_EVERY` late, and a crash loses at most that much; Envoy's file access logs
//! buffer the same way (flushed every 10 s by default). `tracing-appender`'s non-blocking
//! writer was not used: it hands every line to its thread through a channel, a wake-up per
//! line, which costs what it saves on a node whose cores are busy.

use std::{
    io::{self, Write},
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use tracing_subscriber::fmt::MakeWriter;

/// A batch is written once it holds this much.
const FLUSH_AT: usize = 32 * 1024;
/// And at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);

static PENDING: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn pending() -> MutexGuard<'static, Vec<u8>> {
    PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Writes what is pending to stdout. The lock is held while writing, so batches keep their
/// order.
pub fn flush() {
    let mut pending = pending();
    write_out(&mut pending);
}

fn write_out(pending: &mut Vec<u8>) {
    if pending.is_empty() {
        return;
    }
    let mut stdout = io::stdout().lock();
    // Nowhere to report a failing stdout: the lines are dropped, as a direct write's would be.
    let _ = stdout.write_all(pending).and_then(|()| stdout.flush());
    pending.clear();
}

/// The access log layer's writer ([`MakeWriter`]).
#[derive(Clone, Copy)]
pub struct BatchedStdout {
    /// No flushing thread could be started: each line is written at once.
    unbatched: bool,
}

impl BatchedStdout {
    /// Starts the thread that flushes every [`FLUSH_EVERY`].
    pub fn start() -> Self {
        let started = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flush();
                }
            });
        if let Err(error) = &started {
            eprintln!("access log: no flushing thread ({error}); each line is written at once");
        }
        Self {
            unbatched: started.is_err(),
        }
    }
}

/// One line being written (tracing formats a whole event, then writes it once).
pub struct Line {
    unbatched: bool,
}

impl Write for Line {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        let mut pending = pending();
        pending.extend_from_slice(bytes);
        if self.unbatched || pending.len() >= FLUSH_AT {
            write_out(&mut pending);
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for BatchedStdout {
    type Writer = Line;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            unbatched: self.unbatched,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_wait_for_a_batch_and_a_full_batch_is_written() {
        let mut line = Line { unbatched: false };
        line.write_all(b"{\"kind\":\"request\"}\n")
            .expect("buffered");
        assert_eq!(pending().as_slice(), b"{\"kind\":\"request\"}\n");
        let filler = vec![b' '; FLUSH_AT];
        line.write_all(&filler).expect("buffered, then written");
        assert!(
            pending().is_empty(),
            "a batch of FLUSH_AT bytes is written at once"
        );
        line.write_all(b"next\n").expect("buffered");
        flush();
        assert!(pending().is_empty());
    }
}
