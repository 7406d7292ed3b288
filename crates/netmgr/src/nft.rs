//! A network's firewall: nftables, in a table of its own (`ip vessel_NAME`), replaced whole
//! in one transaction and deleted whole, so that the host's own rules are never flushed or
//! reordered (libvirt's nftables backend works the same way).
//!
//! nftables evaluates every table's base chains at a hook: an accept in ours does not get a
//! packet past a drop in another table's (Docker sets its `FORWARD` chain's policy to drop,
//! moby #39439). So for a chain of another table at the `forward` or `input` hook whose
//! policy is drop, [`open_foreign`] inserts at its top accept rules for this network's bridge
//! only, each commented `vessel:NAME`, and [`close_foreign`] deletes exactly those rules (by
//! handle): the host's ruleset is as it was once the network stops. Our own table still
//! decides what the bridge may do (an isolated network's drop holds whatever the others
//! accept).

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use crate::def::{Mode, NetworkDef, Proto};

/// Errors running `nft`.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error("cannot run nft (package nftables): {0}")]
    Spawn(std::io::Error),
    #[error("nft {what}: {stderr}")]
    Failed { what: String, stderr: String },
    #[error("nft's JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// The comment that marks the rules Vessel put in other tables' chains for network `name`.
pub fn mark(name: &str) -> String {
    format!("vessel:{name}")
}

/// The network's own table.
pub fn table(name: &str) -> String {
    format!("vessel_{}", name.replace('-', "_"))
}

/// A port forward with the VM's address resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnat {
    pub proto: Proto,
    pub host_port: u16,
    pub to: Ipv4Addr,
    pub port: u16,
}

/// The network's table, as one nft script that replaces it atomically.
pub fn ruleset(def: &NetworkDef, dnat: &[Dnat]) -> String {
    let t = table(&def.name);
    let br = def.bridge_name();
    let Some(net) = def.ipv4 else {
        return String::new();
    };
    let subnet = net.subnet();
    let mut s = format!(
        "add table ip {t}\ndelete table ip {t}\ntable ip {t} {{\n\
         \tchain input {{\n\t\ttype filter hook input priority filter; policy accept;\n\
         \t\tiifname \"{br}\" udp dport {{ 53, 67 }} accept\n\
         \t\tiifname \"{br}\" tcp dport 53 accept\n\t}}\n\
         \tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\
         \t\tiifname \"{br}\" oifname \"{br}\" accept\n"
    );
    match def.mode {
        Mode::Nat => {
            s.push_str(&format!(
                "\t\tiifname \"{br}\" ip saddr {subnet} accept\n\
                 \t\toifname \"{br}\" ip daddr {subnet} ct state established,related accept\n\
                 \t\toifname \"{br}\" ip daddr {subnet} ct status dnat accept\n"
            ));
        }
        Mode::Isolated | Mode::Bridge => {}
    }
    s.push_str(&format!(
        "\t\tiifname \"{br}\" drop\n\t\toifname \"{br}\" drop\n\t}}\n"
    ));
    if def.mode == Mode::Nat {
        s.push_str(&format!(
            "\tchain postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {subnet} ip daddr 224.0.0.0/24 return\n\
             \t\tip saddr {subnet} ip daddr 255.255.255.255 return\n\
             \t\tip saddr {subnet} ip daddr != {subnet} masquerade\n\t}}\n"
        ));
        let rules: String = dnat
            .iter()
            .map(|d| {
                format!(
                    "\t\tfib daddr type local {} dport {} dnat to {}:{}\n",
                    d.proto, d.host_port, d.to, d.port
                )
            })
            .collect();
        for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
            s.push_str(&format!(
                "\tchain {chain} {{\n\t\ttype nat hook {hook} priority -100; policy accept;\n{rules}\t}}\n"
            ));
        }
    }
    s.push_str("}\n");
    s
}

