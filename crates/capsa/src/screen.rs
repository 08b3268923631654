//! The guest's screen from the host: screenshots and input.
//!
//! QEMU dumps the framebuffer as a binary PPM (a plain copy; PNG encoding
//! inside QEMU stalls its main loop), capsa parses it as untrusted input
//! (the guest chose the mode and the pixels), optionally crops and
//! downscales it, and encodes PNG. Input goes to the VM's virtio tablet and
//! keyboard: pointer coordinates are screen pixels, scaled to the tablet's
//! 0..=32767 axes; keys are named as xdotool/X keysyms (`ctrl+c`, `Return`,
//! `shift+Tab`) or CUA names (`ENTER`, `ARROWLEFT`); text is typed on a US
//! layout, and characters it cannot express are refused, never dropped.
//!
//! Everything here but [`Screen`] is pure and unit-tested.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use capsa_core::{DisplaySpec, InputEvent, MouseButton, ABS_MAX};
use serde::{Deserialize, Serialize};

use crate::Sandbox;

/// Most pixels of a dumped frame accepted (4096 x 4096; the largest display
/// is 3840 x 2160, but the guest may program another mode into its VRAM).
pub const MAX_FRAME_PIXELS: u64 = 4096 * 4096;
/// Most actions in one [`Screen::perform`] batch.
pub const MAX_ACTIONS: usize = 256;
/// Longest text one `type` action may type (characters).
pub const MAX_TYPE_CHARS: usize = 4096;
/// Most characters typed by one batch: typing is paced ([`TYPE_GAP`]), so
/// this bounds how long one batch holds the screen (~40 s).
pub const MAX_BATCH_TYPE_CHARS: usize = 8192;
/// Most points of one drag path.
pub const MAX_DRAG_POINTS: usize = 1024;
/// Most wheel notches in one scroll.
pub const MAX_SCROLL: u32 = 100;
/// Longest single wait (milliseconds); a whole batch waits at most
/// [`MAX_BATCH_WAIT_MS`].
pub const MAX_WAIT_MS: u64 = 10_000;
/// Longest total wait of one batch (milliseconds).
pub const MAX_BATCH_WAIT_MS: u64 = 30_000;
/// Most keys in one combination.
pub const MAX_COMBO_KEYS: usize = 8;
/// Pause after each typed character (see [`Screen::perform`]): ~200 characters a second.
pub const TYPE_GAP: Duration = Duration::from_millis(5);

/// What the screen calls fail with; each names the problem and the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScreenError {
    /// The sandbox was created without a display.
    #[error("this sandbox has no display. Fix: create it with a display, e.g. --display 1280x800 (SandboxBuilder::display)")]
    NoDisplay,
    /// The dumped frame is not a PPM capsa accepts.
    #[error("the screen dump is not a usable PPM: {0}. Fix: retry; if it persists, the guest programmed an unusable display mode")]
    BadFrame(String),
    /// A region, point or size falls outside the screen.
    #[error("{what} is outside the {width}x{height} screen. Fix: use coordinates in 0..{width} x 0..{height}")]
    OutOfScreen {
        /// The offending value.
        what: String,
        /// Screen width.
        width: u32,
        /// Screen height.
        height: u32,
    },
    /// A key name is unknown.
    #[error("unknown key {0:?}. Fix: use an X keysym name (Return, Tab, ctrl, shift, alt, super, F1, Left, Page_Up, a, 1, ...) or a CUA name (ENTER, ARROWLEFT, ...); join a combination with + (ctrl+c); write + as plus")]
    UnknownKey(String),
    /// Text holds characters the US keyboard layout cannot type.
    #[error("cannot type {chars:?} on a US keyboard. Fix: type only printable ASCII, newline and tab, or send the characters another way (e.g. the files API)")]
    Untypable {
        /// The characters that cannot be typed (each once, in order of appearance).
        chars: String,
    },
    /// A request exceeds a bound.
    #[error("{0}")]
    TooLarge(String),
    /// An option does not fit the request (e.g. a quality for a lossless format).
    #[error("{0}")]
    BadOption(String),
    /// Encoding the image failed.
    #[error("cannot encode the screenshot: {0}")]
    Encode(String),
}

/// A rectangle of the screen, in screen pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Region {
    /// Left edge.
    pub x: u32,
    /// Top edge.
    pub y: u32,
    /// Width (at least 1).
    pub width: u32,
    /// Height (at least 1).
    pub height: u32,
}

impl std::str::FromStr for Region {
    type Err = String;
    /// Parses `x,y,w,h`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let v: Vec<u32> = s
            .split(',')
            .map(|p| p.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| format!("{s:?} is not x,y,width,height (e.g. 0,0,640,400)"))?;
        match v[..] {
            [x, y, width, height] => Ok(Self {
                x,
                y,
                width,
                height,
            }),
            _ => Err(format!("{s:?} is not x,y,width,height (e.g. 0,0,640,400)")),
        }
    }
}

/// How to take a screenshot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShotOptions {
    /// Only this part of the screen (default: all of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<Region>,
    /// Downscale (keeping the aspect ratio) so the image is at most this wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_width: Option<u32>,
    /// The encoding (default PNG).
    #[serde(default)]
    pub format: ImageFormat,
    /// JPEG quality, 1..=100 (default [`DEFAULT_JPEG_QUALITY`]); refused for
    /// the lossless formats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<u8>,
}

/// JPEG quality when none is asked for: text stays legible for a model.
pub const DEFAULT_JPEG_QUALITY: u8 = 80;

/// How a screenshot is encoded. PNG and WebP are lossless (pixels exact);
/// JPEG is smaller for photos and video frames, at a loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// PNG, fastest compression.
    #[default]
    Png,
    /// Baseline JPEG, 4:2:0.
    Jpeg,
    /// Lossless WebP (VP8L).
    Webp,
}

impl ImageFormat {
    /// The lowercase name (`png`, `jpeg`, `webp`), as on the wire.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Png => "png",
            ImageFormat::Jpeg => "jpeg",
            ImageFormat::Webp => "webp",
        }
    }

    /// The media type.
    pub fn mime(self) -> &'static str {
        match self {
            ImageFormat::Png => "image/png",
            ImageFormat::Jpeg => "image/jpeg",
            ImageFormat::Webp => "image/webp",
        }
    }

    /// The format a file name's extension names, if any (`.png`, `.jpg`/`.jpeg`, `.webp`).
    pub fn from_extension(path: &std::path::Path) -> Option<Self> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "png" => Some(ImageFormat::Png),
            "jpg" | "jpeg" => Some(ImageFormat::Jpeg),
            "webp" => Some(ImageFormat::Webp),
            _ => None,
        }
    }
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Ok(ImageFormat::Png),
            "jpeg" | "jpg" => Ok(ImageFormat::Jpeg),
            "webp" => Ok(ImageFormat::Webp),
            _ => Err(format!("unknown image format {s:?}; use png, jpeg or webp")),
        }
    }
}

