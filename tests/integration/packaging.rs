//! The Debian package, built by `cargo deb` (the cargo-deb crate, which `stack.sh install` puts
//! in place) from the release binary the tests run, and installed on this machine with dpkg: it
//! brings the binary, the example config as `/etc/shardgate/shardgate.toml` (the `shardgate`
//! group may read it, nobody else), that system user, and the systemd unit, which `systemd-analyze
//! verify` accepts; the installed binary checks the installed config as the `shardgate` user.
//! The package is purged at the end.

use std::process::Command;

fn run(program: &str, args: &[&str]) -> (bool, String) {
    let mut command = Command::new(program);
    command.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    crate::outcome(command)
}

#[test]
fn the_deb_installs_a_user_a_checked_config_and_a_verified_unit() {
    let deb = std::env::temp_dir().join(format!("shardgate-test-{}.deb", std::process::id()));
    let deb = deb.to_str().expect("a UTF-8 path");
    let (built, text) = run("cargo", &["deb", "--no-build", "--fast", "--output", deb]);
    assert!(built, "cargo deb: {text}");
    let (listed, contents) = run("dpkg-deb", &["--contents", deb]);
    assert!(listed, "{contents}");
    for path in [
        "./usr/bin/shardgate",
        "./etc/shardgate/shardgate.toml",
        "./usr/lib/systemd/system/shardgate.service",
        "./usr/share/shardgate/grafana/shardgate.json",
        "./usr/share/shardgate/prometheus/alerts.yml",
    ] {
        assert!(contents.contains(path), "{path} in the package:\n{contents}");
    }

    let (installed, text) = run("dpkg", &["--install", deb]);
    assert!(installed, "dpkg --install: {text}");
    let (user, text) = run("getent", &["passwd", "shardgate"]);
    assert!(user, "the shardgate user: {text}");
    let (_, owner) = run("stat", &["-c", "%U:%G %a", "/etc/shardgate/shardgate.toml"]);
    assert_eq!(owner.trim(), "root:shardgate 640", "the config's owner and mode");
    let (verified, text) = run(
        "systemd-analyze",
        &["verify", "/usr/lib/systemd/system/shardgate.service"],
    );
    assert!(verified, "systemd-analyze verify: {text}");
    let (checked, text) = run(
        "runuser",
        &[
            "-u",
            "shardgate",
            "--",
            "/usr/bin/shardgate",
            "check",
            "--config",
            "/etc/shardgate/shardgate.toml",
        ],
    );
    assert!(checked, "the installed binary checks the installed config: {text}");
    assert!(text.contains("valid"), "{text}");
    let (purged, text) = run("dpkg", &["--purge", "shardgate"]);
    assert!(purged, "dpkg --purge: {text}");
    assert!(!std::path::Path::new("/usr/bin/shardgate").exists(), "purged");
    let _ = std::fs::remove_file(deb);
}

/// Copies `deploy/k8s/` (manifests and seccomp profile) to `to`.
fn copy_manifests(to: &std::path::Path) {
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s");
    std::fs::create_dir_all(to.join("seccomp")).expect("dir");
    for sub in ["", "seccomp"] {
        for entry in std::fs::read_dir(from.join(sub)).expect("deploy/k8s") {
            let path = entry.expect("entry").path();
            if path.is_file() {
                std::fs::copy(&path, to.join(sub).join(path.file_name().expect("name"))).expect("copy");
            }
        }
    }
}

/// `deploy/k8s/validate.sh DIR` with the tests' gateway binary; (success, output).
fn validate_manifests(dir: &std::path::Path) -> (bool, String) {
    let mut command = Command::new(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s/validate.sh"));
    command.arg(dir).env("SHARDGATE_BIN", crate::gateway_binary());
    crate::outcome(command)
}

/// The Kubernetes manifests (`deploy/k8s/`, checked by its `validate.sh`): valid against the
/// API schemas of Kubernetes 1.30 and 1.37, offline and strictly; consistent with the gateway
/// (every port it listens on published, probes on the admin port, Guaranteed QoS, IPC_LOCK, a
/// seccomp profile that allows io_uring, every secret file in the mounted Secret); and the
/// ConfigMap's config passes `shardgate check`. Copies broken on purpose — a profile that
/// refuses io_uring, a CPU limit that is not whole — are refused, saying why.
#[test]
fn the_kubernetes_manifests_validate_and_agree_with_the_gateway() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/k8s");
    let (valid, text) = validate_manifests(&dir);
    assert!(valid, "validate.sh: {text}");
    assert!(text.contains("valid, 1 route(s)"), "shardgate check ran: {text}");
    assert!(text.contains("manifests agree with the gateway"), "{text}");

    let scratch = std::env::temp_dir().join(format!("shardgate-k8s-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    copy_manifests(&scratch);
    let profile = scratch.join("seccomp/shardgate-io-uring.json");
    let text = std::fs::read_to_string(&profile).expect("profile");
    std::fs::write(&profile, text.replace("SCMP_ACT_ALLOW", "SCMP_ACT_ERRNO")).expect("write");
    let (valid, text) = validate_manifests(&scratch);
    assert!(
        !valid && text.contains("refuses io_uring_setup"),
        "a profile refusing io_uring: {text}"
    );

    copy_manifests(&scratch);
    let statefulset = scratch.join("statefulset.yaml");
    let text = std::fs::read_to_string(&statefulset).expect("statefulset");
    assert!(text.contains(r#"limits: {cpu: "8""#), "the test edits the CPU limit");
    std::fs::write(
        &statefulset,
        text.replace(r#"limits: {cpu: "8""#, r#"limits: {cpu: "7500m""#),
    )
    .expect("write");
    let (valid, text) = validate_manifests(&scratch);
    assert!(
        !valid && text.contains("not Guaranteed"),
        "a fractional CPU limit: {text}"
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
