//! CPU time of a server process, from `/proc/PID/stat`: what each operation cost the server,
//! beside what it achieved. On two cores shared by the servers and the load generator,
//! throughput follows CPU per operation, so this figure says where a gap comes from.

use std::time::Duration;

/// User plus system CPU time of every thread of process `pid` so far; `None` if it cannot be
/// read (the process is gone, or this is not Linux).
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = stat_ticks(&stat)?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let per_second = u64::try_from(per_second).ok().filter(|&t| t > 0)?;
    Some(Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / per_second))
}

/// `utime + stime` of a `/proc/PID/stat` line, in clock ticks. The command name (field 2) is
/// in parentheses and may hold spaces, so fields are counted from the last `)`.
fn stat_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace();
    // Fields 3.. of proc(5): state is the first here; utime (14) and stime (15) are the
    // 12th and 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// A process's CPU time, read at the start of a run, to be read again at its end.
pub struct CpuMeter {
    pid: u32,
    start: Duration,
}

impl CpuMeter {
    /// Starts measuring process `pid`; `None` if its CPU time cannot be read.
    pub fn start(pid: u32) -> Option<Self> {
        Some(CpuMeter { pid, start: cpu_time(pid)? })
    }

    /// CPU time since [`CpuMeter::start`], in microseconds per operation of `ops`.
    pub fn us_per_op(&self, ops: u64) -> Option<f64> {
        let used = cpu_time(self.pid)?.checked_sub(self.start)?;
        (ops > 0).then(|| used.as_secs_f64() * 1e6 / ops as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_counted_after_the_command_name() {
        let line = "4242 (tokio rt) worker) S 1 4242 4242 0 -1 4194560 6080 0 0 0 731 269 0 0 20 0 5 0 4 1";
        assert_eq!(stat_ticks(line), Some(731 + 269));
        assert_eq!(stat_ticks("4242 (x) S 1"), None);
    }

    #[test]
    fn a_busy_process_uses_cpu_and_a_gone_one_is_none() {
        let me = std::process::id();
        let meter = CpuMeter::start(me).expect("own /proc/self/stat");
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(100) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
        let us = meter.us_per_op(1).expect("CPU time");
        // 100 ms of spinning, counted at the clock tick's resolution (10 ms here).
        assert!((50_000.0..10_000_000.0).contains(&us), "{us} µs");
        assert_eq!(meter.us_per_op(0), None);
        assert_eq!(cpu_time(u32::MAX), None);
    }
}
