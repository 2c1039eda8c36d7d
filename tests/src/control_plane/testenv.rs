//! Where `scripts/testenv.sh` put the real components (etcd, kube-apiserver, kubectl, helm,
//! the Gateway API CRDs).

use std::path::PathBuf;

use crate::error::{Result, TestbedError};

/// Where `scripts/testenv.sh` put the real components.
#[derive(Clone, Debug)]
pub struct Testenv {
    dir: PathBuf,
}

impl Testenv {
    /// `$NODEMESH_TESTENV`, or `/var/cache/nodemesh/testenv` as the script's default.
    pub fn locate() -> Result<Self> {
        let dir = std::env::var_os("NODEMESH_TESTENV")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/cache/nodemesh/testenv"));
        let testenv = Self { dir };
        for binary in ["etcd", "kube-apiserver", "kubectl", "helm"] {
            testenv.bin(binary)?;
        }
        Ok(testenv)
    }

    /// A binary built by `scripts/testenv.sh`.
    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join("bin").join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(TestbedError::BinaryNotFound(format!(
                "{} does not exist: run scripts/setup.sh, which builds the test control plane \
                 (scripts/testenv.sh), or point NODEMESH_TESTENV at its output",
                path.display()
            )))
        }
    }

    /// The directory of Gateway API CRD manifests (standard channel).
    pub fn gateway_api_crds(&self) -> PathBuf {
        self.dir.join("gateway-api")
    }
}
