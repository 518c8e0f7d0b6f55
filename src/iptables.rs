//! `mecha iptables install|uninstall`: the istio-init / linkerd-init step of a transparent sidecar.
//!
//! Install redirects the namespace's TCP traffic into mecha: outbound connections (OUTPUT) to the
//! outbound port (15001), inbound connections (PREROUTING) to the inbound port (15006). Every rule
//! lives in mecha's own `nat` chains (`MECHA_OUTPUT`, `MECHA_REDIRECT`, `MECHA_INBOUND`,
//! `MECHA_IN_REDIRECT`), reached by exactly one jump from `OUTPUT` and one from `PREROUTING`, so
//! uninstall can remove exactly what install added (those jumps and those chains) and nothing else.
//!
//! The rule shapes follow istio-iptables (same order, same loop-avoidance rules): traffic of the
//! proxy's uid/gid is never captured, app → loopback is left alone, and the proxy's own traffic to
//! the pod's own IP over `lo` goes to the inbound side (as Istio does for pod-to-itself calls).
//!
//! Commands run through `std::process::Command`, one rule per call, so `--dry-run` prints exactly
//! what install runs. The backend (iptables-nft or iptables-legacy) is detected like Istio does:
//! the backend that already holds rules wins; with no rules anywhere the system `iptables` is used.

use clap::{Args, Subcommand};
use std::fmt;
use std::net::IpAddr;
use std::process::Command;

/// mecha's chains in the `nat` table, in creation order.
pub const CHAINS: [&str; 4] = [
    "MECHA_INBOUND",
    "MECHA_REDIRECT",
    "MECHA_IN_REDIRECT",
    "MECHA_OUTPUT",
];

#[derive(Args, Debug)]
pub struct IptablesArgs {
    #[command(subcommand)]
    pub action: Action,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    /// Add the capture rules (idempotent: a previous install is removed first).
    Install(Options),
    /// Remove every rule and chain `install` added, and nothing else.
    Uninstall(Options),
}

/// Options in the style of istio-iptables (same short flags).
#[derive(Args, Debug, Clone)]
pub struct Options {
    /// Print the commands instead of running them.
    #[arg(long = "dry-run")]
    pub dry_run: bool,
    /// UID(s) of the proxy, comma separated; their traffic is never captured.
    #[arg(short = 'u', long = "proxy-uid", default_value = "1337")]
    pub proxy_uid: String,
    /// GID(s) of the proxy, comma separated; their traffic is never captured.
    #[arg(short = 'g', long = "proxy-gid", default_value = "1337")]
    pub proxy_gid: String,
    /// Port outbound TCP is redirected to.
    #[arg(short = 'p', long = "outbound-port", default_value_t = 15001)]
    pub outbound_port: u16,
    /// Port inbound TCP is redirected to.
    #[arg(short = 'z', long = "inbound-port", default_value_t = 15006)]
    pub inbound_port: u16,
    /// Outbound destinations to capture: `*` or a comma-separated CIDR list ("" = none).
    #[arg(short = 'i', long = "include-outbound-cidrs", default_value = "*")]
    pub include_outbound_cidrs: String,
    /// Outbound destinations never captured (comma-separated CIDRs).
    #[arg(short = 'x', long = "exclude-outbound-cidrs", default_value = "")]
    pub exclude_outbound_cidrs: String,
    /// Outbound destination ports never captured (comma separated).
    #[arg(short = 'o', long = "exclude-outbound-ports", default_value = "")]
    pub exclude_outbound_ports: String,
    /// Inbound ports to capture: `*` or a comma-separated list ("" = no inbound capture).
    #[arg(short = 'b', long = "include-inbound-ports", default_value = "*")]
    pub include_inbound_ports: String,
    /// Inbound ports never captured (with `*`): admin 15000 and Istio's agent/health/metrics ports.
    #[arg(
        short = 'd',
        long = "exclude-inbound-ports",
        default_value = "15000,15020,15021,15090"
    )]
    pub exclude_inbound_ports: String,
    /// Also program ip6tables (IPv6 CIDRs go there, IPv4 CIDRs to iptables).
    #[arg(long = "ipv6")]
    pub ipv6: bool,
    /// Which iptables backend to use: auto (detect), nft, legacy.
    #[arg(long = "iptables-mode", default_value = "auto")]
    pub mode: String,
}

