//! The CPU time of the calling process, from `getrusage`.

use std::time::Duration;

/// User plus system CPU time this process has used so far.
#[allow(unsafe_code)]
pub(crate) fn process_cpu() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` points to writable memory of the size `getrusage` fills;
    // RUSAGE_SELF is a valid `who`. With those, the call cannot fail.
    let usage = unsafe {
        libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr());
        usage.assume_init()
    };
    let time = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}
