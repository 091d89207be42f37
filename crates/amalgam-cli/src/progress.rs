//! The progress bar: keys done / total, bytes/s, ETA and the current key, on a terminal only.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicUsize, Ordering};

pub struct Bar {
    bar: Option<ProgressBar>,
    quiet: bool,
    keys: AtomicUsize,
}

impl Bar {
    pub fn new(quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("valid template"),
            );
            b
        });
        Bar {
            bar,
            quiet,
            keys: AtomicUsize::new(0),
        }
    }
}

impl amalgam::Progress for Bar {
    fn start(&self, total_bytes: u64, keys: usize) {
        self.keys.store(keys, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.set_length(total_bytes);
        }
    }
    fn advance(&self, bytes: u64, keys_done: usize, key: &str) {
        if let Some(b) = &self.bar {
            b.inc(bytes);
            b.set_message(format!(
                "keys {keys_done}/{} {key}",
                self.keys.load(Ordering::Relaxed)
            ));
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
    fn note(&self, message: &str) {
        match &self.bar {
            Some(b) => b.println(format!("note: {message}")),
            None if !self.quiet => eprintln!("note: {message}"),
            None => {}
        }
    }
}