/// What can go wrong; each is reported on stderr and exits 1.
#[derive(Debug)]
pub enum IptablesError {
    InvalidOption { flag: &'static str, message: String },
    BinaryMissing(String),
    NotPermitted { binary: String, detail: String },
    CommandFailed { command: String, detail: String },
}

impl fmt::Display for IptablesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidOption { flag, message } => write!(f, "--{flag}: {message}"),
            Self::BinaryMissing(b) => write!(
                f,
                "`{b}` was not found in PATH; install the iptables package (Debian: apt-get install iptables)"
            ),
            Self::NotPermitted { binary, detail } => write!(
                f,
                "`{binary}` cannot modify the nat table: run as root or with CAP_NET_ADMIN ({detail})"
            ),
            Self::CommandFailed { command, detail } => write!(f, "`{command}` failed: {detail}"),
        }
    }
}

impl std::error::Error for IptablesError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.1/32",
            Family::V6 => "::1/128",
        }
    }
    /// The source address Istio's sidecar binds for inbound passthrough; never re-captured.
    fn inbound_passthrough_source(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.6/32",
            Family::V6 => "::6/128",
        }
    }
}

/// Validated options, split per address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    pub uids: Vec<u32>,
    pub gids: Vec<u32>,
    pub outbound_port: u16,
    pub inbound_port: u16,
    /// `None` = capture all destinations.
    pub include_cidrs: Option<Vec<Cidr>>,
    pub exclude_cidrs: Vec<Cidr>,
    pub exclude_outbound_ports: Vec<u16>,
    /// `None` = capture all inbound ports; `Some(empty)` = no inbound capture.
    pub include_inbound_ports: Option<Vec<u16>>,
    pub exclude_inbound_ports: Vec<u16>,
    pub ipv6: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a.parse::<IpAddr>().ok()?, Some(l.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len.unwrap_or(max);
        (len <= max).then_some(Cidr { addr, len })
    }
    fn family(&self) -> Family {
        if self.addr.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

fn list(s: &str) -> impl Iterator<Item = &str> {
    s.split(',').map(str::trim).filter(|x| !x.is_empty())
}

fn ports(flag: &'static str, s: &str) -> Result<Vec<u16>, IptablesError> {
    list(s)
        .map(|p| {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| IptablesError::InvalidOption {
                    flag,
                    message: format!("\"{p}\" is not a port (1-65535)"),
                })
        })
        .collect()
}

fn ids(flag: &'static str, s: &str) -> Result<Vec<u32>, IptablesError> {
    list(s)
        .map(|p| {
            p.parse::<u32>().map_err(|_| IptablesError::InvalidOption {
                flag,
                message: format!("\"{p}\" is not a numeric id"),
            })
        })
        .collect()
}

fn cidrs(flag: &'static str, s: &str) -> Result<Vec<Cidr>, IptablesError> {
    list(s)
        .map(|c| {
            Cidr::parse(c).ok_or_else(|| IptablesError::InvalidOption {
                flag,
                message: format!("\"{c}\" is not a CIDR (e.g. 10.0.0.0/8)"),
            })
        })
        .collect()
}

