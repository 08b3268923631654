//! Screenshot encoding of a 1280x800 frame without a VM (busy and flat
//! pictures), PNG next to JPEG (quality 80) and lossless WebP, side by side.
//! `cargo run --release -p capsa --example bench_png`

use std::time::Instant;

use capsa::screen::{render, Frame};
use capsa::{ImageFormat, ShotOptions};

fn main() {
    type Pixel = fn(u32, u32) -> [u8; 3];
    let pictures: [(&str, Pixel); 2] = [
        ("busy", |x, y| [(x ^ y) as u8, y as u8, x as u8]),
        ("flat", |x, y| {
            if (x / 64 + y / 64) % 2 == 0 {
                [240, 240, 240]
            } else {
                [30, 60, 90]
            }
        }),
    ];
    for (label, f) in pictures {
        let mut rgb = Vec::with_capacity(1280 * 800 * 3);
        for y in 0..800 {
            for x in 0..1280 {
                rgb.extend_from_slice(&f(x, y));
            }
        }
        let frame = Frame {
            width: 1280,
            height: 800,
            rgb,
        };
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp] {
            let opts = ShotOptions {
                format,
                ..Default::default()
            };
            let mut v = Vec::new();
            let mut size = 0;
            for _ in 0..21 {
                let t = Instant::now();
                size = render(&frame, &opts).unwrap().data.len();
                v.push(t.elapsed());
            }
            v.sort();
            println!(
                "{label} {format}: encode p50 {:?}, {} KiB",
                v[10],
                size / 1024
            );
        }
    }
}