/// An encoded screenshot and how its pixels map back to the screen:
/// screen x = `x + image_x / scale`, screen y = `y + image_y / scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Screenshot {
    /// The encoded image file.
    #[serde(skip)]
    pub data: Vec<u8>,
    /// Its encoding.
    pub format: ImageFormat,
    /// Image width.
    pub width: u32,
    /// Image height.
    pub height: u32,
    /// Image pixels per screen pixel (1.0 unless downscaled).
    pub scale: f64,
    /// Left edge of the captured region on the screen.
    pub x: u32,
    /// Top edge of the captured region on the screen.
    pub y: u32,
    /// The whole screen's width when the dump was taken.
    pub screen_width: u32,
    /// The whole screen's height when the dump was taken.
    pub screen_height: u32,
}

/// A decoded frame: packed RGB, row-major, no padding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// `width * height * 3` bytes.
    pub rgb: Vec<u8>,
}

impl Frame {
    /// The pixel at `(x, y)`, if inside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<[u8; 3]> {
        if x >= self.width || y >= self.height {
            return None;
        }
        let i = (y as usize * self.width as usize + x as usize) * 3;
        Some([self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]])
    }

    /// The part of the frame inside `r`.
    pub fn crop(&self, r: Region) -> Result<Frame, ScreenError> {
        let fits = r.width > 0
            && r.height > 0
            && r.x.checked_add(r.width).is_some_and(|e| e <= self.width)
            && r.y.checked_add(r.height).is_some_and(|e| e <= self.height);
        if !fits {
            return Err(ScreenError::OutOfScreen {
                what: format!("region {},{},{},{}", r.x, r.y, r.width, r.height),
                width: self.width,
                height: self.height,
            });
        }
        let row = self.width as usize * 3;
        let mut rgb = Vec::with_capacity(r.width as usize * r.height as usize * 3);
        for y in r.y..r.y + r.height {
            let start = y as usize * row + r.x as usize * 3;
            rgb.extend_from_slice(&self.rgb[start..start + r.width as usize * 3]);
        }
        Ok(Frame {
            width: r.width,
            height: r.height,
            rgb,
        })
    }

    /// Downscales to `width` pixels wide (keeping the aspect ratio) by
    /// sampling each output pixel's centre; a no-op if already narrower.
    pub fn downscale(&self, width: u32) -> Frame {
        if width == 0 || width >= self.width {
            return self.clone();
        }
        let height =
            ((u64::from(self.height) * u64::from(width)) / u64::from(self.width)).max(1) as u32;
        let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
        let src_x: Vec<usize> = (0..width)
            .map(|x| {
                ((2 * u64::from(x) + 1) * u64::from(self.width) / (2 * u64::from(width))) as usize
            })
            .collect();
        for y in 0..height {
            let sy = ((2 * u64::from(y) + 1) * u64::from(self.height) / (2 * u64::from(height)))
                as usize;
            let row = &self.rgb[sy * self.width as usize * 3..(sy + 1) * self.width as usize * 3];
            for &sx in &src_x {
                rgb.extend_from_slice(&row[sx * 3..sx * 3 + 3]);
            }
        }
        Frame { width, height, rgb }
    }

    /// Encodes the frame as PNG (fast compression).
    pub fn to_png(&self) -> Result<Vec<u8>, ScreenError> {
        let mut out = Vec::with_capacity(self.rgb.len() / 4 + 1024);
        let mut enc = png::Encoder::new(&mut out, self.width, self.height);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        // fdeflate's ultra-fast mode with the Up filter: screens are mostly
        // runs and repeated rows; adaptive filtering doubled the encode time.
        enc.set_compression(png::Compression::Fastest);
        let mut w = enc
            .write_header()
            .map_err(|e| ScreenError::Encode(e.to_string()))?;
        w.write_image_data(&self.rgb)
            .map_err(|e| ScreenError::Encode(e.to_string()))?;
        w.finish().map_err(|e| ScreenError::Encode(e.to_string()))?;
        Ok(out)
    }

    /// Encodes the frame as baseline JPEG at `quality` (1..=100).
    pub fn to_jpeg(&self, quality: u8) -> Result<Vec<u8>, ScreenError> {
        let (Ok(w), Ok(h)) = (u16::try_from(self.width), u16::try_from(self.height)) else {
            return Err(ScreenError::Encode(format!(
                "{}x{} is larger than JPEG allows (65535x65535)",
                self.width, self.height
            )));
        };
        let mut out = Vec::with_capacity(self.rgb.len() / 8 + 1024);
        jpeg_encoder::Encoder::new(&mut out, quality)
            .encode(&self.rgb, w, h, jpeg_encoder::ColorType::Rgb)
            .map_err(|e| ScreenError::Encode(e.to_string()))?;
        Ok(out)
    }

    /// Encodes the frame as lossless WebP.
    pub fn to_webp(&self) -> Result<Vec<u8>, ScreenError> {
        let mut out = Vec::with_capacity(self.rgb.len() / 4 + 1024);
        image_webp::WebPEncoder::new(&mut out)
            .encode(
                &self.rgb,
                self.width,
                self.height,
                image_webp::ColorType::Rgb8,
            )
            .map_err(|e| ScreenError::Encode(e.to_string()))?;
        Ok(out)
    }
}

/// Parses a binary PPM (P6, maxval 255) as QEMU's screendump writes it.
/// Untrusted: sizes are bounded and nothing panics.
pub fn parse_ppm(data: &[u8]) -> Result<Frame, ScreenError> {
    let bad = |why: &str| ScreenError::BadFrame(why.to_string());
    let mut pos = 0usize;
    // Header: magic, width, height, maxval, separated by whitespace, with
    // `#` comments; one whitespace byte before the pixels.
    let mut fields: Vec<u64> = Vec::with_capacity(3);
    if data.get(..2) != Some(b"P6") {
        return Err(bad("no P6 magic"));
    }
    pos += 2;
    while fields.len() < 3 {
        match data.get(pos) {
            None => return Err(bad("truncated header")),
            Some(b'#') => {
                while data.get(pos).is_some_and(|&b| b != b'\n') {
                    pos += 1;
                }
            }
            Some(b) if b.is_ascii_whitespace() => pos += 1,
            Some(b) if b.is_ascii_digit() => {
                let mut v: u64 = 0;
                let mut digits = 0;
                while let Some(d) = data.get(pos).filter(|b| b.is_ascii_digit()) {
                    digits += 1;
                    if digits > 9 {
                        return Err(bad("header number too long"));
                    }
                    v = v * 10 + u64::from(d - b'0');
                    pos += 1;
                }
                fields.push(v);
            }
            Some(_) => return Err(bad("unexpected byte in header")),
        }
    }
    if !data.get(pos).is_some_and(|b| b.is_ascii_whitespace()) {
        return Err(bad("no separator after the header"));
    }
    pos += 1;
    let (width, height, maxval) = (fields[0], fields[1], fields[2]);
    if maxval != 255 {
        return Err(bad("only 8-bit PPMs are supported"));
    }
    if width == 0 || height == 0 || width * height > MAX_FRAME_PIXELS {
        return Err(ScreenError::BadFrame(format!(
            "{width}x{height} is not a frame size capsa accepts"
        )));
    }
    let len = (width * height * 3) as usize;
    let pixels = data
        .get(pos..)
        .filter(|p| p.len() >= len)
        .ok_or_else(|| bad("truncated pixel data"))?;
    Ok(Frame {
        width: width as u32,
        height: height as u32,
        rgb: pixels[..len].to_vec(),
    })
}