impl Spec {
    pub fn from_options(o: &Options) -> Result<Spec, IptablesError> {
        let uids = ids("proxy-uid", &o.proxy_uid)?;
        let gids = ids("proxy-gid", &o.proxy_gid)?;
        if uids.is_empty() && gids.is_empty() {
            // Without an owner exclusion the proxy's own connections would loop back into it.
            return Err(IptablesError::InvalidOption {
                flag: "proxy-uid",
                message: "at least one proxy uid or gid is required".into(),
            });
        }
        let include_cidrs = if o.include_outbound_cidrs.trim() == "*" {
            None
        } else {
            Some(cidrs("include-outbound-cidrs", &o.include_outbound_cidrs)?)
        };
        let include_inbound_ports = if o.include_inbound_ports.trim() == "*" {
            None
        } else {
            Some(ports("include-inbound-ports", &o.include_inbound_ports)?)
        };
        Ok(Spec {
            uids,
            gids,
            outbound_port: o.outbound_port,
            inbound_port: o.inbound_port,
            include_cidrs,
            exclude_cidrs: cidrs("exclude-outbound-cidrs", &o.exclude_outbound_cidrs)?,
            exclude_outbound_ports: ports("exclude-outbound-ports", &o.exclude_outbound_ports)?,
            include_inbound_ports,
            exclude_inbound_ports: ports("exclude-inbound-ports", &o.exclude_inbound_ports)?,
            ipv6: o.ipv6,
        })
    }

    fn families(&self) -> Vec<Family> {
        if self.ipv6 {
            vec![Family::V4, Family::V6]
        } else {
            vec![Family::V4]
        }
    }

    fn inbound_enabled(&self) -> bool {
        !matches!(&self.include_inbound_ports, Some(p) if p.is_empty())
    }
}

fn s<I: IntoIterator<Item = T>, T: ToString>(parts: I) -> Vec<String> {
    parts.into_iter().map(|p| p.to_string()).collect()
}

/// The rules install adds for one family, as iptables arguments (without the binary name).
pub fn install_rules(spec: &Spec, fam: Family) -> Vec<Vec<String>> {
    let mut r: Vec<Vec<String>> = vec![];
    let nat = |args: Vec<String>| {
        let mut v = s(["-t", "nat"]);
        v.extend(args);
        v
    };
    for c in CHAINS {
        r.push(nat(s(["-N", c])));
    }
    let inbound = spec.inbound_enabled();
    if inbound && spec.include_inbound_ports.is_none() {
        for p in &spec.exclude_inbound_ports {
            r.push(nat(s([
                "-A",
                "MECHA_INBOUND",
                "-p",
                "tcp",
                "--dport",
                &p.to_string(),
                "-j",
                "RETURN",
            ])));
        }
    }
    r.push(nat(s([
        "-A",
        "MECHA_REDIRECT",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &spec.outbound_port.to_string(),
    ])));
    r.push(nat(s([
        "-A",
        "MECHA_IN_REDIRECT",
        "-p",
        "tcp",
        "-j",
        "REDIRECT",
        "--to-ports",
        &spec.inbound_port.to_string(),
    ])));
    if inbound {
        r.push(nat(s([
            "-A",
            "PREROUTING",
            "-p",
            "tcp",
            "-j",
            "MECHA_INBOUND",
        ])));
        match &spec.include_inbound_ports {
            None => r.push(nat(s([
                "-A",
                "MECHA_INBOUND",
                "-p",
                "tcp",
                "-j",
                "MECHA_IN_REDIRECT",
            ]))),
            Some(ports) => {
                for p in ports {
                    r.push(nat(s([
                        "-A",
                        "MECHA_INBOUND",
                        "-p",
                        "tcp",
                        "--dport",
                        &p.to_string(),
                        "-j",
                        "MECHA_IN_REDIRECT",
                    ])));
                }
            }
        }
    }
    r.push(nat(s(["-A", "OUTPUT", "-p", "tcp", "-j", "MECHA_OUTPUT"])));
    // Connections the proxy makes from the inbound passthrough source are already handled.
    r.push(nat(s([
        "-A",
        "MECHA_OUTPUT",
        "-o",
        "lo",
        "-s",
        fam.inbound_passthrough_source(),
        "-j",
        "RETURN",
    ])));
    for p in &spec.exclude_outbound_ports {
        r.push(nat(s([
            "-A",
            "MECHA_OUTPUT",
            "-p",
            "tcp",
            "--dport",
            &p.to_string(),
            "-j",
            "RETURN",
        ])));
    }
    let owners = spec
        .uids
        .iter()
        .map(|u| ("--uid-owner", *u))
        .chain(spec.gids.iter().map(|g| ("--gid-owner", *g)));
    for (flag, id) in owners {
        let id = id.to_string();
        if inbound {
            // The proxy calling its own pod IP over lo: deliver through the inbound side.
            r.push(nat(s([
                "-A",
                "MECHA_OUTPUT",
                "-o",
                "lo",
                "!",
                "-d",
                fam.loopback(),
                "-m",
                "owner",
                flag,
                &id,
                "-j",
                "MECHA_IN_REDIRECT",
            ])));
        }
        // The app talking to itself over lo is not the mesh's business.
        r.push(nat(s([
            "-A",
            "MECHA_OUTPUT",
            "-o",
            "lo",
            "-m",
            "owner",
            "!",
            flag,
            &id,
            "-j",
            "RETURN",
        ])));
        // The proxy's own upstream connections are never captured (no loops).
        r.push(nat(s([
            "-A",
            "MECHA_OUTPUT",
            "-m",
            "owner",
            flag,
            &id,
            "-j",
            "RETURN",
        ])));
    }
    r.push(nat(s([
        "-A",
        "MECHA_OUTPUT",
        "-d",
        fam.loopback(),
        "-j",
        "RETURN",
    ])));
    for c in spec.exclude_cidrs.iter().filter(|c| c.family() == fam) {
        r.push(nat(s([
            "-A",
            "MECHA_OUTPUT",
            "-d",
            &c.to_string(),
            "-j",
            "RETURN",
        ])));
    }
    match &spec.include_cidrs {
        None => r.push(nat(s(["-A", "MECHA_OUTPUT", "-j", "MECHA_REDIRECT"]))),
        Some(list) => {
            for c in list.iter().filter(|c| c.family() == fam) {
                r.push(nat(s([
                    "-A",
                    "MECHA_OUTPUT",
                    "-d",
                    &c.to_string(),
                    "-j",
                    "MECHA_REDIRECT",
                ])));
            }
            r.push(nat(s(["-A", "MECHA_OUTPUT", "-j", "RETURN"])));
        }
    }
    r
}

