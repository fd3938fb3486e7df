//! Small pieces of the Redis protocol the store speaks: durations in milliseconds and
//! `WAIT`. (The token itself is a [`tokenflight::record`], shared with `FileStore`.)

use std::time::Duration;

/// Whole milliseconds of `d`, at least 1 (Redis refuses a zero expiry).
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// `WAIT replicas timeout`: blocks until that many replicas acknowledged this
/// connection's writes, or the timeout passed; answers how many did.
pub(crate) fn wait(replicas: u32, timeout: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("WAIT");
    // A zero timeout would make WAIT block until the replicas answer, however long.
    cmd.arg(replicas).arg(millis(timeout));
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_never_blocks_forever() {
        // WAIT with timeout 0 would block until the replicas answer, however long.
        let packed = wait(1, Duration::from_micros(10)).get_packed_command();
        let text = String::from_utf8_lossy(&packed);
        assert!(text.ends_with("$1\r\n1\r\n$1\r\n1\r\n"), "{text:?}");
    }
}
