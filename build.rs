//! Build-time work: the git commit for `kura_build_info`, and the gRPC code generated from
//! `proto/` (REAPI v2 cache services, ByteStream, google.rpc.Status, gRPC health). The latter
//! needs `protoc`: `scripts/install-deps.sh` installs it (Debian `protobuf-compiler`), or point
//! `PROTOC` at one.

const PROTOS: [&str; 3] = [
    "proto/build/bazel/remote/execution/v2/remote_execution.proto",
    "proto/google/bytestream/bytestream.proto",
    "proto/grpc/health/v1/health.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    record_git_sha();
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_transport(false)
        .bytes(".")
        .compile_protos(&PROTOS, &["proto"])
        .map_err(|error| {
            format!("cannot compile proto/ ({error}); is protoc installed? run scripts/install-deps.sh build")
        })?;
    Ok(())
}

/// The commit `kura_build_info` reports: `KURA_GIT_SHA` when set (an image build, whose
/// context has no `.git`), else asked of git.
fn record_git_sha() {
    println!("cargo:rerun-if-env-changed=KURA_GIT_SHA");
    if let Some(sha) = std::env::var("KURA_GIT_SHA").ok().filter(|s| !s.is_empty()) {
        println!("cargo:rustc-env=KURA_GIT_SHA={sha}");
        return;
    }
    let sha = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=KURA_GIT_SHA={sha}");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
}
