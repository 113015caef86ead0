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

/// Makes glibc's malloc give every block of 4 MiB or more back to the kernel when it is freed. By default glibc
/// raises that threshold each time such a block is freed (up to 32 MiB), after which the fine-tune's short-lived
/// tensors (a forward batch's activations, a scoring chunk, a downloaded network) are carved from the heap and
/// the heap stays fragmented: measured on the default demo, peak RSS 293 MB by default and 246 MB with the fixed
/// threshold (docs/benchmarks.md, *Device memory*). Called first in `main` by `mobillm-device` and the benchmarks'
/// device processes; the FFI library leaves the allocator to the app (phones use other allocators). A no-op
/// off glibc.
pub fn release_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator parameter (glibc takes its own lock to do so).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
    }
}

/// Hands the heap's free pages back to the kernel (glibc's `malloc_trim`). Between phases that allocate in
/// different patterns (the backbone forwards, then a `local` fine-tune's training) the heap keeps the first
/// phase's free fragments resident (measured in a `local` demo: 187–207 MB resident after the forwards, 180 MB
/// after the trim). A no-op off glibc.
pub fn release_free_pages() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the kernel (glibc takes its own locks).
    unsafe {
        libc::malloc_trim(0);
    }
}
