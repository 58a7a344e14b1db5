//! The code generated from `proto/` at build time (see `build.rs`), in modules that mirror the
//! proto packages (the generated code refers to its neighbours by those paths), with short
//! aliases for the rest of `grpc/`.
#![allow(clippy::all, clippy::pedantic, missing_docs, unreachable_pub)]

pub mod build {
    pub mod bazel {
        pub mod remote {
            pub mod execution {
                pub mod v2 {
                    tonic::include_proto!("build.bazel.remote.execution.v2");
                }
            }
        }
        pub mod semver {
            tonic::include_proto!("build.bazel.semver");
        }
    }
}

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
    pub mod bytestream {
        tonic::include_proto!("google.bytestream");
    }
}

pub mod grpc {
    pub mod health {
        pub mod v1 {
            tonic::include_proto!("grpc.health.v1");
        }
    }
}

pub use build::bazel::remote::execution::v2 as reapi;
pub use build::bazel::semver;
pub use google::{bytestream, rpc};
pub use grpc::health::v1 as health;
