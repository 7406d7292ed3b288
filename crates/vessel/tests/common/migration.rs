//! Two `vessel` processes for live-migration tests: a source running the bundled guest's soak
//! workload and an empty target (`vessel serve`), and the status helpers that follow a
//! migration through `vessel ctl`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::soak::{assert_went_on, last_iters, Console};
use super::*;

pub const CPUS: usize = 2;

/// The migration token the tests give both sides (a target makes its own when given none).
pub const TOKEN: &str = "vessel-test-token-0123456789";

/// The token `vessel ctl migrate receive` printed (`token: ...`).
pub fn printed_token(o: &std::process::Output) -> String {
    let out = stdout(o);
    out.lines()
        .find_map(|l| l.strip_prefix("token: "))
        .unwrap_or_else(|| panic!("no token in {out}"))
        .to_string()
}

/// The exit code of `child` (`who`), once it ends: it must within a minute.
pub fn exit_code(child: &mut std::process::Child, who: &str) -> Option<i32> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s.code();
        }
        assert!(Instant::now() < deadline, "{who} hangs");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `"phase"` of `vessel ctl migrate status --json`.
pub fn phase(socket: &Path) -> String {
    let o = ctl(socket, &["--json", "migrate", "status"]);
    let out = stdout(&o);
    let at = out.find("\"phase\"").unwrap_or_else(|| panic!("{out}"));
    out[at..].split('"').nth(3).unwrap().to_string()
}

pub struct Pair {
    pub tmp: TempDir,
    pub source: Console,
    pub target: Console,
    pub src_api: PathBuf,
    pub dst_api: PathBuf,
}

/// A soaking source VM and an empty target (`vessel serve`), each run through `prefix` (a
/// command such as `ip netns exec NAME`, or nothing).
pub fn pair(name: &str, src_prefix: &[&str], dst_prefix: &[&str], memory: &str) -> Pair {
    pair_with(
        name,
        src_prefix,
        dst_prefix,
        memory,
        "action=soak soakms=50",
        None,
    )
}

/// [`pair`] with the guest's command line, and the target's stderr to a file.
pub fn pair_with(
    name: &str,
    src_prefix: &[&str],
    dst_prefix: &[&str],
    memory: &str,
    cmdline: &str,
    dst_stderr: Option<&Path>,
) -> Pair {
    pair_in(
        TempDir::new(name),
        src_prefix,
        dst_prefix,
        memory,
        cmdline,
        dst_stderr,
        &[],
    )
}

/// [`pair_with`] in `tmp`, with more arguments for the source's `vessel run` (devices).
pub fn pair_in(
    tmp: TempDir,
    src_prefix: &[&str],
    dst_prefix: &[&str],
    memory: &str,
    cmdline: &str,
    dst_stderr: Option<&Path>,
    src_args: &[&str],
) -> Pair {
    let src_api = tmp.file("src.sock");
    let dst_api = tmp.file("dst.sock");
    let mut args: Vec<String> = src_prefix.iter().map(|s| s.to_string()).collect();
    if !src_prefix.is_empty() {
        args.push(VESSEL.to_string());
    }
    args.extend(
        [
            "run",
            "--cpus",
            "2",
            "--memory",
            memory,
            "--api-socket",
            src_api.to_str().unwrap(),
            "--cmdline",
            cmdline,
        ]
        .iter()
        .chain(src_args)
        .map(|s| s.to_string()),
    );
    let source = spawn_prefixed(&args);
    let mut args: Vec<String> = dst_prefix.iter().map(|s| s.to_string()).collect();
    if !dst_prefix.is_empty() {
        args.push(VESSEL.to_string());
    }
    args.extend(
        ["serve", "--api-socket", dst_api.to_str().unwrap()]
            .iter()
            .map(|s| s.to_string()),
    );
    if let Some(err) = dst_stderr {
        assert!(dst_prefix.is_empty());
        let cmd = format!("exec {VESSEL} {} 2>{}", args.join(" "), err.display());
        args = vec!["sh".into(), "-c".into(), cmd];
    }
    let target = spawn_prefixed(&args);
    wait_for(&src_api);
    wait_for(&dst_api);
    Pair {
        tmp,
        source,
        target,
        src_api,
        dst_api,
    }
}

