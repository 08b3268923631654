//! The network faces of the CLI: `--network/--allow/--deny` on `run` and
//! `create`, and `capsa network show|log|set NAME`. Kept apart so the faces
//! refactor can move them whole; the substance is in capsa-core (rules,
//! validation) and the library.

use std::process::ExitCode;

use capsa::{Action, NetRule, NetworkMode, NetworkPolicy, NetworkSpec, PortForward};

/// Network flags shared by `run` and `create`.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct NetArgs {
    /// Network: none (no NIC), public (everything but loopback, private and
    /// metadata addresses; the default) or deny (only what --allow names).
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub network: Option<NetworkMode>,
    /// Allow RULE: [tcp:|udp:]TARGET[:PORT[-PORT]], TARGET a domain,
    /// *.domain, IPv4/CIDR, `host` (the host's loopback, at 10.0.2.2) or *.
    /// Repeatable; with --deny, the first matching rule in command-line order wins.
    #[arg(long = "allow", value_name = "RULE")]
    pub allow: Vec<String>,
    /// Deny RULE (same syntax as --allow). Repeatable.
    #[arg(long = "deny", value_name = "RULE")]
    pub deny: Vec<String>,
    /// Forward a host port into the guest: [HOST_IP:]HOSTPORT:GUESTPORT
    /// (TCP; the host side listens on 127.0.0.1 unless HOST_IP says otherwise). Repeatable.
    #[arg(
        short = 'p',
        long = "publish",
        value_name = "[HOST_IP:]HOSTPORT:GUESTPORT"
    )]
    pub publish: Vec<String>,
    /// The rules in command-line order (filled from the parsed matches).
    #[arg(skip)]
    pub ordered: Option<Vec<(Action, String)>>,
}

fn parse_mode(s: &str) -> Result<NetworkMode, String> {
    s.parse::<NetworkMode>().map_err(|e| e.to_string())
}

impl NetArgs {
    /// Records the order in which --allow and --deny were given.
    pub fn take_order(&mut self, m: &clap::ArgMatches) {
        let mut all: Vec<(usize, Action, String)> = Vec::new();
        for (id, action) in [("allow", Action::Allow), ("deny", Action::Deny)] {
            if let (Some(idx), Some(vals)) = (m.indices_of(id), m.get_many::<String>(id)) {
                all.extend(idx.zip(vals).map(|(i, v)| (i, action, v.clone())));
            }
        }
        all.sort_by_key(|(i, _, _)| *i);
        self.ordered = Some(all.into_iter().map(|(_, a, v)| (a, v)).collect());
    }

    fn rules(&self) -> anyhow::Result<Vec<NetRule>> {
        let given: Vec<(Action, String)> = match &self.ordered {
            Some(o) => o.clone(),
            None => self
                .allow
                .iter()
                .map(|r| (Action::Allow, r.clone()))
                .chain(self.deny.iter().map(|r| (Action::Deny, r.clone())))
                .collect(),
        };
        Ok(given
            .iter()
            .map(|(a, r)| NetRule::parse(*a, r))
            .collect::<Result<_, _>>()?)
    }

    /// The sandbox's network; `None` for `--network none`.
    pub fn spec(&self) -> anyhow::Result<Option<NetworkSpec>> {
        let rules = self.rules()?;
        let mode = self.network.unwrap_or(NetworkMode::Public);
        let forwards = self
            .publish
            .iter()
            .map(|p| PortForward::parse(p))
            .collect::<Result<Vec<_>, _>>()?;
        if mode == NetworkMode::None {
            if !forwards.is_empty() {
                anyhow::bail!(
                    "-p with --network none: a sandbox without a NIC cannot take \
                     forwarded ports. Fix: drop --network none (or use --network deny)"
                );
            }
            if !rules.is_empty() {
                anyhow::bail!(
                    "--allow/--deny with --network none: a sandbox without a NIC has no \
                     rules. Fix: use --network deny (only the --allow rules) or public"
                );
            }
            return Ok(None);
        }
        let spec = NetworkSpec {
            policy: NetworkPolicy { mode, rules },
            forwards,
        };
        spec.validate()?;
        Ok(Some(spec))
    }
}

