//! Real Gradle (Debian's 4.4.1) against the node: a build stores its outputs through the path
//! form with Basic credentials, and after `clean` a rebuild takes `compileJava` FROM-CACHE.
//! Once with `static` tokens, once with `introspection` against the control-plane double.
//! `scripts/test` installs Gradle and a JDK (scripts/install-deps.sh).

use crate::common;

use std::path::Path;
use std::process::Command;

use common::control_plane::ControlPlane;
use common::{Node, NodeOptions, static_tokens_file};

const TOKEN: &str = "gradle-e2e-token-31c7";

fn write_project(dir: &Path, port: u16) {
    std::fs::create_dir_all(dir.join("src/main/java/kura")).unwrap();
    std::fs::write(
        dir.join("settings.gradle"),
        format!(
            "rootProject.name = 'hello'\n\
             buildCache {{\n\
               local {{ enabled = false }}\n\
               remote(HttpBuildCache) {{\n\
                 url = 'http://127.0.0.1:{port}/api/cache/gradle/acme/android/'\n\
                 push = true\n\
                 credentials {{ username = 'ci'; password = '{TOKEN}' }}\n\
               }}\n\
             }}\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("build.gradle"), "apply plugin: 'java'\n").unwrap();
    std::fs::write(
        dir.join("src/main/java/kura/Hello.java"),
        "package kura;\npublic class Hello { public static void main(String[] a) { System.out.println(\"hi\"); } }\n",
    )
    .unwrap();
}

/// Runs `gradle <tasks>` with a fresh Gradle home; returns its combined output.
fn gradle(project: &Path, tasks: &[&str]) -> String {
    let home = tempfile::tempdir().unwrap();
    let output = Command::new("gradle")
        .args(["--no-daemon", "--console=plain", "--build-cache", "--info"])
        .args(tasks)
        .current_dir(project)
        .env("GRADLE_USER_HOME", home.path())
        .output()
        .expect("gradle is installed by scripts/install-deps.sh test");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "gradle {tasks:?} failed:\n{text}");
    text
}

/// Builds, cleans and rebuilds the project against `node`, asserting the cache was used.
fn build_clean_rebuild(node: &Node, dir: &Path) {
    let project = dir.join("project");
    write_project(&project, node.addr.port());

    let first = gradle(&project, &["assemble"]);
    assert!(
        !first.contains("Could not store entry"),
        "store failed:\n{first}"
    );
    assert!(
        !first.contains("Could not load entry"),
        "load failed:\n{first}"
    );
    assert!(
        !first.contains("FROM-CACHE"),
        "nothing can be cached yet:\n{first}"
    );

    gradle(&project, &["clean"]);
    for leftover in ["build", ".gradle"] {
        let _ = std::fs::remove_dir_all(project.join(leftover));
    }
    let second = gradle(&project, &["assemble"]);
    assert!(
        second.contains(":compileJava FROM-CACHE"),
        "compileJava not from the cache:\n{second}"
    );
    assert!(!second.contains("Could not load entry"), "{second}");
}

#[test]
fn gradle_rebuild_after_clean_is_served_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = static_tokens_file(
        dir.path(),
        &[("gradle", TOKEN, r#"project = { write = ["acme/android"] }"#)],
    );
    let node = Node::start_with(
        NodeOptions::default()
            .env("KURA_NODE_ACCOUNT", "acme")
            .env("KURA_AUTH_MODE", "static")
            .env("KURA_AUTH_STATIC_TOKENS_FILE", tokens.display().to_string()),
    );
    build_clean_rebuild(&node, dir.path());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gradle_works_with_introspection_against_the_control_plane() {
    let plane = ControlPlane::start().await;
    plane.answer(TOKEN, serde_json::json!({"active": true, "cache_grants": {"project": {"write": ["acme/android"]}}}));
    let node = Node::start_with(plane.node_options());
    let dir = tempfile::tempdir().unwrap();
    // Gradle blocks; the double keeps answering on the other worker thread.
    tokio::task::block_in_place(|| build_clean_rebuild(&node, dir.path()));
    assert_eq!(
        plane.calls(),
        1,
        "every Gradle request after the first is answered from the cache"
    );
}