/// Crops, downscales and encodes `frame` as `opts` asks.
pub fn render(frame: &Frame, opts: &ShotOptions) -> Result<Screenshot, ScreenError> {
    let quality = check_quality(opts)?;
    let region = opts.region.unwrap_or(Region {
        x: 0,
        y: 0,
        width: frame.width,
        height: frame.height,
    });
    let cropped;
    let part = if opts.region.is_some() {
        cropped = frame.crop(region)?;
        &cropped
    } else {
        frame
    };
    let scaled;
    let (img, scale) = match opts.max_width {
        Some(0) => {
            return Err(ScreenError::TooLarge(
                "max_width 0 leaves no image. Fix: ask for a max_width of at least 1".into(),
            ))
        }
        Some(w) if w < part.width => {
            scaled = part.downscale(w);
            (&scaled, f64::from(w) / f64::from(part.width))
        }
        _ => (part, 1.0),
    };
    let data = match opts.format {
        ImageFormat::Png => img.to_png()?,
        ImageFormat::Jpeg => img.to_jpeg(quality)?,
        ImageFormat::Webp => img.to_webp()?,
    };
    Ok(Screenshot {
        data,
        format: opts.format,
        width: img.width,
        height: img.height,
        scale,
        x: region.x,
        y: region.y,
        screen_width: frame.width,
        screen_height: frame.height,
    })
}

/// The JPEG quality `opts` asks for; a quality is refused for lossless
/// formats (it would silently mean nothing) and outside 1..=100.
fn check_quality(opts: &ShotOptions) -> Result<u8, ScreenError> {
    match (opts.format, opts.quality) {
        (ImageFormat::Jpeg, None) => Ok(DEFAULT_JPEG_QUALITY),
        (ImageFormat::Jpeg, Some(q @ 1..=100)) => Ok(q),
        (ImageFormat::Jpeg, Some(q)) => Err(ScreenError::BadOption(format!(
            "JPEG quality {q} is outside 1..=100. Fix: ask for a quality from 1 (smallest) to 100 (best)"
        ))),
        (f, Some(_)) => Err(ScreenError::BadOption(format!(
            "a quality was given for {f}, which is lossless. Fix: leave the quality out, or ask for jpeg"
        ))),
        (_, None) => Ok(0),
    }
}

/// A pointer button (the wheel is [`ScreenAction::Scroll`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Button {
    /// The primary button.
    #[default]
    Left,
    /// The middle button.
    Middle,
    /// The secondary button.
    Right,
}

impl Button {
    fn device(self) -> MouseButton {
        match self {
            Button::Left => MouseButton::Left,
            Button::Middle => MouseButton::Middle,
            Button::Right => MouseButton::Right,
        }
    }
}

/// Which way to scroll.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScrollDirection {
    /// Content moves down (wheel away from the user).
    Up,
    /// Wheel towards the user.
    Down,
    /// Horizontal, left.
    Left,
    /// Horizontal, right.
    Right,
}

impl std::str::FromStr for ScrollDirection {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "up" => Ok(Self::Up),
            "down" => Ok(Self::Down),
            "left" => Ok(Self::Left),
            "right" => Ok(Self::Right),
            _ => Err(format!(
                "{s:?} is not a direction; use up, down, left or right"
            )),
        }
    }
}

fn one() -> u32 {
    1
}

/// One step of a computer-use batch; coordinates are screen pixels.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "action", deny_unknown_fields)]
pub enum ScreenAction {
    /// Moves the pointer.
    Move {
        /// Screen x.
        x: u32,
        /// Screen y.
        y: u32,
    },
    /// Moves the pointer there and clicks `count` times (2: double-click).
    Click {
        /// Screen x.
        x: u32,
        /// Screen y.
        y: u32,
        /// The button (default left).
        #[serde(default)]
        button: Button,
        /// Clicks (1-3, default 1).
        #[serde(default = "one")]
        count: u32,
    },
    /// Presses a button where the pointer is.
    ButtonDown {
        /// The button (default left).
        #[serde(default)]
        button: Button,
    },
    /// Releases a button where the pointer is.
    ButtonUp {
        /// The button (default left).
        #[serde(default)]
        button: Button,
    },
    /// Presses the button at the first point, moves through the others and
    /// releases it at the last.
    Drag {
        /// At least two points, `[x, y]` each.
        path: Vec<[u32; 2]>,
        /// The button (default left).
        #[serde(default)]
        button: Button,
    },
    /// Turns the wheel `amount` notches, at `x,y` if given.
    Scroll {
        /// Which way.
        direction: ScrollDirection,
        /// Notches (1-100, default 1).
        #[serde(default = "one")]
        amount: u32,
        /// Screen x to scroll at (with `y`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        x: Option<u32>,
        /// Screen y to scroll at (with `x`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        y: Option<u32>,
    },
    /// Presses a key combination and releases it (`ctrl+c`, `Return`, `shift+Tab`).
    Key {
        /// The combination.
        keys: String,
    },
    /// Types text on a US layout.
    Type {
        /// The text.
        text: String,
    },
    /// Waits (at most 10 s) before the next action.
    Wait {
        /// Milliseconds.
        ms: u64,
    },
}

