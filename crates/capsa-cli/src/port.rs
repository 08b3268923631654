//! `capsa port add|rm|ls`: host ports forwarded into a running sandbox.
//!
//! `-p` on `run`/`create` fixes forwards at start; these add and remove them
//! later, which is how a pooled sandbox (whose snapshot holds no host
//! socket) gets its ports after it is acquired. All through the service, so
//! the same directly and through capsad.

use std::process::ExitCode;

use capsa::PortForward;
use capsa_api::types::{PortForwardBody, PortQuery};

use crate::service::{connect, Conn};

/// `capsa port ...`.
#[derive(clap::Subcommand, Debug)]
pub enum PortCmd {
    /// Forward a host port into a running sandbox: `port add NAME [HOST_IP:]HOSTPORT:GUESTPORT`.
    Add {
        /// The sandbox.
        name: String,
        /// TCP; the host side listens on 127.0.0.1 unless HOST_IP says otherwise.
        #[arg(value_name = "[HOST_IP:]HOSTPORT:GUESTPORT")]
        port: String,
    },
    /// Stop forwarding a host port: `port rm NAME [HOST_IP:]HOSTPORT`.
    Rm {
        /// The sandbox.
        name: String,
        /// The forwarded host port (and address, if not 127.0.0.1).
        #[arg(value_name = "[HOST_IP:]HOSTPORT")]
        port: String,
    },
    /// List a sandbox's forwarded ports.
    Ls {
        /// The sandbox.
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `[HOST_IP:]HOSTPORT` as a removal query (checked as a forward would be).
fn parse_host_port(s: &str) -> anyhow::Result<PortQuery> {
    let (ip, port) = match s.rsplit_once(':') {
        Some((ip, port)) => (ip, port),
        None => ("127.0.0.1", s),
    };
    let f = PortForward::parse(&format!("{ip}:{port}:1"))?;
    Ok(PortQuery {
        host_port: f.host_port,
        host_ip: Some(f.host_ip.to_string()),
    })
}

pub async fn run(conn: &Conn, cmd: PortCmd) -> anyhow::Result<ExitCode> {
    let svc = connect(conn)?;
    match cmd {
        PortCmd::Add { name, port } => {
            let f = PortForward::parse(&port)?;
            svc.port_add(&name, PortForwardBody::of(&f)).await?;
        }
        PortCmd::Rm { name, port } => svc.port_remove(&name, parse_host_port(&port)?).await?,
        PortCmd::Ls { name, json } => {
            let ports = svc.port_list(&name).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&ports)?);
            } else {
                println!("{:<22} GUEST", "HOST");
                for p in ports {
                    let ip = p.host_ip.as_deref().unwrap_or("127.0.0.1");
                    println!("{:<22} {}", format!("{ip}:{}", p.host_port), p.guest_port);
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_parse() {
        let q = parse_host_port("8080").unwrap();
        assert_eq!(
            (q.host_port, q.host_ip.as_deref()),
            (8080, Some("127.0.0.1"))
        );
        let q = parse_host_port("0.0.0.0:81").unwrap();
        assert_eq!((q.host_port, q.host_ip.as_deref()), (81, Some("0.0.0.0")));
        for bad in ["", "0", "x", "1.2.3:80", "99999", "::1:80"] {
            let e = parse_host_port(bad).unwrap_err().to_string();
            assert!(e.contains("fix") || e.contains("Fix"), "{bad}: {e}");
        }
    }
}