/// `capsa network ...`.
#[derive(clap::Subcommand, Debug)]
pub enum NetworkCmd {
    /// Print the decision log of a sandbox's network: every flow and name, allowed or not, and why.
    Log {
        /// The sandbox.
        name: String,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Print a sandbox's network policy.
    Show {
        /// The sandbox.
        name: String,
    },
    /// Replace a running sandbox's network policy; new connections follow it at once.
    Set {
        /// The sandbox.
        name: String,
        #[command(flatten)]
        net: NetArgs,
    },
}

impl NetworkCmd {
    /// Records rule order for `set`.
    pub fn take_order(&mut self, m: &clap::ArgMatches) {
        if let (NetworkCmd::Set { net, .. }, Some(("set", sm))) = (self, m.subcommand()) {
            net.take_order(sm);
        }
    }
}

/// Runs `capsa network ...` through the service (the monitors, or capsad).
pub async fn run(conn: &crate::service::Conn, cmd: NetworkCmd) -> anyhow::Result<ExitCode> {
    let svc = crate::service::connect(conn)?;
    match cmd {
        NetworkCmd::Log { name, json } => {
            let log = svc.network_log(&name).await?.decisions;
            if json {
                println!("{}", serde_json::to_string_pretty(&log)?);
            } else {
                for d in log {
                    let secs = d.at_ms / 1000;
                    println!(
                        "{secs}.{:03} {:<6} {:<5} {:<28} {}",
                        d.at_ms % 1000,
                        d.kind,
                        if d.allowed { "allow" } else { "deny" },
                        d.what,
                        d.reason
                    );
                }
            }
        }
        NetworkCmd::Show { name } => {
            let p = svc.network_policy(&name).await?.policy;
            println!("mode: {}", p.mode);
            for (i, r) in p.rules.iter().enumerate() {
                println!("{:>3}. {r}", i + 1);
            }
        }
        NetworkCmd::Set { name, net } => {
            let Some(spec) = net.spec()? else {
                anyhow::bail!(
                    "a running sandbox's NIC cannot be removed. Fix: use --network deny \
                     with no --allow to cut it off"
                );
            };
            svc.set_network_policy(
                &name,
                capsa_api::types::NetworkPolicyBody {
                    policy: spec.policy,
                },
            )
            .await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches, Parser};

    #[derive(Parser, Debug)]
    struct T {
        #[command(flatten)]
        net: NetArgs,
    }

    fn parse(args: &[&str]) -> anyhow::Result<Option<NetworkSpec>> {
        let m =
            T::command().try_get_matches_from(std::iter::once("t").chain(args.iter().copied()))?;
        let mut t = T::from_arg_matches(&m)?;
        t.net.take_order(&m);
        t.net.spec()
    }

    #[test]
    fn order_default_and_none() {
        let s = parse(&["--deny", "a.com", "--allow", "*.com", "--deny", "b.com"])
            .unwrap()
            .unwrap();
        let order: Vec<String> = s.policy.rules.iter().map(|r| r.to_string()).collect();
        assert_eq!(order, ["deny a.com", "allow *.com", "deny b.com"]);
        assert_eq!(s.policy.mode, NetworkMode::Public);
        assert!(parse(&["--network", "none"]).unwrap().is_none());
        let e = parse(&["--network", "none", "--allow", "a.com"]).unwrap_err();
        assert!(e.to_string().contains("Fix:"), "{e}");
        assert!(parse(&["--network", "open"]).is_err());
        let s = parse(&["-p", "8080:80", "-p", "0.0.0.0:2222:22"])
            .unwrap()
            .unwrap();
        assert_eq!(s.forwards.len(), 2);
        assert_eq!(s.forwards[0].host_ip, std::net::Ipv4Addr::LOCALHOST);
        assert!(parse(&["--network", "none", "-p", "1:2"]).is_err());
        assert!(parse(&["-p", "80"]).is_err());
        let e = parse(&["--allow", "10.0.0.1/8"]).unwrap_err();
        assert!(e.to_string().contains("Fix:"), "{e}");
    }
}
