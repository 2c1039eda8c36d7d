//! Where access log lines go: stdout, in batches. A line per request written straight to
//! stdout is a `write` per request on the proxy's hot path (about a third of what the access
//! log cost in the L7 profile, docs/benchmarks.md, "Request paths"); instead lines are
//! appended to a batch that is written when the next line would take it past [`BATCH`]
//! bytes, every [`FLUSH_EVERY`] by a thread of its own, and when the agent exits
//! ([`FlushAtExit`]). A line may so reach stdout up to `FLUSH_EVERY` late, and a crash loses
//! at most that much; Envoy's file access logs buffer the same way (flushed every 10 s by
//! default).
//!
//! A batch is at most `PIPE_BUF` bytes and ends at the end of a line, so each `write` to a
//! pipe (the container runtime's) is atomic and never splits a line around the agent's own
//! logs on stderr. The batch being written is swapped out first, so lines keep being
//! appended while it is written, and batches are written in order. `tracing-appender`'s
//! non-blocking writer was not used: it hands every line to its thread through a channel, a
//! wake-up per line, which costs what it saves on a node whose cores are busy.

use std::{
    io::{self, Write},
    sync::{
        Mutex, MutexGuard, Once,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::Duration,
};

/// The largest batch: `PIPE_BUF`, what a pipe writes atomically.
const BATCH: usize = 4096;
/// Pending lines are written at least this often.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

static STDOUT: Batches = Batches::new(write_stdout);
static FLUSHING: Once = Once::new();
/// No flushing thread could be started: each line is written at once.
static UNBATCHED: AtomicBool = AtomicBool::new(false);

fn write_stdout(bytes: &[u8]) {
    let mut stdout = io::stdout().lock();
    // Nowhere to report a failing stdout: the lines are dropped, as a direct write's would be.
    let _ = stdout.write_all(bytes).and_then(|()| stdout.flush());
}

/// Lines waiting to be written to `output`, and the batch being written.
struct Batches {
    pending: Mutex<Vec<u8>>,
    /// Held while a batch is written: the next one waits its turn.
    writing: Mutex<Vec<u8>>,
    output: fn(&[u8]),
}

fn lock(mutex: &Mutex<Vec<u8>>) -> MutexGuard<'_, Vec<u8>> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Batches {
    const fn new(output: fn(&[u8])) -> Self {
        Self {
            pending: Mutex::new(Vec::new()),
            writing: Mutex::new(Vec::new()),
            output,
        }
    }

    /// Adds a whole line, writing what was pending first if the line would take the batch
    /// past [`BATCH`], and everything at once if `at_once`.
    fn append(&self, line: &[u8], at_once: bool) {
        let mut pending = lock(&self.pending);
        if !pending.is_empty() && pending.len() + line.len() > BATCH {
            self.write(pending);
            pending = lock(&self.pending);
        }
        pending.extend_from_slice(line);
        if at_once {
            self.write(pending);
        }
    }

    fn flush(&self) {
        self.write(lock(&self.pending));
    }

    /// Writes the pending batch: it is swapped into `writing` (whose buffer, empty since its
    /// last write, becomes the next batch's), then written without holding `pending`.
    fn write(&self, mut pending: MutexGuard<'_, Vec<u8>>) {
        if pending.is_empty() {
            return;
        }
        let mut writing = lock(&self.writing);
        std::mem::swap(&mut *pending, &mut *writing);
        drop(pending);
        (self.output)(&writing);
        writing.clear();
    }
}

/// Writes the lines still pending.
pub fn flush() {
    STDOUT.flush();
}

/// Flushes when dropped: at the end of `main`, and while a panic unwinds out of it.
pub struct FlushAtExit;

impl Drop for FlushAtExit {
    fn drop(&mut self) {
        flush();
    }
}

/// Starts the thread that flushes every [`FLUSH_EVERY`], once, when the first line comes
/// (the command-line tools write none).
fn start_flushing() {
    FLUSHING.call_once(|| {
        let started = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(|| {
                loop {
                    std::thread::sleep(FLUSH_EVERY);
                    flush();
                }
            });
        if let Err(error) = started {
            UNBATCHED.store(true, Relaxed);
            eprintln!("access log: no flushing thread ({error}); each line is written at once");
        }
    });
}

/// Adds a whole line (ending in a newline) to what is written to stdout.
pub fn append(line: &[u8]) {
    start_flushing();
    STDOUT.append(line, UNBATCHED.load(Relaxed));
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    static WRITES: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

    fn capture(bytes: &[u8]) {
        WRITES
            .lock()
            .expect("no test panicked holding it")
            .push(bytes.to_vec());
    }

    #[test]
    fn batches_end_at_lines_stay_within_pipe_buf_and_keep_their_order() {
        let batches = Batches::new(capture);
        let line = |n: usize| format!("{{\"n\":{n},\"pad\":\"{}\"}}\n", "x".repeat(300));
        let lines: Vec<String> = (0..40).map(line).collect();
        for text in &lines {
            batches.append(text.as_bytes(), false);
        }
        let written_before_flush = WRITES.lock().expect("writes").len();
        assert!(
            written_before_flush >= 2,
            "full batches are written as lines come"
        );
        batches.flush();
        let writes = WRITES.lock().expect("writes").clone();
        assert!(
            writes.len() > written_before_flush,
            "the flush wrote the rest"
        );
        for write in &writes {
            assert!(write.len() <= BATCH, "a write of {} bytes", write.len());
            assert_eq!(write.last(), Some(&b'\n'), "a batch ends at a line's end");
        }
        assert_eq!(
            writes.concat(),
            lines.concat().into_bytes(),
            "every line, in order"
        );
        batches.flush();
        assert_eq!(
            WRITES.lock().expect("writes").len(),
            writes.len(),
            "nothing was left"
        );
    }
}
