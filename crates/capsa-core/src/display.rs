//! The VM's screen: a framebuffer of a fixed size plus an absolute pointer and
//! a keyboard, driven from the host. Plain data only; the QEMU backend turns a
//! [`DisplaySpec`] into devices and [`InputEvent`]s into QMP `input-send-event`.

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Smallest display a spec may ask for.
pub const MIN_DISPLAY: (u32, u32) = (320, 200);
/// Largest display a spec may ask for (4K UHD).
pub const MAX_DISPLAY: (u32, u32) = (3840, 2160);
/// The range of the absolute pointer axes (QEMU's `INPUT_EVENT_ABS_MAX`).
pub const ABS_MAX: u32 = 0x7fff;
/// Most input events sent to the backend in one call.
pub const MAX_INPUT_EVENTS: usize = 4096;

/// A framebuffer display with an absolute pointer (tablet) and a keyboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisplaySpec {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl DisplaySpec {
    /// A display of `width` x `height` pixels (checked by [`DisplaySpec::validate`]).
    pub fn new(width: u32, height: u32) -> Self {
        Self { width, height }
    }

    /// Refuses sizes outside [`MIN_DISPLAY`]..=[`MAX_DISPLAY`] and odd widths
    /// (framebuffer lines must stay 8-byte aligned at 32 bits per pixel).
    pub fn validate(&self) -> Result<()> {
        let (minw, minh) = MIN_DISPLAY;
        let (maxw, maxh) = MAX_DISPLAY;
        if !(minw..=maxw).contains(&self.width)
            || !(minh..=maxh).contains(&self.height)
            || !self.width.is_multiple_of(2)
        {
            return Err(Error::invalid(
                "display",
                format!("{}x{} is not a usable display size", self.width, self.height),
                format!(
                    "ask for an even width of {minw}..={maxw} and a height of {minh}..={maxh}, e.g. --display 1280x800"
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of video memory the device needs: two 32-bit frames, rounded up
    /// to a power of two (QEMU's bochs-display wants one), at least 16 MiB.
    pub fn vram_bytes(&self) -> u64 {
        let frame = u64::from(self.width) * u64::from(self.height) * 4;
        (frame * 2).next_power_of_two().max(16 << 20)
    }
}

impl std::fmt::Display for DisplaySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

impl std::str::FromStr for DisplaySpec {
    type Err = Error;
    /// Parses `WIDTHxHEIGHT` (e.g. `1280x800`) and validates it.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "display",
                format!("{s:?} is not WIDTHxHEIGHT"),
                "write the size as e.g. 1280x800",
            )
        };
        let (w, h) = s.trim().split_once(['x', 'X']).ok_or_else(bad)?;
        let d = Self::new(
            w.trim().parse().map_err(|_| bad())?,
            h.trim().parse().map_err(|_| bad())?,
        );
        d.validate()?;
        Ok(d)
    }
}

/// A pointer button.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MouseButton {
    /// The primary button.
    Left,
    /// The middle button (wheel press).
    Middle,
    /// The secondary button.
    Right,
    /// One wheel notch away from the user (scroll up).
    WheelUp,
    /// One wheel notch towards the user (scroll down).
    WheelDown,
    /// Horizontal wheel, left.
    WheelLeft,
    /// Horizontal wheel, right.
    WheelRight,
}

/// One input event, in device terms (what QEMU's `input-send-event` takes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum InputEvent {
    /// A key by QEMU's `QKeyCode` name (`a`, `shift`, `ret`, ...).
    Key {
        /// The QKeyCode name.
        qcode: String,
        /// Pressed (true) or released.
        down: bool,
    },
    /// A pointer button.
    Button {
        /// Which button.
        button: MouseButton,
        /// Pressed (true) or released.
        down: bool,
    },
    /// Ends a frame: the events since the last `Sync` reach the guest
    /// together (as one `SYN_REPORT`); a batch ends with one implicitly.
    Sync,
    /// The absolute pointer position, each axis in 0..=[`ABS_MAX`] over the whole screen.
    Move {
        /// Horizontal position.
        x: u32,
        /// Vertical position.
        y: u32,
    },
}

/// Checks a batch of input events before it reaches a backend.
pub fn check_input(events: &[InputEvent]) -> Result<()> {
    if events.len() > MAX_INPUT_EVENTS {
        return Err(Error::invalid(
            "input",
            format!("{} events in one batch", events.len()),
            format!("send at most {MAX_INPUT_EVENTS} events at a time"),
        ));
    }
    for e in events {
        match e {
            InputEvent::Move { x, y } if *x > ABS_MAX || *y > ABS_MAX => {
                return Err(Error::invalid(
                    "input",
                    format!("pointer position {x},{y} is outside 0..={ABS_MAX}"),
                    "scale screen coordinates to the absolute axis range",
                ));
            }
            InputEvent::Key { qcode, .. }
                if qcode.is_empty()
                    || qcode.len() > 32
                    || !qcode
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
            {
                return Err(Error::invalid(
                    "input",
                    format!("{qcode:?} is not a key code"),
                    "use a QEMU QKeyCode name such as a, shift, ret",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The error of a screen call on a VM without a display.
pub fn no_display() -> Error {
    Error::invalid(
        "display",
        "this VM has no display",
        "create the sandbox with a display, e.g. --display 1280x800",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_bounds() {
        let d: DisplaySpec = "1280x800".parse().unwrap();
        assert_eq!(d, DisplaySpec::new(1280, 800));
        assert!("320x200".parse::<DisplaySpec>().is_ok());
        assert!("3840x2160".parse::<DisplaySpec>().is_ok());
        for bad in [
            "",
            "1280",
            "x800",
            "319x200",
            "3842x2160",
            "1281x800",
            "1280x2161",
            "ax b",
        ] {
            let e = bad.parse::<DisplaySpec>().unwrap_err().to_string();
            assert!(e.contains("Fix"), "{bad}: {e}");
        }
    }

    #[test]
    fn vram_fits_two_frames() {
        assert_eq!(DisplaySpec::new(1280, 800).vram_bytes(), 16 << 20);
        let d = DisplaySpec::new(3840, 2160);
        assert!(d.vram_bytes() >= 3840 * 2160 * 8);
        assert!(d.vram_bytes().is_power_of_two());
    }

    #[test]
    fn input_is_checked() {
        assert!(check_input(&[InputEvent::Move { x: ABS_MAX, y: 0 }]).is_ok());
        assert!(check_input(&[InputEvent::Move {
            x: ABS_MAX + 1,
            y: 0
        }])
        .is_err());
        let key = |q: &str| InputEvent::Key {
            qcode: q.into(),
            down: true,
        };
        assert!(check_input(&[key("shift_r")]).is_ok());
        assert!(check_input(&[key("a,b")]).is_err());
        assert!(check_input(&[key("")]).is_err());
        assert!(check_input(&vec![key("a"); MAX_INPUT_EVENTS + 1]).is_err());
    }
}
