//! `capsa-init`: PID 1 inside capsa guests. See the `capsa_guest` library docs.

fn main() {
    if std::process::id() == 1 {
        capsa_guest::pid1::run();
    }
    std::process::exit(capsa_guest::not_pid1(std::env::args().skip(1)));
}
