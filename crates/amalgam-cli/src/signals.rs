//! SIGINT and SIGTERM during a merge: the first stops the merge cleanly (the engine removes its
//! partial file, or keeps it with `--keep-partial`), a second one exits at once (the partial file
//! stays, and the next identical run resumes it).

use amalgam::Cancel;
use std::sync::atomic::{AtomicI32, Ordering};

/// The signal that cancelled the merge, 0 if none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The merge the signals stop: the one running now.
static CURRENT: std::sync::Mutex<Option<Cancel>> = std::sync::Mutex::new(None);

/// Cancels `cancel` on the first SIGINT or SIGTERM; exits on the second. The handler thread is
/// started once; later calls make it stop the newer merge.
#[cfg(unix)]
pub fn watch(cancel: &Cancel) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    static STARTED: std::sync::Once = std::sync::Once::new();
    *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some(cancel.clone());
    STARTED.call_once(|| {
        let Ok(mut signals) = signal_hook::iterator::Signals::new([SIGINT, SIGTERM]) else {
            return;
        };
        std::thread::spawn(move || {
            for sig in signals.forever() {
                if RECEIVED.swap(sig, Ordering::SeqCst) != 0 {
                    eprintln!(
                        "\n{} again: stopping now; the partial file stays, run the same command to resume",
                        name(sig)
                    );
                    std::process::exit(128 + sig);
                }
                eprintln!(
                    "\n{}: stopping the merge (send it again to stop at once)",
                    name(sig)
                );
                match &*CURRENT.lock().unwrap_or_else(|e| e.into_inner()) {
                    Some(c) => c.cancel(),
                    None => std::process::exit(128 + sig),
                }
            }
        });
    });
}

#[cfg(not(unix))]
pub fn watch(_cancel: &Cancel) {}

fn name(sig: i32) -> &'static str {
    #[cfg(unix)]
    if sig == signal_hook::consts::SIGTERM {
        return "SIGTERM";
    }
    let _ = sig;
    "SIGINT"
}

/// The signal that cancelled the merge, if one did: its name and the exit status for it.
pub fn received() -> Option<(&'static str, i32)> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some((name(sig), 128 + sig)),
    }
}

/// For commands that print to stdout (`inspect`, `methods`): a closed pipe (`| head -1`) ends the
/// process quietly, as it does for `cat`, instead of a panic on the failed write. Rust ignores
/// SIGPIPE by default; this restores the default action.
pub fn default_sigpipe() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to its default has no preconditions.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
