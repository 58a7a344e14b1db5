//! Real Bazel (Debian's `bazel-bootstrap`, 4.2.3) and real ccache (4.7) against the node, with
//! static auth on. Bazel builds a small workspace (genrules and a `cc_binary`) with the node as
//! its remote cache, `bazel clean --expunge`, and rebuilds: every action of the first build
//! must be a remote cache hit, over gRPC and over the Bazel HTTP cache. ccache compiles, its
//! local cache is wiped, and the second compile must be a remote hit.
//! `scripts/test` installs both (scripts/install-deps.sh test); offline setup per clients.md.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Node, static_auth_node};

const TOKEN: &str = "bazel-e2e-token-5be1";

fn node() -> (Node, tempfile::TempDir) {
    static_auth_node(&[("ci", TOKEN, r#"account = { read = [], write = ["acme"] }"#)])
}

fn write(path: PathBuf, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Local stand-ins for `@rules_cc` and `@rules_java`, which Bazel 4.2's `@bazel_tools` loads
/// and would otherwise fetch from the internet: each rule forwards to the native one.
fn write_rule_stand_ins(dir: &Path) {
    let forward = |names: &[&str]| {
        names
            .iter()
            .map(|name| format!("def {name}(**kwargs):\n    native.{name}(**kwargs)\n\n"))
            .collect::<String>()
    };
    for (repo, package, rules) in [
        (
            "rules_cc",
            "cc",
            forward(&[
                "cc_library",
                "cc_binary",
                "cc_test",
                "cc_toolchain",
                "cc_toolchain_suite",
            ]),
        ),
        (
            "rules_java",
            "java",
            forward(&[
                "java_import",
                "java_runtime",
                "java_toolchain",
                "java_library",
                "java_binary",
            ]),
        ),
    ] {
        write(
            dir.join(repo).join("WORKSPACE"),
            &format!("workspace(name = \"{repo}\")\n"),
        );
        write(dir.join(repo).join("BUILD"), "");
        write(dir.join(repo).join(package).join("BUILD"), "");
        write(dir.join(repo).join(package).join("defs.bzl"), &rules);
    }
}

fn write_workspace(dir: &Path) {
    write(dir.join("WORKSPACE"), "workspace(name = \"kura_e2e\")\n");
    write(
        dir.join("BUILD"),
        r#"genrule(
    name = "greeting",
    outs = ["greeting.txt"],
    cmd = "echo 'hello from kura' > $@",
)

genrule(
    name = "shout",
    srcs = [":greeting"],
    outs = ["shout.txt"],
    cmd = "tr a-z A-Z < $< > $@",
)

cc_binary(
    name = "hello",
    srcs = ["hello.c", "greet.c", "greet.h"],
)
"#,
    );
    write(dir.join("greet.h"), "const char *greeting(void);\n");
    write(
        dir.join("greet.c"),
        "#include \"greet.h\"\nconst char *greeting(void) { return \"hello\"; }\n",
    );
    write(
        dir.join("hello.c"),
        "#include <stdio.h>\n#include \"greet.h\"\nint main(void) { puts(greeting()); return 0; }\n",
    );
}

struct Bazel {
    workspace: PathBuf,
    output_root: PathBuf,
    home: PathBuf,
    rules: PathBuf,
}

impl Bazel {
    fn new(dir: &Path) -> Bazel {
        let bazel = Bazel {
            workspace: dir.join("ws"),
            output_root: dir.join("output"),
            home: dir.join("home"),
            rules: dir.join("rules"),
        };
        std::fs::create_dir_all(&bazel.home).unwrap();
        write_workspace(&bazel.workspace);
        write_rule_stand_ins(&bazel.rules);
        bazel
    }

    /// Runs `bazel <command> <args>`; returns its output, asserting success.
    fn run(&self, command: &str, args: &[String]) -> String {
        let output = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.output_root.display()))
            .args(["--nohome_rc", "--noworkspace_rc", "--max_idle_secs=60"])
            .arg(command)
            .args(args)
            .current_dir(&self.workspace)
            .env("HOME", &self.home)
            .output()
            .expect("bazel is installed by scripts/install-deps.sh test");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(output.status.success(), "bazel {command} failed:\n{text}");
        text
    }

    /// Builds every target against `cache` (extra flags for it); returns Bazel's output.
    fn build(&self, cache: &[String]) -> String {
        let mut args: Vec<String> = [
            "--spawn_strategy=local",
            "--color=no",
            "--curses=no",
            "--noshow_progress",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for repo in ["rules_cc", "rules_java"] {
            args.push(format!(
                "--override_repository={repo}={}",
                self.rules.join(repo).display()
            ));
        }
        args.extend(cache.iter().cloned());
        args.push("//...".into());
        self.run("build", &args)
    }

    fn shutdown(&self) {
        let _ = Command::new("bazel")
            .arg(format!("--output_user_root={}", self.output_root.display()))
            .args(["--nohome_rc", "--noworkspace_rc", "shutdown"])
            .current_dir(&self.workspace)
            .env("HOME", &self.home)
            .output();
    }
}

/// The process counts of Bazel's summary line, e.g. `INFO: 7 processes: 3 internal, 4 local.`
/// → (7, {"internal": 3, "local": 4}); `remote cache hit` counts as `remote cache hit`.
fn processes(output: &str) -> (u64, Vec<(String, u64)>) {
    let line = output
        .lines()
        .find(|line| line.starts_with("INFO:") && line.contains(" processes: "))
        .unwrap_or_else(|| panic!("no process summary in:\n{output}"));
    let after = line.trim_start_matches("INFO:").trim();
    let (total, rest) = after.split_once(" processes: ").unwrap();
    let kinds = rest
        .trim_end_matches('.')
        .split(", ")
        .filter_map(|part| {
            let (count, kind) = part.split_once(' ')?;
            Some((kind.to_string(), count.parse().ok()?))
        })
        .collect();
    (total.trim().parse().unwrap(), kinds)
}

fn count(kinds: &[(String, u64)], kind: &str) -> u64 {
    kinds
        .iter()
        .filter(|(k, _)| k.starts_with(kind))
        .map(|(_, n)| n)
        .sum()
}

/// Build, expunge, rebuild: every action the first build ran locally is a remote hit after.
fn build_expunge_rebuild(bazel: &Bazel, cache: &[String]) {
    let first = bazel.build(cache);
    let (_, kinds) = processes(&first);
    let executed = count(&kinds, "local") + count(&kinds, "linux-sandbox");
    assert!(executed >= 4, "the first build runs the actions:\n{first}");
    assert!(
        !first.contains("WARNING: Remote Cache"),
        "remote cache errors:\n{first}"
    );
    assert!(
        !first.contains("Failed to"),
        "remote cache errors:\n{first}"
    );

    bazel.run("clean", &["--expunge".into()]);
    let second = bazel.build(cache);
    let (_, kinds) = processes(&second);
    assert_eq!(
        count(&kinds, "remote cache hit"),
        executed,
        "every action of the first build is a remote cache hit:\n{second}"
    );
    assert_eq!(count(&kinds, "local"), 0, "nothing runs locally:\n{second}");
    bazel.shutdown();
}

#[test]
fn bazel_rebuilds_from_the_grpc_cache_after_clean_expunge() {
    let (node, _tokens) = node();
    let dir = tempfile::tempdir().unwrap();
    let bazel = Bazel::new(dir.path());
    let cache = [
        format!("--remote_cache=grpc://{}", node.grpc_addr),
        format!("--remote_header=authorization=Bearer {TOKEN}"),
        "--remote_instance_name=bazel-grpc".to_string(),
    ];
    build_expunge_rebuild(&bazel, &cache);
    assert!(!node.logs().contains(TOKEN), "tokens never reach the logs");
}

#[test]
fn bazel_rebuilds_from_the_http_cache_after_clean_expunge() {
    let (node, _tokens) = node();
    let dir = tempfile::tempdir().unwrap();
    let bazel = Bazel::new(dir.path());
    let cache = [format!(
        "--remote_cache=http://ci:{TOKEN}@{}/bazel/acme/bazel-http",
        node.addr
    )];
    build_expunge_rebuild(&bazel, &cache);
}

#[test]
fn ccache_gets_remote_hits_after_its_local_cache_is_cleared() {
    let (node, _tokens) = node();
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("unit.c");
    write(source.clone(), "int answer(void) { return 42; }\n");
    let config = dir.path().join("ccache.conf");
    write(config.clone(), "");
    let remote = format!(
        "http://{}/bazel/acme/ccache|layout=bazel|bearer-token={TOKEN}",
        node.addr
    );
    let compile = |phase: &str| -> String {
        let cache_dir = dir.path().join(phase);
        let run = |args: &[&str]| {
            let output = Command::new("ccache")
                .args(args)
                .current_dir(dir.path())
                .env("CCACHE_CONFIGPATH", &config)
                .env("CCACHE_DIR", &cache_dir)
                .env("CCACHE_REMOTE_STORAGE", &remote)
                .output()
                .expect("ccache is installed by scripts/install-deps.sh test");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            assert!(output.status.success(), "ccache {args:?} failed:\n{text}");
            text
        };
        run(&["gcc", "-c", "unit.c", "-o", "unit.o"]);
        run(&["--print-stats"])
    };
    let stat = |stats: &str, name: &str| -> u64 {
        stats
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once('\t')?;
                (key == name).then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0)
    };
    let first = compile("first");
    assert!(
        stat(&first, "remote_storage_write") >= 1,
        "stored remotely:\n{first}"
    );
    let second = compile("second");
    assert!(
        stat(&second, "remote_storage_hit") >= 1,
        "a remote hit after the local cache is gone:\n{second}"
    );
    assert_eq!(stat(&second, "remote_storage_error"), 0, "{second}");
}
