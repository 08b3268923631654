//! Progress display: spinners and bars on a terminal, nothing otherwise.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where long steps (download, unpack, compress) report progress.
///
/// Draws on stderr only when stderr is a terminal, so logs and CI output stay
/// clean. Cloning is cheap; clones draw to the same place.
#[derive(Debug, Clone)]
pub struct Progress {
    visible: bool,
}

impl Progress {
    /// Shows progress if stderr is a terminal.
    pub fn new() -> Self {
        Self {
            visible: std::io::stderr().is_terminal(),
        }
    }

    /// Never shows anything (tests, daemons).
    pub fn hidden() -> Self {
        Self { visible: false }
    }

    /// Whether anything is drawn.
    pub fn is_visible(&self) -> bool {
        self.visible
    }

    fn bar(&self, bar: ProgressBar) -> ProgressBar {
        if self.visible {
            bar.set_draw_target(ProgressDrawTarget::stderr());
        } else {
            bar.set_draw_target(ProgressDrawTarget::hidden());
        }
        bar
    }

    /// Starts a spinner for a step of unknown length; it ends when the
    /// returned [`Step`] is finished or dropped.
    pub fn spinner(&self, message: impl Into<String>) -> Step {
        let bar = self.bar(ProgressBar::new_spinner());
        bar.set_style(
            ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        );
        bar.set_message(message.into());
        if self.visible {
            bar.enable_steady_tick(Duration::from_millis(100));
        }
        Step { bar }
    }

    /// Starts a bar counting bytes up to `total`.
    pub fn bytes(&self, message: impl Into<String>, total: u64) -> Step {
        let bar = self.bar(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(message.into());
        Step { bar }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// One running step of a [`Progress`].
#[derive(Debug)]
pub struct Step {
    bar: ProgressBar,
}

impl Step {
    /// Replaces the step's message.
    pub fn set_message(&self, message: impl Into<String>) {
        self.bar.set_message(message.into());
    }

    /// Advances a byte bar.
    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Ends the step, leaving `message` on screen.
    pub fn finish(self, message: impl Into<String>) {
        self.bar.finish_with_message(message.into());
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.finish_and_clear();
        }
    }
}
