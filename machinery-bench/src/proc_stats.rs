//! What Linux's /proc says about a process (the worker's RSS, CPU time and sockets) and about the
//! machine.

use std::collections::HashSet;
use std::path::Path;

use crate::error::BenchError;

/// Clock ticks per second of the CPU times in /proc/<pid>/stat (`getconf CLK_TCK`; 100 if that cannot
/// be run, which is what Linux uses everywhere in practice).
pub(crate) fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse::<f64>().ok())
        .filter(|ticks| *ticks > 0.0)
        .unwrap_or(100.0)
}

/// The resident set size of `pid` in bytes (`VmRSS` of /proc/<pid>/status).
pub(crate) fn rss_bytes(pid: u32) -> Result<u64, BenchError> {
    let path = format!("/proc/{pid}/status");
    let status =
        std::fs::read_to_string(&path).map_err(BenchError::io(format!("reading {path}")))?;
    kib_field(&status, "VmRSS:")
        .ok_or_else(|| BenchError::Child(format!("{path} has no VmRSS line")))
}

/// The value in bytes of a `<name> <n> kB` line of a /proc file.
fn kib_field(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
}

/// User plus system CPU seconds `pid` has used (`utime` + `stime` of /proc/<pid>/stat).
pub(crate) fn cpu_seconds(pid: u32, ticks_per_second: f64) -> Result<f64, BenchError> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(BenchError::io(format!("reading {path}")))?;
    // The command name (field 2) is in parentheses and may hold spaces: count fields after its end.
    // Then field 3 is the state, and utime and stime are fields 14 and 15.
    let rest = stat
        .rfind(')')
        .map(|end| &stat[end + 1..])
        .ok_or_else(|| BenchError::Child(format!("{path}: unexpected format")))?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<u64>().ok());
    match (ticks(11), ticks(12)) {
        (Some(utime), Some(stime)) => Ok((utime + stime) as f64 / ticks_per_second),
        _ => Err(BenchError::Child(format!("{path}: no utime/stime fields"))),
    }
}

/// The local TCP ports of the sockets `pid` has open (IPv4 and IPv6): the ports Redis shows as the
/// worker's client addresses.
pub(crate) fn tcp_local_ports(pid: u32) -> HashSet<u16> {
    let mut inodes = HashSet::new();
    if let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/fd")) {
        for entry in entries.flatten() {
            if let Ok(target) = std::fs::read_link(entry.path()) {
                let target = target.to_string_lossy();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut ports = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let path = format!("/proc/{pid}/net/{table}");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        // `sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode`
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(inode)) = (fields.get(1), fields.get(9)) else {
                continue;
            };
            if !inodes.contains(*inode) {
                continue;
            }
            if let Some(port) = local
                .rsplit_once(':')
                .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
            {
                ports.insert(port);
            }
        }
    }
    ports
}

/// The process listening on local TCP `port` (IPv4 or IPv6), if this user may see it: the local
/// broker's server process, whose CPU time a drain reads.
pub(crate) fn listener_pid(port: u16) -> Option<u32> {
    let mut inodes = HashSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) =
                (fields.get(1), fields.get(3), fields.get(9))
            else {
                continue;
            };
            // State 0A is LISTEN.
            let listening_here = *state == "0A"
                && local
                    .rsplit_once(':')
                    .and_then(|(_, hex)| u16::from_str_radix(hex, 16).ok())
                    == Some(port);
            if listening_here {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let fds = std::fs::read_dir(entry.path().join("fd")).ok()?;
            fds.flatten()
                .filter_map(|fd| std::fs::read_link(fd.path()).ok())
                .any(|target| inodes.contains(target.to_string_lossy().as_ref()))
                .then_some(pid)
        })
}

/// The CPUs this process may use (what `nproc` prints).
pub(crate) fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, usize::from)
}

/// The CPU model (`model name` of /proc/cpuinfo), or `unknown`.
pub(crate) fn cpu_model() -> String {
    std::fs::read_to_string(Path::new("/proc/cpuinfo"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, model)| model.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Total memory of the machine in bytes (`MemTotal` of /proc/meminfo), if known.
pub(crate) fn mem_total() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    kib_field(&text, "MemTotal:")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id();
        assert!(rss_bytes(pid).is_ok_and(|rss| rss > 0));
        assert!(cpu_seconds(pid, clock_ticks()).is_ok_and(|cpu| cpu >= 0.0));
    }

    #[test]
    fn finds_the_local_port_of_an_open_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a local listener");
        let addr = listener.local_addr().expect("its address");
        let client = std::net::TcpStream::connect(addr).expect("a connection to it");
        let local = client.local_addr().expect("the client's address");
        assert!(tcp_local_ports(std::process::id()).contains(&local.port()));
    }

    #[test]
    fn finds_the_process_listening_on_a_port() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a local listener");
        let port = listener.local_addr().expect("its address").port();
        assert_eq!(listener_pid(port), Some(std::process::id()));
        drop(listener);
        // A process forked by a test running beside this one (`reads_this_process` runs `getconf`)
        // holds a copy of the socket until it execs, which closes it: the port stays in LISTEN until
        // then, held by that child. So the port must be free soon, not at once.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut holder = listener_pid(port);
        while holder.is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            holder = listener_pid(port);
        }
        assert_eq!(holder, None);
    }
}