impl std::str::FromStr for ScreenAction {
    type Err = String;
    /// The CLI form: `move:X,Y`, `click:X,Y[,right|middle][,2]`,
    /// `doubleclick:X,Y`, `down[:BUTTON]`, `up[:BUTTON]`,
    /// `drag:X1,Y1,X2,Y2[,...]`, `scroll:DIR[,N][,X,Y]`, `key:COMBO`,
    /// `type:TEXT`, `wait:MS`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (verb, arg) = s.split_once(':').unwrap_or((s, ""));
        let nums = |a: &str| -> std::result::Result<Vec<u32>, String> {
            a.split(',')
                .map(|p| p.trim().parse::<u32>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| format!("{s:?}: {a:?} is not a list of numbers"))
        };
        let button = |a: &str| -> std::result::Result<Button, String> {
            match a {
                "" | "left" => Ok(Button::Left),
                "middle" => Ok(Button::Middle),
                "right" => Ok(Button::Right),
                _ => Err(format!("{s:?}: {a:?} is not left, middle or right")),
            }
        };
        match verb {
            "move" => match nums(arg)?[..] {
                [x, y] => Ok(Self::Move { x, y }),
                _ => Err(format!("{s:?}: write move:X,Y")),
            },
            "click" | "doubleclick" | "double_click" => {
                let mut parts = arg.split(',');
                let coords: Vec<&str> = parts.by_ref().take(2).collect();
                let [x, y] = nums(&coords.join(","))?[..] else {
                    return Err(format!("{s:?}: write click:X,Y[,right][,2]"));
                };
                let mut b = Button::Left;
                let mut count = if verb == "click" { 1 } else { 2 };
                for p in parts {
                    match p.parse::<u32>() {
                        Ok(n) => count = n,
                        Err(_) => b = button(p)?,
                    }
                }
                Ok(Self::Click {
                    x,
                    y,
                    button: b,
                    count,
                })
            }
            "down" => Ok(Self::ButtonDown {
                button: button(arg)?,
            }),
            "up" => Ok(Self::ButtonUp {
                button: button(arg)?,
            }),
            "drag" => {
                let v = nums(arg)?;
                if v.len() < 4 || v.len() % 2 != 0 {
                    return Err(format!("{s:?}: write drag:X1,Y1,X2,Y2[,...]"));
                }
                Ok(Self::Drag {
                    path: v.chunks_exact(2).map(|c| [c[0], c[1]]).collect(),
                    button: Button::Left,
                })
            }
            "scroll" => {
                let mut parts = arg.splitn(2, ',');
                let direction = parts.next().unwrap_or("").parse()?;
                let rest = parts.next().map(nums).transpose()?.unwrap_or_default();
                let (amount, x, y) = match rest[..] {
                    [] => (1, None, None),
                    [n] => (n, None, None),
                    [n, x, y] => (n, Some(x), Some(y)),
                    _ => return Err(format!("{s:?}: write scroll:DIR[,N][,X,Y]")),
                };
                Ok(Self::Scroll {
                    direction,
                    amount,
                    x,
                    y,
                })
            }
            "key" => Ok(Self::Key { keys: arg.into() }),
            "type" => Ok(Self::Type { text: arg.into() }),
            "wait" => Ok(Self::Wait {
                ms: arg
                    .parse()
                    .map_err(|_| format!("{s:?}: write wait:MILLISECONDS"))?,
            }),
            _ => Err(format!(
                "{s:?}: unknown action; use move, click, doubleclick, down, up, drag, scroll, key, type or wait"
            )),
        }
    }
}

/// The tablet position of screen pixel `(x, y)`: the centre of the pixel on
/// the 0..=32767 axes, so that a guest mapping `abs * size / 32768` (or
/// `/ 32767`) lands on exactly that pixel.
pub fn abs_position(display: DisplaySpec, x: u32, y: u32) -> Result<InputEvent, ScreenError> {
    if x >= display.width || y >= display.height {
        return Err(ScreenError::OutOfScreen {
            what: format!("point {x},{y}"),
            width: display.width,
            height: display.height,
        });
    }
    let axis = |v: u32, size: u32| {
        let range = u64::from(ABS_MAX) + 1;
        (((2 * u64::from(v) + 1) * range) / (2 * u64::from(size))).min(u64::from(ABS_MAX)) as u32
    };
    Ok(InputEvent::Move {
        x: axis(x, display.width),
        y: axis(y, display.height),
    })
}

/// The QEMU key code of a key name (X keysym, CUA or a single character),
/// and whether the character needs shift.
pub fn key_code(name: &str) -> Option<(&'static str, bool)> {
    let mut chars = name.chars();
    if let (Some(c), None) = (chars.next(), chars.clone().next()) {
        return char_key(c);
    }
    let norm: String = name
        .chars()
        .filter(|c| *c != '_' && *c != '-')
        .collect::<String>()
        .to_ascii_lowercase();
    let code = match norm.as_str() {
        "return" | "enter" | "ret" => "ret",
        "kpenter" => "kp_enter",
        "tab" => "tab",
        "escape" | "esc" => "esc",
        "backspace" => "backspace",
        "delete" | "del" => "delete",
        "insert" | "ins" => "insert",
        "home" => "home",
        "end" => "end",
        "pageup" | "prior" | "pgup" => "pgup",
        "pagedown" | "next" | "pgdn" => "pgdn",
        "left" | "arrowleft" => "left",
        "right" | "arrowright" => "right",
        "up" | "arrowup" => "up",
        "down" | "arrowdown" => "down",
        "space" | "spc" => "spc",
        "ctrl" | "control" | "controll" | "ctrll" => "ctrl",
        "controlr" | "ctrlr" => "ctrl_r",
        "shift" | "shiftl" => "shift",
        "shiftr" => "shift_r",
        "alt" | "altl" | "option" => "alt",
        "altr" | "altgr" | "isolevel3shift" => "alt_r",
        "super" | "superl" | "meta" | "metal" | "cmd" | "command" | "win" | "windows" => "meta_l",
        "superr" | "metar" => "meta_r",
        "menu" => "menu",
        "capslock" => "caps_lock",
        "numlock" => "num_lock",
        "scrolllock" => "scroll_lock",
        "print" | "printscreen" => "print",
        "pause" => "pause",
        "plus" => return Some(("equal", true)),
        "minus" => "minus",
        "equal" => "equal",
        "comma" => "comma",
        "period" | "dot" => "dot",
        "slash" => "slash",
        "backslash" => "backslash",
        "semicolon" => "semicolon",
        "apostrophe" | "quoteright" => "apostrophe",
        "grave" | "quoteleft" => "grave_accent",
        "bracketleft" => "bracket_left",
        "bracketright" => "bracket_right",
        f if f.starts_with('f') && f.len() <= 3 => {
            const F: [&str; 24] = [
                "f1", "f2", "f3", "f4", "f5", "f6", "f7", "f8", "f9", "f10", "f11", "f12", "f13",
                "f14", "f15", "f16", "f17", "f18", "f19", "f20", "f21", "f22", "f23", "f24",
            ];
            let n: usize = f[1..].parse().ok()?;
            return F.get(n.checked_sub(1)?).map(|c| (*c, false));
        }
        _ => return None,
    };
    Some((code, false))
}

