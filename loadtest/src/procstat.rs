//! CPU time and resident memory of a process, from `/proc` (Linux). The
//! load tester samples the server it drives (when given its pid) and
//! itself, so every report says what the load cost on both sides.

use std::time::Duration;

/// One sample of a process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    /// User + system CPU time since the process started.
    pub cpu: Duration,
    /// Resident set size, bytes.
    pub rss: u64,
}

/// Clock ticks per second of `/proc/*/stat` (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: u64 = 100;

/// Samples process `pid` (`None`: this process).
pub fn sample(pid: Option<u32>) -> Option<ProcSample> {
    let dir = pid.map_or_else(|| "/proc/self".to_owned(), |p| format!("/proc/{p}"));
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("{dir}/status")).ok()?;
    parse(&stat, &status)
}

/// The sum over processes `pids`; `None` if there are none or one is gone.
pub fn sample_all(pids: &[u32]) -> Option<ProcSample> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().try_fold(
        ProcSample {
            cpu: Duration::ZERO,
            rss: 0,
        },
        |acc, pid| {
            let s = sample(Some(*pid))?;
            Some(ProcSample {
                cpu: acc.cpu + s.cpu,
                rss: acc.rss + s.rss,
            })
        },
    )
}

fn parse(stat: &str, status: &str) -> Option<ProcSample> {
    // The command name may hold spaces; fields resume after its ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after ')'.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(ProcSample {
        cpu: Duration::from_millis((utime + stime) * 1_000 / TICKS_PER_SEC),
        rss: rss_kb * 1_024,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "1234 (floe (x)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 150 0 0 20 0 4 0 100 1000 500";
        let status = "Name:\tfloe\nVmRSS:\t  2048 kB\nThreads:\t4\n";
        assert_eq!(
            parse(stat, status),
            Some(ProcSample {
                cpu: Duration::from_secs(4),
                rss: 2 * 1024 * 1024
            })
        );
        assert_eq!(parse("garbage", status), None);
        assert!(sample(None).is_some_and(|s| s.rss > 0));
    }
}
