//! A worker process driven line by line over stdin/stdout (the `file_store_worker` and
//! `keyed_worker` binaries): every command is answered, so a test moves on only once all
//! answers are in.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Only turns a hung worker into a failure; no test outcome depends on it.
const ANSWER_DEADLINE: Duration = Duration::from_secs(120);

pub(crate) struct Worker {
    pub(crate) child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    /// Starts `command` (its environment already set) and waits for its `ready`.
    pub(crate) fn spawn(mut command: Command) -> Worker {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut worker = Worker {
            child,
            stdin,
            lines,
        };
        assert_eq!(worker.answer(), "ready");
        worker
    }

    pub(crate) fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    pub(crate) fn answer(&mut self) -> String {
        self.lines
            .recv_timeout(ANSWER_DEADLINE)
            .unwrap_or_else(|e| panic!("worker {} gave no answer: {e}", self.child.id()))
    }

    pub(crate) fn ask(&mut self, command: &str) -> String {
        self.send(command);
        self.answer()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Only this test's own child, by its id.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