/// The QEMU key code typing `c` on a US layout, and whether it needs shift.
pub fn char_key(c: char) -> Option<(&'static str, bool)> {
    const LETTERS: [&str; 26] = [
        "a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l", "m", "n", "o", "p", "q", "r",
        "s", "t", "u", "v", "w", "x", "y", "z",
    ];
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    Some(match c {
        'a'..='z' => (LETTERS[(c as u8 - b'a') as usize], false),
        'A'..='Z' => (LETTERS[(c as u8 - b'A') as usize], true),
        '0'..='9' => (DIGITS[(c as u8 - b'0') as usize], false),
        ' ' => ("spc", false),
        '\n' => ("ret", false),
        '\t' => ("tab", false),
        '`' => ("grave_accent", false),
        '~' => ("grave_accent", true),
        '!' => ("1", true),
        '@' => ("2", true),
        '#' => ("3", true),
        '$' => ("4", true),
        '%' => ("5", true),
        '^' => ("6", true),
        '&' => ("7", true),
        '*' => ("8", true),
        '(' => ("9", true),
        ')' => ("0", true),
        '-' => ("minus", false),
        '_' => ("minus", true),
        '=' => ("equal", false),
        '+' => ("equal", true),
        '[' => ("bracket_left", false),
        '{' => ("bracket_left", true),
        ']' => ("bracket_right", false),
        '}' => ("bracket_right", true),
        '\\' => ("backslash", false),
        '|' => ("backslash", true),
        ';' => ("semicolon", false),
        ':' => ("semicolon", true),
        '\'' => ("apostrophe", false),
        '"' => ("apostrophe", true),
        ',' => ("comma", false),
        '<' => ("comma", true),
        '.' => ("dot", false),
        '>' => ("dot", true),
        '/' => ("slash", false),
        '?' => ("slash", true),
        _ => return None,
    })
}

fn key(qcode: &str, down: bool) -> InputEvent {
    InputEvent::Key {
        qcode: qcode.into(),
        down,
    }
}

/// The events of a key combination: each key pressed in order (a frame
/// each), then released in reverse order.
pub fn combo_events(combo: &str) -> Result<Vec<InputEvent>, ScreenError> {
    let combo = combo.trim();
    if combo.is_empty() {
        return Err(ScreenError::UnknownKey(String::new()));
    }
    // A lone "+" is the plus key; otherwise + joins keys.
    let parts: Vec<&str> = if combo == "+" {
        vec!["+"]
    } else {
        combo.split('+').map(str::trim).collect()
    };
    if parts.len() > MAX_COMBO_KEYS {
        return Err(ScreenError::TooLarge(format!(
            "{} keys in one combination. Fix: press at most {MAX_COMBO_KEYS} keys at once",
            parts.len()
        )));
    }
    let mut codes: Vec<&'static str> = Vec::new();
    for p in parts {
        let (code, shift) =
            key_code(p).ok_or_else(|| ScreenError::UnknownKey(p.chars().take(64).collect()))?;
        if shift && !codes.contains(&"shift") {
            codes.push("shift");
        }
        codes.push(code);
    }
    let mut ev = Vec::with_capacity(codes.len() * 4);
    for c in &codes {
        ev.push(key(c, true));
        ev.push(InputEvent::Sync);
    }
    for c in codes.iter().rev() {
        ev.push(key(c, false));
        ev.push(InputEvent::Sync);
    }
    Ok(ev)
}

/// The events typing `text` on a US layout; every character it cannot type
/// is named in the error (nothing is typed then).
pub fn type_events(text: &str) -> Result<Vec<InputEvent>, ScreenError> {
    if text.chars().count() > MAX_TYPE_CHARS {
        return Err(ScreenError::TooLarge(format!(
            "text of {} characters. Fix: type at most {MAX_TYPE_CHARS} characters per action",
            text.chars().count()
        )));
    }
    let mut bad = String::new();
    let mut ev = Vec::with_capacity(text.len() * 4);
    for c in text.chars() {
        match char_key(c) {
            Some((code, shift)) => {
                if shift {
                    ev.push(key("shift", true));
                    ev.push(InputEvent::Sync);
                }
                ev.push(key(code, true));
                ev.push(InputEvent::Sync);
                ev.push(key(code, false));
                ev.push(InputEvent::Sync);
                if shift {
                    ev.push(key("shift", false));
                    ev.push(InputEvent::Sync);
                }
            }
            None if !bad.contains(c) => bad.push(c),
            None => {}
        }
    }
    if !bad.is_empty() {
        return Err(ScreenError::Untypable { chars: bad });
    }
    Ok(ev)
}

/// The input events of `action` on `display` (waits have none).
pub fn action_events(
    display: DisplaySpec,
    action: &ScreenAction,
) -> Result<Vec<InputEvent>, ScreenError> {
    let btn = |b: MouseButton, down| InputEvent::Button { button: b, down };
    Ok(match action {
        ScreenAction::Move { x, y } => vec![abs_position(display, *x, *y)?],
        ScreenAction::Click {
            x,
            y,
            button,
            count,
        } => {
            if !(1..=3).contains(count) {
                return Err(ScreenError::TooLarge(format!(
                    "{count} clicks. Fix: click 1 to 3 times"
                )));
            }
            let mut ev = vec![abs_position(display, *x, *y)?, InputEvent::Sync];
            for _ in 0..*count {
                ev.extend([
                    btn(button.device(), true),
                    InputEvent::Sync,
                    btn(button.device(), false),
                    InputEvent::Sync,
                ]);
            }
            ev
        }
        ScreenAction::ButtonDown { button } => vec![btn(button.device(), true)],
        ScreenAction::ButtonUp { button } => vec![btn(button.device(), false)],
        ScreenAction::Drag { path, button } => {
            if path.len() < 2 || path.len() > MAX_DRAG_POINTS {
                return Err(ScreenError::TooLarge(format!(
                    "a drag path of {} points. Fix: give 2 to {MAX_DRAG_POINTS} points",
                    path.len()
                )));
            }
            let mut ev = Vec::with_capacity(path.len() * 2 + 4);
            for (i, [x, y]) in path.iter().enumerate() {
                ev.push(abs_position(display, *x, *y)?);
                ev.push(InputEvent::Sync);
                if i == 0 {
                    ev.push(btn(button.device(), true));
                    ev.push(InputEvent::Sync);
                }
            }
            ev.push(btn(button.device(), false));
            ev
        }
        ScreenAction::Scroll {
            direction,
            amount,
            x,
            y,
        } => {
            if !(1..=MAX_SCROLL).contains(amount) {
                return Err(ScreenError::TooLarge(format!(
                    "a scroll of {amount} notches. Fix: scroll 1 to {MAX_SCROLL} notches"
                )));
            }
            let mut ev = Vec::new();
            match (x, y) {
                (Some(x), Some(y)) => {
                    ev.push(abs_position(display, *x, *y)?);
                    ev.push(InputEvent::Sync);
                }
                (None, None) => {}
                _ => {
                    return Err(ScreenError::TooLarge(
                        "a scroll with only one of x and y. Fix: give both or neither".into(),
                    ))
                }
            }
            let wheel = match direction {
                ScrollDirection::Up => MouseButton::WheelUp,
                ScrollDirection::Down => MouseButton::WheelDown,
                ScrollDirection::Left => MouseButton::WheelLeft,
                ScrollDirection::Right => MouseButton::WheelRight,
            };
            for _ in 0..*amount {
                ev.extend([
                    btn(wheel, true),
                    InputEvent::Sync,
                    btn(wheel, false),
                    InputEvent::Sync,
                ]);
            }
            ev
        }
        ScreenAction::Key { keys } => combo_events(keys)?,
        ScreenAction::Type { text } => type_events(text)?,
        ScreenAction::Wait { .. } => Vec::new(),
    })
}

