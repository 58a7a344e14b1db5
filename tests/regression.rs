//! One test per bug found by the adversarial review (issue "Hardening"), each reproducing the
//! attack against the real binary on 127.0.0.1 and named after what it guards.

use crate::common;
