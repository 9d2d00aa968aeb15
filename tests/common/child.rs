//! Running a risky scenario in a child process with a time bound: a crash or a hang fails the
//! test that started it instead of killing or stalling the test runner.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How a bounded child ended.
#[derive(Debug)]
pub struct ChildRun {
    /// `None`: still running at the time limit, and killed.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl ChildRun {
    /// Panics with the child's output unless it exited with status 0.
    pub fn assert_success(&self, what: &str) {
        assert!(
            self.status.is_some_and(|s| s.success()),
            "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
            match self.status {
                None => "timed out (killed)".to_string(),
                Some(s) => format!("ended with {s}"),
            },
            self.stdout,
            self.stderr
        );
    }
}

/// Runs this test binary's ignored test `entry` in a child, behind `wrapper` (a command such as
/// `valgrind` and its arguments; empty: none) with `env`, killed after `limit`.
pub fn run_bounded(
    wrapper: &[&str],
    entry: &str,
    env: &[(&str, &str)],
    limit: Duration,
) -> ChildRun {
    let exe = std::env::current_exe().unwrap();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    command
        .args([
            "--exact",
            entry,
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("ALTPATCH_LOG")
        .envs(env.iter().copied());
    run_command_bounded(command, limit)
}

/// Runs `command` (another program: one a test built) with its output captured, killed after
/// `limit`.
pub fn run_command_bounded(mut command: Command, limit: Duration) -> ChildRun {
    let mut child = command
        .stdin(Stdio::null())
        // A group of its own: a hung child's own children (which hold the pipes) die with it.
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = pipe.read_to_end(&mut text);
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() >= deadline {
            // SAFETY: kills the process group this function started (the child's pid is its id).
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    ChildRun {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

/// Whether `tool` (`gdb`, `valgrind`) can be run here; a test needing it says why it skips.
pub fn tool_available(tool: &str) -> bool {
    let found = Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!("skipped: {tool} is not installed (.ci/run installs it)");
    }
    found
}