/// Checks a batch before anything is sent: its length, its waits and every
/// action's events (so a bad action late in a batch sends nothing).
pub fn check_actions(display: DisplaySpec, actions: &[ScreenAction]) -> Result<(), ScreenError> {
    if actions.len() > MAX_ACTIONS {
        return Err(ScreenError::TooLarge(format!(
            "{} actions in one batch. Fix: send at most {MAX_ACTIONS} per batch",
            actions.len()
        )));
    }
    let mut waited = 0u64;
    let mut typed = 0usize;
    for a in actions {
        if let ScreenAction::Type { text } = a {
            typed = typed.saturating_add(text.chars().count());
            if typed > MAX_BATCH_TYPE_CHARS {
                return Err(ScreenError::TooLarge(format!(
                    "more than {MAX_BATCH_TYPE_CHARS} typed characters in one batch. Fix: split \
                     the text over several batches"
                )));
            }
        }
        if let ScreenAction::Wait { ms } = a {
            if *ms > MAX_WAIT_MS {
                return Err(ScreenError::TooLarge(format!(
                    "a wait of {ms} ms. Fix: wait at most {MAX_WAIT_MS} ms per action"
                )));
            }
            waited += ms;
        }
        action_events(display, a)?;
    }
    if waited > MAX_BATCH_WAIT_MS {
        return Err(ScreenError::TooLarge(format!(
            "{waited} ms of waits in one batch. Fix: wait at most {MAX_BATCH_WAIT_MS} ms per batch"
        )));
    }
    Ok(())
}

/// The screen of a sandbox: screenshots and input (see [`Sandbox::screen`]).
#[derive(Debug, Clone, Copy)]
pub struct Screen<'a> {
    sb: &'a Sandbox,
    display: DisplaySpec,
}

impl Sandbox {
    /// The sandbox's screen; refused if it was created without a display.
    pub fn screen(&self) -> crate::Result<Screen<'_>> {
        let display = self
            .vm
            .spec()
            .display
            .ok_or(crate::Error::Screen(ScreenError::NoDisplay))?;
        Ok(Screen { sb: self, display })
    }
}

impl Screen<'_> {
    /// The display's configured size.
    pub fn display(&self) -> DisplaySpec {
        self.display
    }

    /// The screen as it is now, decoded.
    pub async fn frame(&self) -> crate::Result<Frame> {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let path: PathBuf = self
            .sb
            .vm
            .run_dir()
            .join(format!("screen-{}-{n}.ppm", std::process::id()));
        let dumped = self.sb.vm.instance().screendump(&path).await;
        let read = async {
            dumped?;
            let p = path.clone();
            tokio::task::spawn_blocking(move || read_ppm(&p))
                .await
                .map_err(|e| {
                    crate::Error::io("reading the screen dump", std::io::Error::other(e))
                })?
        }
        .await;
        let _ = std::fs::remove_file(&path);
        read
    }

    /// Takes a screenshot (PNG), cropped and downscaled as `opts` asks.
    pub async fn screenshot_with(&self, opts: &ShotOptions) -> crate::Result<Screenshot> {
        let frame = self.frame().await?;
        let opts = opts.clone();
        tokio::task::spawn_blocking(move || render(&frame, &opts))
            .await
            .map_err(|e| crate::Error::io("encoding the screenshot", std::io::Error::other(e)))?
            .map_err(crate::Error::Screen)
    }

    /// Takes a full-size screenshot (PNG).
    pub async fn screenshot(&self) -> crate::Result<Screenshot> {
        self.screenshot_with(&ShotOptions::default()).await
    }

    /// Performs `actions` in order (checked as a whole first). Typed text goes one character
    /// every [`TYPE_GAP`].
    pub async fn perform(&self, actions: &[ScreenAction]) -> crate::Result<()> {
        check_actions(self.display, actions)?;
        for a in actions {
            if let ScreenAction::Wait { ms } = a {
                tokio::time::sleep(Duration::from_millis(*ms)).await;
                continue;
            }
            if let ScreenAction::Type { text } = a {
                // One character at a time: QEMU drops input events while the guest has
                // not handed back virtio-input's buffers (64 events per device), which a
                // busy TCG guest does slowly; a 30-character line sent at once lost its
                // tail on the desktop image (tests/desktop.rs).
                let mut buf = [0u8; 4];
                for c in text.chars() {
                    let ev = type_events(c.encode_utf8(&mut buf))?;
                    self.sb.vm.instance().send_input(ev).await?;
                    tokio::time::sleep(TYPE_GAP).await;
                }
                continue;
            }
            let ev = action_events(self.display, a)?;
            self.sb.vm.instance().send_input(ev).await?;
        }
        Ok(())
    }

    /// Moves the pointer to screen pixel `(x, y)`.
    pub async fn move_to(&self, x: u32, y: u32) -> crate::Result<()> {
        self.perform(&[ScreenAction::Move { x, y }]).await
    }

    /// Left-clicks at `(x, y)`.
    pub async fn click(&self, x: u32, y: u32) -> crate::Result<()> {
        self.perform(&[ScreenAction::Click {
            x,
            y,
            button: Button::Left,
            count: 1,
        }])
        .await
    }

    /// Double-clicks at `(x, y)`.
    pub async fn double_click(&self, x: u32, y: u32) -> crate::Result<()> {
        self.perform(&[ScreenAction::Click {
            x,
            y,
            button: Button::Left,
            count: 2,
        }])
        .await
    }

    /// Drags with the left button along `path` (screen pixels).
    pub async fn drag(&self, path: &[(u32, u32)]) -> crate::Result<()> {
        self.perform(&[ScreenAction::Drag {
            path: path.iter().map(|&(x, y)| [x, y]).collect(),
            button: Button::Left,
        }])
        .await
    }

    /// Scrolls `amount` notches where the pointer is.
    pub async fn scroll(&self, direction: ScrollDirection, amount: u32) -> crate::Result<()> {
        self.perform(&[ScreenAction::Scroll {
            direction,
            amount,
            x: None,
            y: None,
        }])
        .await
    }

    /// Presses and releases a key combination (`ctrl+c`, `Return`, `ENTER`).
    pub async fn key(&self, keys: &str) -> crate::Result<()> {
        self.perform(&[ScreenAction::Key { keys: keys.into() }])
            .await
    }

    /// Types `text` on a US layout.
    pub async fn type_text(&self, text: &str) -> crate::Result<()> {
        self.perform(&[ScreenAction::Type { text: text.into() }])
            .await
    }
}