/// The commands that remove an installation, computed from the live `iptables -t nat -S`
/// output: every rule of a built-in chain that jumps to a mecha chain is deleted (by its exact
/// spec), then each mecha chain present is flushed and deleted. Rules of other owners stay.
pub fn uninstall_rules(nat_listing: &str) -> Vec<Vec<String>> {
    let mut r = vec![];
    let ours = |c: &str| CHAINS.contains(&c);
    let mut present = vec![];
    for line in nat_listing.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["-N", chain] if ours(chain) => present.push(chain.to_string()),
            ["-A", chain, rest @ ..] if !ours(chain) => {
                let jumps_to_ours = rest
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && ours(w[1]));
                if jumps_to_ours {
                    let mut v = s(["-t", "nat", "-D", chain]);
                    v.extend(rest.iter().map(|x| x.to_string()));
                    r.push(v);
                }
            }
            _ => {}
        }
    }
    for c in CHAINS.iter().filter(|c| present.iter().any(|p| p == *c)) {
        r.push(s(["-t", "nat", "-F", c]));
    }
    for c in CHAINS.iter().filter(|c| present.iter().any(|p| p == *c)) {
        r.push(s(["-t", "nat", "-X", c]));
    }
    r
}

/// The iptables binaries to use, per family.
#[derive(Debug, Clone)]
pub struct Backend {
    pub v4: String,
    pub v6: String,
}