/// `args[0]` is vessel's first argument, or a wrapper command (then vessel's path follows).
pub fn spawn_prefixed(args: &[String]) -> Console {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    if refs[0] == "run" || refs[0] == "serve" {
        Console::spawn(&refs)
    } else {
        Console::spawn_command(&refs)
    }
}

pub fn latest_iters(c: &mut Console) -> Vec<u64> {
    last_iters(&c.soak_lines(CPUS, 2), CPUS)
}

/// Waits until the migration status on `socket` says `want`.
pub fn wait_phase(socket: &Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = phase(socket);
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "phase {now}, never {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Has the target behind `target_api` listen on `addr` and starts a migration there from
/// `p`'s source (`extra`: more `migrate send` arguments); returns once it is started.
pub fn start_migration(p: &Pair, target_api: &Path, addr: &str, extra: &[&str]) {
    assert_code(
        &ctl(
            target_api,
            &["migrate", "receive", "--token", TOKEN, "--listen", addr],
        ),
        0,
    );
    let mut args = vec![
        "migrate",
        "send",
        "--token",
        TOKEN,
        "--to",
        addr,
        "--no-wait",
    ];
    args.extend_from_slice(extra);
    assert_code(&ctl(&p.src_api, &args), 0);
}

/// Starts a migration slowed to 8 Mbit/s from `p`'s source to `addr` and returns once it
/// copies.
pub fn start_slow_migration(p: &Pair, target_api: &Path, addr: &str) {
    start_migration(p, target_api, addr, &["--bandwidth", "8"]);
    wait_phase(&p.src_api, "precopy");
}

/// `extra`: more `migrate send` arguments.
pub fn migrate_and_check(p: &mut Pair, listen: &str, to: &str, extra: &[&str]) {
    let before = latest_iters(&mut p.source);
    // The target makes the token; the source gives it back.
    let o = ctl(&p.dst_api, &["migrate", "receive", "--listen", listen]);
    assert_code(&o, 0);
    let token = printed_token(&o);
    assert_eq!(token.len(), 64, "{token}");
    assert_eq!(phase(&p.dst_api), "listening");
    // `migrate send` follows the migration to its end.
    let mut args = vec!["migrate", "send", "--token", &token, "--to", to];
    args.extend_from_slice(extra);
    let o = ctl(&p.src_api, &args);
    assert_code(&o, 0);
    assert!(stdout(&o).contains("completed"), "{}", stdout(&o));
    // The source hands over and exits 0; the target runs the VM on from where it was.
    assert_eq!(p.source.child.wait().unwrap().code(), Some(0));
    assert_went_on(&p.target.soak_lines(CPUS, 3), CPUS, &before, "");
    let o = ctl(&p.dst_api, &["--json", "info"]);
    assert!(stdout(&o).contains("\"running\""), "{}", stdout(&o));
    // The target still tells how the VM came.
    assert_eq!(phase(&p.dst_api), "completed");
    assert_eq!(p.target.stop(), Some(143));
}

/// A source with a 16 MiB raw disk that the soak checks (`soakdisk=on`), held at `hold` by the
/// test hook until the test writes `release/<hold>` (it marks `release/<hold>.held` when it
/// gets there), and an empty target. Returns the pair, the disk and the release directory.
pub fn held_pair_with_disk(name: &str, hold: &str) -> (Pair, PathBuf, PathBuf) {
    let tmp = TempDir::new(name);
    let disk = tmp.file("disk.raw");
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    let release = tmp.file("release");
    std::fs::create_dir(&release).unwrap();
    let hold_env = format!("VESSEL_MIGRATION_HOLD={hold}");
    let release_env = format!("VESSEL_MIGRATION_RELEASE={}", release.display());
    let disk_arg = format!("path={}", disk.display());
    let p = pair_in(
        tmp,
        &["env", &hold_env, &release_env],
        &[],
        "128M",
        "action=soak soakms=20 soakdisk=on virtio=blk",
        None,
        &["--disk", &disk_arg],
    );
    (p, disk, release)
}