fn read_ppm(path: &std::path::Path) -> crate::Result<Frame> {
    use std::io::Read;
    let max = MAX_FRAME_PIXELS * 3 + 4096;
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max).read_to_end(&mut data))
        .map_err(|e| crate::Error::io("reading the screen dump", e))?;
    Ok(parse_ppm(&data)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ppm(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 3]) -> Vec<u8> {
        let mut v = format!("P6\n{w} {h}\n255\n").into_bytes();
        for y in 0..h {
            for x in 0..w {
                v.extend_from_slice(&f(x, y));
            }
        }
        v
    }

    #[test]
    fn formats_round_trip() {
        // A 64x40 picture of flat blocks and a gradient, like a desktop.
        let (w, h) = (64u32, 40u32);
        let px = |x: u32, y: u32| -> [u8; 3] {
            if y < 20 {
                [(x * 4) as u8, (y * 6) as u8, 200]
            } else {
                [30, 30, 30]
            }
        };
        let f = parse_ppm(&ppm(w, h, px)).unwrap();
        let shot = |format, quality| {
            render(
                &f,
                &ShotOptions {
                    format,
                    quality,
                    ..Default::default()
                },
            )
        };
        // WebP is lossless: every pixel comes back.
        let webp = shot(ImageFormat::Webp, None).unwrap();
        assert_eq!(webp.format, ImageFormat::Webp);
        let mut dec = image_webp::WebPDecoder::new(std::io::Cursor::new(&webp.data)).unwrap();
        assert_eq!(dec.dimensions(), (w, h));
        let mut buf = vec![0u8; dec.output_buffer_size().unwrap()];
        dec.read_image(&mut buf).unwrap();
        assert_eq!(buf, f.rgb, "lossless");
        // JPEG is close, and a better quality is closer.
        let err = |q: u8| -> f64 {
            let j = shot(ImageFormat::Jpeg, Some(q)).unwrap();
            assert!(j.data.starts_with(&[0xff, 0xd8]));
            let mut d = jpeg_decoder::Decoder::new(&j.data[..]);
            let out = d.decode().unwrap();
            let info = d.info().unwrap();
            assert_eq!((u32::from(info.width), u32::from(info.height)), (w, h));
            out.iter()
                .zip(&f.rgb)
                .map(|(a, b)| f64::from(a.abs_diff(*b)))
                .sum::<f64>()
                / out.len() as f64
        };
        let (rough, fine) = (err(20), err(95));
        assert!(
            fine < rough && fine < 3.0,
            "mean error q95 {fine}, q20 {rough}"
        );
        assert!(shot(ImageFormat::Jpeg, None).is_ok(), "a default quality");
        // A quality is refused where it would mean nothing, and out of range.
        for (format, q) in [
            (ImageFormat::Png, Some(80)),
            (ImageFormat::Webp, Some(80)),
            (ImageFormat::Jpeg, Some(0)),
            (ImageFormat::Jpeg, Some(101)),
        ] {
            let e = shot(format, q).unwrap_err().to_string();
            assert!(e.contains("Fix"), "{e}");
        }
        assert_eq!("JPG".parse::<ImageFormat>(), Ok(ImageFormat::Jpeg));
        assert!("gif".parse::<ImageFormat>().is_err());
        assert_eq!(
            ImageFormat::from_extension(std::path::Path::new("a/b.WebP")),
            Some(ImageFormat::Webp)
        );
    }

    #[test]
    fn parses_qemu_ppm() {
        let data = ppm(3, 2, |x, y| [x as u8, y as u8, 7]);
        let f = parse_ppm(&data).unwrap();
        assert_eq!((f.width, f.height), (3, 2));
        assert_eq!(f.pixel(2, 1), Some([2, 1, 7]));
        assert_eq!(f.pixel(3, 0), None);
        // Comments in the header.
        let mut c = b"P6\n# made by x\n3 2\n255\n".to_vec();
        c.extend_from_slice(&data[data.len() - 18..]);
        assert_eq!(parse_ppm(&c).unwrap(), f);
    }

    #[test]
    fn refuses_bad_ppm() {
        for bad in [
            &b""[..],
            b"P5\n1 1\n255\n\0",
            b"P6\n1 1\n65535\n\0\0\0\0\0\0",
            b"P6\n0 1\n255\n",
            b"P6\n99999 99999\n255\n",
            b"P6\n2 2\n255\n\0\0\0",
            b"P6\n1234567890123 1\n255\n",
            b"P6 1 1 255",
        ] {
            assert!(parse_ppm(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn crop_and_scale_map_back() {
        let f = parse_ppm(&ppm(8, 4, |x, y| [x as u8, y as u8, 0])).unwrap();
        let c = f
            .crop(Region {
                x: 2,
                y: 1,
                width: 4,
                height: 2,
            })
            .unwrap();
        assert_eq!(c.pixel(0, 0), Some([2, 1, 0]));
        assert_eq!(c.pixel(3, 1), Some([5, 2, 0]));
        assert!(f
            .crop(Region {
                x: 6,
                y: 0,
                width: 3,
                height: 1
            })
            .is_err());
        let s = f.downscale(4);
        assert_eq!((s.width, s.height), (4, 2));
        // Each output pixel samples the centre of its 2x2 source block.
        assert_eq!(s.pixel(0, 0), Some([1, 1, 0]));
        assert_eq!(s.pixel(3, 1), Some([7, 3, 0]));
        let shot = render(
            &f,
            &ShotOptions {
                max_width: Some(4),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!((shot.width, shot.height, shot.scale), (4, 2, 0.5));
        assert!(shot.data.starts_with(b"\x89PNG"));
    }

    #[test]
    fn pointer_lands_on_the_pixel() {
        for (w, h) in [(320u32, 200u32), (1280, 800), (3840, 2160), (1000, 777)] {
            let d = DisplaySpec::new(w, h);
            for (x, y) in [(0, 0), (w - 1, h - 1), (w / 2, h / 3), (17, 5)] {
                let InputEvent::Move { x: ax, y: ay } = abs_position(d, x, y).unwrap() else {
                    panic!()
                };
                assert!(ax <= ABS_MAX && ay <= ABS_MAX);
                assert_eq!(u64::from(ax) * u64::from(w) / 32768, u64::from(x));
                assert_eq!(u64::from(ay) * u64::from(h) / 32768, u64::from(y));
                assert_eq!(u64::from(ax) * u64::from(w) / 32767, u64::from(x));
            }
            assert!(abs_position(d, w, 0).is_err());
        }
    }

    #[test]
    fn key_names() {
        assert_eq!(key_code("Return"), Some(("ret", false)));
        assert_eq!(key_code("ENTER"), Some(("ret", false)));
        assert_eq!(key_code("ARROWLEFT"), Some(("left", false)));
        assert_eq!(key_code("Page_Up"), Some(("pgup", false)));
        assert_eq!(key_code("Control_L"), Some(("ctrl", false)));
        assert_eq!(key_code("F12"), Some(("f12", false)));
        assert_eq!(key_code("F25"), None);
        assert_eq!(key_code("F0"), None);
        assert_eq!(key_code("T"), Some(("t", true)));
        assert_eq!(key_code("nope"), None);
        let ev = combo_events("ctrl+c").unwrap();
        let keys: Vec<(String, bool)> = ev
            .iter()
            .filter_map(|e| match e {
                InputEvent::Key { qcode, down } => Some((qcode.clone(), *down)),
                _ => None,
            })
            .collect();
        assert_eq!(
            keys,
            vec![
                ("ctrl".into(), true),
                ("c".into(), true),
                ("c".into(), false),
                ("ctrl".into(), false)
            ]
        );
        assert!(combo_events("shift+Tab").is_ok());
        assert!(combo_events("+").is_ok());
        assert!(matches!(
            combo_events("ctrl+bogus"),
            Err(ScreenError::UnknownKey(k)) if k == "bogus"
        ));
        assert!(combo_events("ctrl++").is_err());
    }

    #[test]
    fn typing_is_exact_or_refused() {
        let ev = type_events("aB!").unwrap();
        let keys: Vec<String> = ev
            .iter()
            .filter_map(|e| match e {
                InputEvent::Key { qcode, down } => {
                    Some(format!("{qcode}{}", if *down { "+" } else { "-" }))
                }
                _ => None,
            })
            .collect();
        assert_eq!(
            keys,
            ["a+", "a-", "shift+", "b+", "b-", "shift-", "shift+", "1+", "1-", "shift-"]
        );
        // Every printable ASCII character is typable.
        let all: String = (0x20u8..0x7f).map(char::from).collect();
        assert!(type_events(&all).is_ok());
        assert_eq!(
            type_events("héllo wörld é"),
            Err(ScreenError::Untypable {
                chars: "éö".into()
            })
        );
        assert!(type_events(&"a".repeat(MAX_TYPE_CHARS + 1)).is_err());
    }

    #[test]
    fn cli_actions_parse() {
        let p = |s: &str| s.parse::<ScreenAction>().unwrap();
        assert_eq!(
            p("click:100,200"),
            ScreenAction::Click {
                x: 100,
                y: 200,
                button: Button::Left,
                count: 1
            }
        );
        assert_eq!(
            p("click:1,2,right,2"),
            ScreenAction::Click {
                x: 1,
                y: 2,
                button: Button::Right,
                count: 2
            }
        );
        assert_eq!(
            p("scroll:down,3"),
            ScreenAction::Scroll {
                direction: ScrollDirection::Down,
                amount: 3,
                x: None,
                y: None
            }
        );
        assert_eq!(
            p("type:hi: there"),
            ScreenAction::Type {
                text: "hi: there".into()
            }
        );
        assert_eq!(
            p("key:ctrl+c"),
            ScreenAction::Key {
                keys: "ctrl+c".into()
            }
        );
        assert_eq!(
            p("drag:1,2,3,4"),
            ScreenAction::Drag {
                path: vec![[1, 2], [3, 4]],
                button: Button::Left
            }
        );
        for bad in [
            "click:1",
            "drag:1,2,3",
            "scroll:sideways",
            "jump:1,2",
            "wait:x",
        ] {
            assert!(bad.parse::<ScreenAction>().is_err(), "{bad}");
        }
    }

    #[test]
    fn batches_are_bounded() {
        let d = DisplaySpec::new(640, 480);
        assert!(check_actions(d, &[ScreenAction::Move { x: 640, y: 0 }]).is_err());
        assert!(check_actions(
            d,
            &[ScreenAction::Wait {
                ms: MAX_WAIT_MS + 1
            }]
        )
        .is_err());
        assert!(check_actions(d, &vec![ScreenAction::Wait { ms: 10_000 }; 4]).is_err());
        assert!(
            check_actions(d, &vec![ScreenAction::Move { x: 1, y: 1 }; MAX_ACTIONS + 1]).is_err()
        );
        let line = ScreenAction::Type {
            text: "a".repeat(MAX_TYPE_CHARS),
        };
        let two = vec![line.clone(); MAX_BATCH_TYPE_CHARS / MAX_TYPE_CHARS];
        assert!(check_actions(d, &two).is_ok());
        let three = vec![line; MAX_BATCH_TYPE_CHARS / MAX_TYPE_CHARS + 1];
        let e = check_actions(d, &three).unwrap_err().to_string();
        assert!(e.contains("typed characters") && e.contains("Fix"), "{e}");
        assert!(check_actions(
            d,
            &[ScreenAction::Scroll {
                direction: ScrollDirection::Up,
                amount: 0,
                x: None,
                y: None
            }]
        )
        .is_err());
    }

    proptest::proptest! {
        #[test]
        fn ppm_parser_never_panics(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = parse_ppm(&data);
            let mut with_magic = b"P6\n".to_vec();
            with_magic.extend_from_slice(&data);
            let _ = parse_ppm(&with_magic);
        }

        #[test]
        fn crop_scale_never_panic(w in 1u32..40, h in 1u32..40, x in 0u32..50, y in 0u32..50, cw in 0u32..50, ch in 0u32..50, mw in 0u32..60) {
            let f = Frame { width: w, height: h, rgb: vec![9; (w * h * 3) as usize] };
            let opts = ShotOptions { region: Some(Region { x, y, width: cw, height: ch }), max_width: Some(mw), ..Default::default() };
            if let Ok(s) = render(&f, &opts) {
                proptest::prop_assert!(s.width >= 1 && s.height >= 1);
                proptest::prop_assert!(s.width <= cw.max(1));
            }
        }
    }
}