fn run(args: &[&str], stdin: Option<&str>) -> Result<String, NftError> {
    let mut child = Command::new("nft")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(NftError::Spawn)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(NftError::Spawn)?;
    }
    let out = child.wait_with_output().map_err(NftError::Spawn)?;
    if !out.status.success() {
        return Err(NftError::Failed {
            what: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Replaces the network's table with `ruleset` (one transaction: all or nothing).
pub fn apply(ruleset: &str) -> Result<(), NftError> {
    if ruleset.is_empty() {
        return Ok(());
    }
    run(&["-f", "-"], Some(ruleset)).map(|_| ())
}

/// Deletes the network's table (gone already is fine).
pub fn remove(name: &str) -> Result<(), NftError> {
    let t = table(name);
    run(
        &["-f", "-"],
        Some(&format!("add table ip {t}\ndelete table ip {t}\n")),
    )
    .map(|_| ())
}

/// The tables Vessel made (`vessel_*`), for the clean-up after a crash.
pub fn tables() -> Result<Vec<String>, NftError> {
    let v: serde_json::Value = serde_json::from_str(&run(&["-j", "list", "tables"], None)?)?;
    Ok(items(&v, "table")
        .filter(|t| t["family"] == "ip")
        .filter_map(|t| t["name"].as_str())
        .filter_map(|n| n.strip_prefix("vessel_"))
        .map(str::to_string)
        .collect())
}

fn items<'a>(
    v: &'a serde_json::Value,
    kind: &'a str,
) -> impl Iterator<Item = &'a serde_json::Value> {
    v["nftables"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(move |i| i.get(kind))
}

/// A base chain of another table that drops what it does not accept, at a hook a network's
/// traffic crosses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Foreign {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub hook: String,
}

/// The chains [`open_foreign`] must open, from `nft -j list ruleset`.
pub fn foreign_chains(ruleset_json: &str) -> Result<Vec<Foreign>, NftError> {
    let v: serde_json::Value = serde_json::from_str(ruleset_json)?;
    Ok(items(&v, "chain")
        .filter(|c| matches!(c["family"].as_str(), Some("ip" | "inet")))
        .filter(|c| !c["table"].as_str().unwrap_or("").starts_with("vessel_"))
        .filter(|c| c["policy"] == "drop")
        .filter(|c| matches!(c["hook"].as_str(), Some("forward" | "input")))
        .map(|c| Foreign {
            family: c["family"].as_str().unwrap_or("").to_string(),
            table: c["table"].as_str().unwrap_or("").to_string(),
            chain: c["name"].as_str().unwrap_or("").to_string(),
            hook: c["hook"].as_str().unwrap_or("").to_string(),
        })
        .collect())
}

/// Lets the network's traffic past other tables' dropping chains (see the module's
/// documentation): one transaction.
pub fn open_foreign(def: &NetworkDef) -> Result<usize, NftError> {
    close_foreign(&def.name)?;
    let chains = foreign_chains(&run(&["-j", "list", "ruleset"], None)?)?;
    let br = def.bridge_name();
    let m = mark(&def.name);
    let mut script = String::new();
    for c in &chains {
        let at = format!("{} {} {}", c.family, c.table, c.chain);
        let rules: &[&str] = match c.hook.as_str() {
            "forward" => &["iifname", "oifname"],
            _ => &["iifname"],
        };
        for dir in rules {
            script.push_str(&format!(
                "insert rule {at} {dir} \"{br}\" accept comment \"{m}\"\n"
            ));
        }
    }
    if !script.is_empty() {
        run(&["-f", "-"], Some(&script))?;
    }
    Ok(chains.len())
}

/// Deletes the rules [`open_foreign`] put in other tables for network `name`.
pub fn close_foreign(name: &str) -> Result<(), NftError> {
    let m = mark(name);
    close_foreign_where(|comment| comment == m)
}

/// Deletes the rules [`open_foreign`] put in other tables for networks not in `active`.
pub fn close_foreign_except(active: &[String]) -> Result<(), NftError> {
    close_foreign_where(|c| {
        c.strip_prefix("vessel:")
            .is_some_and(|n| !active.iter().any(|a| a == n))
    })
}

fn close_foreign_where(doomed: impl Fn(&str) -> bool) -> Result<(), NftError> {
    let v: serde_json::Value = serde_json::from_str(&run(&["-j", "list", "ruleset"], None)?)?;
    let mut script = String::new();
    for r in items(&v, "rule").filter(|r| r["comment"].as_str().is_some_and(&doomed)) {
        script.push_str(&format!(
            "delete rule {} {} {} handle {}\n",
            r["family"].as_str().unwrap_or(""),
            r["table"].as_str().unwrap_or(""),
            r["chain"].as_str().unwrap_or(""),
            r["handle"]
        ));
    }
    if !script.is_empty() {
        run(&["-f", "-"], Some(&script))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(mode: Mode) -> NetworkDef {
        NetworkDef::new("lab-1", mode, Some("10.88.0.1/24".parse().unwrap()))
    }

    #[test]
    fn a_nat_table_masquerades_and_forwards() {
        let d = Dnat {
            proto: Proto::Tcp,
            host_port: 8080,
            to: Ipv4Addr::new(10, 88, 0, 5),
            port: 80,
        };
        let s = ruleset(&def(Mode::Nat), &[d]);
        assert!(s.starts_with("add table ip vessel_lab_1\ndelete table ip vessel_lab_1\n"));
        for want in [
            "ip saddr 10.88.0.0/24 ip daddr != 10.88.0.0/24 masquerade",
            "fib daddr type local tcp dport 8080 dnat to 10.88.0.5:80",
            "iifname \"vsl-lab-1\" ip saddr 10.88.0.0/24 accept",
            "oifname \"vsl-lab-1\" drop",
        ] {
            assert!(s.contains(want), "{want}:\n{s}");
        }
    }

    #[test]
    fn an_isolated_table_has_no_way_out() {
        let s = ruleset(&def(Mode::Isolated), &[]);
        assert!(
            !s.contains("masquerade") && !s.contains("ip saddr 10.88.0.0/24 accept"),
            "{s}"
        );
        assert!(s.contains("iifname \"vsl-lab-1\" drop"), "{s}");
    }

    #[test]
    fn dropping_chains_of_other_tables_are_found() {
        let json = r#"{"nftables":[{"metainfo":{}},
            {"chain":{"family":"ip","table":"filter","name":"FORWARD","hook":"forward","prio":0,"policy":"drop"}},
            {"chain":{"family":"ip","table":"filter","name":"DOCKER-USER"}},
            {"chain":{"family":"inet","table":"fw","name":"in","hook":"input","policy":"drop"}},
            {"chain":{"family":"inet","table":"fw","name":"out","hook":"output","policy":"drop"}},
            {"chain":{"family":"ip","table":"vessel_x","name":"forward","hook":"forward","policy":"drop"}},
            {"chain":{"family":"ip6","table":"f6","name":"fwd","hook":"forward","policy":"drop"}},
            {"chain":{"family":"ip","table":"nat","name":"PREROUTING","hook":"prerouting","policy":"accept"}}]}"#;
        let f = foreign_chains(json).unwrap();
        let names: Vec<&str> = f.iter().map(|c| c.chain.as_str()).collect();
        assert_eq!(names, ["FORWARD", "in"]);
    }
}