impl Backend {
    fn binary(&self, fam: Family) -> &str {
        match fam {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

fn in_path(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

fn count_rules(save_bin: &str) -> usize {
    Command::new(save_bin)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| l.starts_with("-A "))
                .count()
        })
        .unwrap_or(0)
}

/// Istio's detection: when both backends exist, use the one that already has rules (legacy wins
/// only if it has rules and nft has none); otherwise the system default `iptables`.
pub fn detect_backend(mode: &str) -> Result<Backend, IptablesError> {
    let pick = |suffix: &str| Backend {
        v4: format!("iptables{suffix}"),
        v6: format!("ip6tables{suffix}"),
    };
    let backend = match mode {
        "nft" => pick("-nft"),
        "legacy" => pick("-legacy"),
        "auto" => {
            if in_path("iptables-legacy-save") && in_path("iptables-nft-save") {
                let legacy = count_rules("iptables-legacy-save");
                let nft = count_rules("iptables-nft-save");
                if legacy > 0 && nft == 0 {
                    pick("-legacy")
                } else if nft > 0 {
                    pick("-nft")
                } else {
                    pick("")
                }
            } else {
                pick("")
            }
        }
        other => {
            return Err(IptablesError::InvalidOption {
                flag: "iptables-mode",
                message: format!("\"{other}\" is not one of auto, nft, legacy"),
            })
        }
    };
    if !in_path(&backend.v4) {
        return Err(IptablesError::BinaryMissing(backend.v4));
    }
    Ok(backend)
}

fn render(bin: &str, args: &[String]) -> String {
    let mut out = bin.to_string();
    for a in args {
        out.push(' ');
        out.push_str(a);
    }
    out
}

fn run(bin: &str, args: &[String]) -> Result<String, IptablesError> {
    let out = Command::new(bin).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            IptablesError::BinaryMissing(bin.to_string())
        } else {
            IptablesError::CommandFailed {
                command: render(bin, args),
                detail: e.to_string(),
            }
        }
    })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let detail = String::from_utf8_lossy(&out.stderr).trim().to_string();
    // iptables exits 4 ("Permission denied (you must be root)") without privileges.
    if out.status.code() == Some(4) || detail.contains("Permission denied") {
        return Err(IptablesError::NotPermitted {
            binary: bin.to_string(),
            detail,
        });
    }
    Err(IptablesError::CommandFailed {
        command: render(bin, args),
        detail,
    })
}

fn nat_listing(bin: &str) -> Result<String, IptablesError> {
    run(bin, &s(["-t", "nat", "-S"]))
}

fn uninstall_family(bin: &str, dry_run: bool) -> Result<usize, IptablesError> {
    let listing = nat_listing(bin)?;
    let cmds = uninstall_rules(&listing);
    for c in &cmds {
        if dry_run {
            println!("{}", render(bin, c));
        } else {
            tracing::debug!(command = %render(bin, c), "iptables");
            run(bin, c)?;
        }
    }
    Ok(cmds.len())
}

fn install(spec: &Spec, backend: &Backend, dry_run: bool) -> Result<(), IptablesError> {
    for fam in spec.families() {
        let bin = backend.binary(fam);
        let rules = install_rules(spec, fam);
        if dry_run {
            // Reading needs privileges too; without them show the rules install would add.
            if let Ok(listing) = nat_listing(bin) {
                for c in uninstall_rules(&listing) {
                    println!("{}", render(bin, &c));
                }
            }
            for c in &rules {
                println!("{}", render(bin, c));
            }
            continue;
        }
        // Idempotent: a previous installation is removed first, so exactly one set remains.
        let removed = uninstall_family(bin, false)?;
        if removed > 0 {
            tracing::info!(binary = bin, "removed a previous installation");
        }
        for c in &rules {
            tracing::debug!(command = %render(bin, c), "iptables");
            if let Err(e) = run(bin, c) {
                // Leave nothing half-installed.
                let _ = uninstall_family(bin, false);
                return Err(e);
            }
        }
        println!(
            "{bin}: installed {} rules (outbound -> {}, inbound -> {})",
            rules.len(),
            spec.outbound_port,
            if spec.inbound_enabled() {
                spec.inbound_port.to_string()
            } else {
                "not captured".into()
            }
        );
    }
    Ok(())
}

