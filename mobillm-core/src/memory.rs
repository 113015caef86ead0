//! Peak and current resident set size, as the kernel records it (`VmHWM`, `VmRSS`), of this process or another.
//! Linux and Android only; other platforms report `None`.

/// A `kB` field of a `/proc/…/status` file, in kB.
fn status_kb(path: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn kb_to_mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

pub fn peak_rss_bytes() -> Option<u64> {
    status_kb("/proc/self/status", "VmHWM").map(|kb| kb * 1024)
}

pub fn peak_rss_mb() -> Option<f64> {
    status_kb("/proc/self/status", "VmHWM").map(kb_to_mb)
}

/// Peak resident set size of process `pid` in MB (a child the caller started, say).
pub fn peak_rss_mb_of(pid: u32) -> Option<f64> {
    status_kb(&format!("/proc/{pid}/status"), "VmHWM").map(kb_to_mb)
}

/// Current resident set size (`VmRSS`) in MB.
pub fn current_rss_mb() -> Option<f64> {
    status_kb("/proc/self/status", "VmRSS").map(kb_to_mb)
}
