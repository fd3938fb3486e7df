//! A worker process driven line by line over stdin/stdout (the `file_store_worker` and
//! `keyed_worker` binaries, and test binaries that run one of their own ignored tests as
//! a worker): every command is answered, so a test moves on only once all answers are in.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Only turns a hung worker into a failure; no test outcome depends on it.
const ANSWER_DEADLINE: Duration = Duration::from_secs(120);

/// A running worker; killed (only this child, by its id) when dropped.
#[derive(Debug)]
pub struct Worker {
    /// The process.
    pub child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Worker {
    /// Starts `command` (its environment already set) and waits for its `ready`; every
    /// line it prints is an answer.
    pub fn spawn(command: Command) -> Worker {
        Worker::spawn_with(command, None)
    }

    /// Like [`spawn`](Self::spawn) for a worker whose answers share stdout with other
    /// lines (libtest's "running 1 test" around a test run as a worker): only lines
    /// containing `marker` are answers, and the answer is what follows it.
    pub fn spawn_marked(command: Command, marker: &'static str) -> Worker {
        Worker::spawn_with(command, Some(marker))
    }

    fn spawn_with(mut command: Command, marker: Option<&'static str>) -> Worker {
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
                let answer = match marker {
                    None => line,
                    Some(marker) => match line.find(marker) {
                        Some(at) => line[at + marker.len()..].to_owned(),
                        None => continue,
                    },
                };
                if tx.send(answer).is_err() {
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

    /// Sends one command line.
    pub fn send(&mut self, command: &str) {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
    }

    /// The next answer (fails the test if none comes in two minutes).
    pub fn answer(&mut self) -> String {
        self.lines
            .recv_timeout(ANSWER_DEADLINE)
            .unwrap_or_else(|e| panic!("worker {} gave no answer: {e}", self.child.id()))
    }

    /// Sends `command` and returns its answer.
    pub fn ask(&mut self, command: &str) -> String {
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