pub fn main(args: IptablesArgs) -> i32 {
    let (opts, installing) = match &args.action {
        Action::Install(o) => (o, true),
        Action::Uninstall(o) => (o, false),
    };
    let result = (|| {
        let spec = Spec::from_options(opts)?;
        let backend = detect_backend(&opts.mode)?;
        if installing {
            install(&spec, &backend, opts.dry_run)
        } else {
            for fam in spec.families() {
                let bin = backend.binary(fam);
                let n = uninstall_family(bin, opts.dry_run)?;
                if !opts.dry_run {
                    println!("{bin}: removed {n} rules/chains");
                }
            }
            Ok(())
        }
    })();
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("mecha iptables: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        o: Options,
    }

    fn spec(args: &[&str]) -> Spec {
        let mut argv = vec!["t"];
        argv.extend_from_slice(args);
        Spec::from_options(&T::parse_from(argv).o).unwrap()
    }

    fn lines(spec: &Spec, fam: Family) -> Vec<String> {
        install_rules(spec, fam)
            .iter()
            .map(|r| render("iptables", r))
            .collect()
    }

    #[test]
    fn default_rules_match_istio_shape() {
        let got = lines(&spec(&[]), Family::V4);
        let want = [
            "iptables -t nat -N MECHA_INBOUND",
            "iptables -t nat -N MECHA_REDIRECT",
            "iptables -t nat -N MECHA_IN_REDIRECT",
            "iptables -t nat -N MECHA_OUTPUT",
            "iptables -t nat -A MECHA_INBOUND -p tcp --dport 15000 -j RETURN",
            "iptables -t nat -A MECHA_INBOUND -p tcp --dport 15020 -j RETURN",
            "iptables -t nat -A MECHA_INBOUND -p tcp --dport 15021 -j RETURN",
            "iptables -t nat -A MECHA_INBOUND -p tcp --dport 15090 -j RETURN",
            "iptables -t nat -A MECHA_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "iptables -t nat -A MECHA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "iptables -t nat -A PREROUTING -p tcp -j MECHA_INBOUND",
            "iptables -t nat -A MECHA_INBOUND -p tcp -j MECHA_IN_REDIRECT",
            "iptables -t nat -A OUTPUT -p tcp -j MECHA_OUTPUT",
            "iptables -t nat -A MECHA_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1337 -j MECHA_IN_REDIRECT",
            "iptables -t nat -A MECHA_OUTPUT -o lo -m owner ! --uid-owner 1337 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -m owner --uid-owner 1337 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --gid-owner 1337 -j MECHA_IN_REDIRECT",
            "iptables -t nat -A MECHA_OUTPUT -o lo -m owner ! --gid-owner 1337 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -m owner --gid-owner 1337 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -j MECHA_REDIRECT",
        ];
        assert_eq!(got, want);
    }

    #[test]
    fn include_lists_and_exclusions() {
        let sp = spec(&[
            "-i",
            "10.0.0.0/8,fd00::/8",
            "-x",
            "10.1.0.0/16",
            "-o",
            "5432",
            "-b",
            "8080,9090",
            "-u",
            "1000",
            "-g",
            "",
            "--ipv6",
        ]);
        let v4 = lines(&sp, Family::V4);
        let want = [
            "iptables -t nat -N MECHA_INBOUND",
            "iptables -t nat -N MECHA_REDIRECT",
            "iptables -t nat -N MECHA_IN_REDIRECT",
            "iptables -t nat -N MECHA_OUTPUT",
            "iptables -t nat -A MECHA_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
            "iptables -t nat -A MECHA_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006",
            "iptables -t nat -A PREROUTING -p tcp -j MECHA_INBOUND",
            "iptables -t nat -A MECHA_INBOUND -p tcp --dport 8080 -j MECHA_IN_REDIRECT",
            "iptables -t nat -A MECHA_INBOUND -p tcp --dport 9090 -j MECHA_IN_REDIRECT",
            "iptables -t nat -A OUTPUT -p tcp -j MECHA_OUTPUT",
            "iptables -t nat -A MECHA_OUTPUT -o lo -s 127.0.0.6/32 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -p tcp --dport 5432 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner 1000 -j MECHA_IN_REDIRECT",
            "iptables -t nat -A MECHA_OUTPUT -o lo -m owner ! --uid-owner 1000 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -m owner --uid-owner 1000 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -d 127.0.0.1/32 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -d 10.1.0.0/16 -j RETURN",
            "iptables -t nat -A MECHA_OUTPUT -d 10.0.0.0/8 -j MECHA_REDIRECT",
            "iptables -t nat -A MECHA_OUTPUT -j RETURN",
        ];
        assert_eq!(v4, want);
        let v6 = lines(&sp, Family::V6).join("\n");
        assert!(
            v6.contains("-A MECHA_OUTPUT -o lo -s ::6/128 -j RETURN"),
            "{v6}"
        );
        assert!(v6.contains("-A MECHA_OUTPUT -d ::1/128 -j RETURN"), "{v6}");
        assert!(
            v6.contains("-A MECHA_OUTPUT -d fd00::/8 -j MECHA_REDIRECT"),
            "{v6}"
        );
        assert!(!v6.contains("10.0.0.0/8"), "{v6}");
    }

    #[test]
    fn no_inbound_capture_when_inbound_ports_empty() {
        let got = lines(&spec(&["-b", ""]), Family::V4).join("\n");
        assert!(!got.contains("PREROUTING"), "{got}");
        assert!(!got.contains("-j MECHA_IN_REDIRECT"), "{got}");
        assert!(got.contains("-A OUTPUT -p tcp -j MECHA_OUTPUT"));
    }

    #[test]
    fn bad_options_are_errors() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["t"];
            argv.extend_from_slice(args);
            Spec::from_options(&T::parse_from(argv).o)
        };
        let e = parse(&["-x", "10.0.0.0/33"]).unwrap_err().to_string();
        assert!(
            e.contains("--exclude-outbound-cidrs") && e.contains("10.0.0.0/33"),
            "{e}"
        );
        let e = parse(&["-o", "http"]).unwrap_err().to_string();
        assert!(e.contains("--exclude-outbound-ports"), "{e}");
        let e = parse(&["-u", "", "-g", ""]).unwrap_err().to_string();
        assert!(e.contains("uid or gid"), "{e}");
    }

    #[test]
    fn uninstall_removes_only_our_jumps_and_chains() {
        let listing = "-P PREROUTING ACCEPT\n-P OUTPUT ACCEPT\n-N KUBE-SERVICES\n-N MECHA_INBOUND\n-N MECHA_OUTPUT\n-N MECHA_REDIRECT\n-N MECHA_IN_REDIRECT\n-A PREROUTING -p tcp -j MECHA_INBOUND\n-A PREROUTING -j KUBE-SERVICES\n-A OUTPUT -p tcp -j MECHA_OUTPUT\n-A OUTPUT -d 10.0.0.1/32 -j RETURN\n-A MECHA_OUTPUT -j MECHA_REDIRECT\n-A KUBE-SERVICES -j RETURN\n";
        let got: Vec<String> = uninstall_rules(listing)
            .iter()
            .map(|r| render("iptables", r))
            .collect();
        let want = [
            "iptables -t nat -D PREROUTING -p tcp -j MECHA_INBOUND",
            "iptables -t nat -D OUTPUT -p tcp -j MECHA_OUTPUT",
            "iptables -t nat -F MECHA_INBOUND",
            "iptables -t nat -F MECHA_REDIRECT",
            "iptables -t nat -F MECHA_IN_REDIRECT",
            "iptables -t nat -F MECHA_OUTPUT",
            "iptables -t nat -X MECHA_INBOUND",
            "iptables -t nat -X MECHA_REDIRECT",
            "iptables -t nat -X MECHA_IN_REDIRECT",
            "iptables -t nat -X MECHA_OUTPUT",
        ];
        assert_eq!(got, want);
        assert!(uninstall_rules("-P OUTPUT ACCEPT\n-A OUTPUT -j KUBE\n").is_empty());
    }
}
